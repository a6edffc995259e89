"""How the callback's time and memory grow with the model, fitted and extrapolated.

GPT-2-shaped causal LMs (``polca_lightning.toy.TinyTransformer``: pre-LayerNorm, d_mlp =
4 d_model, heads of 64 dimensions, untied embeddings; vocabulary 2048, context 32) at
about 1M, 5M, 20M and 50M parameters. Each size runs in a fresh process:

1. a plain training loop (AdamW, two steps) measures the model's own memory: parameters,
   gradients, optimizer state and training activations;
2. ``POLCACallback`` runs ``Trainer.fit`` for ``--snapshots - 1`` steps, a snapshot every
   step, K vectors found at step 0 (one basis step, backfilled over snapshot 0) and
   every later snapshot decomposed along them (``basis="hessian"``, the callback's
   tolerance 1e-3). The tracker's eigensolver is wrapped to count and time its HVPs,
   and at sizes from ``--converge-below`` on to stop after ``--max-hvp`` of them
   (seconds per HVP are measured there; HVPs per vector come from the sizes that
   converged);
3. after fit, the K-direction derivatives over the probe set are timed on their own,
   first order (``g``) and second order (``g`` and ``c``).

Memory: host RSS (``/proc/self/statm``, sampled every 2 ms by a thread) at the start of
each phase and its peak during it; the difference is the phase's working set. glibc is
told to return large blocks at once (``MALLOC_MMAP_THRESHOLD_``), so that freed memory
does not hide a later phase's working set. The writer queue's bytes are sampled from
the store writer. Basis (K d 4 bytes), Krylov vectors ((m + 1) d 4 bytes) and the model
under AdamW (16 bytes per parameter) are also computed from sizes; the table says which
column is which. Bytes written per snapshot come from the store on disk (file sizes of
each array divided by the snapshots or intervals it holds).

Fits: ``y = c d^a`` by least squares in log space over the sizes (and, for time per
direction, ``t ~ T^b`` over probe tokens T at one size). The extrapolation to 124M (GPT-2
small) and 1B prints the goal's figures: GPU memory with K = 30 next to an 80 GB budget,
and POLCA time for K = 30 and 100 snapshots, on CPU (the fits) and on a GPU under a
stated assumption (the measured cost in plain forward passes times ``2 d T`` FLOPs per
forward pass at ``--gpu-tflops``).

Usage:
    OMP_NUM_THREADS=1 python benchmarks/scale.py            # 1M, 5M, 20M, 50M: ~15 min on 1 core
    python benchmarks/scale.py --quick                      # the two smallest sizes, a smoke run
    python benchmarks/scale.py --sizes 1M,5M,256:2 --k 8    # presets or d_model:n_layers
    python benchmarks/scale.py --host-basis                 # basis_on_device=False
    python benchmarks/scale.py --out scaling_table.md       # also write the tables to a file
    python benchmarks/scale.py --results runs/scale.json    # keep the measurements; a rerun only prints
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VOCAB, CONTEXT = 2048, 32
# name -> (d_model, n_layers); heads of 64, d_mlp = 4 d_model, d_model / n_layers ~ 43-64 (GPT-2 small: 64)
PRESETS = {"1M": (128, 3), "5M": (256, 5), "20M": (448, 8), "50M": (640, 10)}
TARGETS = {"124M (GPT-2 small)": 124_000_000, "1B": 1_000_000_000}
GOAL_K, GOAL_SNAPSHOTS, GOAL_GPU_BYTES = 30, 100, 80e9
MiB = 2**20


def n_params(d_model: int, n_layers: int, vocab: int = VOCAB, context: int = CONTEXT) -> int:
    """Parameters of ``TinyTransformer`` (embeddings, blocks, final LayerNorm, untied head)."""
    block = 12 * d_model**2 + 13 * d_model  # qkv, proj, 2 MLP layers with biases, 2 LayerNorms
    return (vocab + context) * d_model + n_layers * block + 2 * d_model + d_model * vocab + vocab


def krylov_dim(k: int) -> int:
    """``projected_hessian_eigs``' default Krylov basis size for k vectors per basis step."""
    return max(2 * k + 10, 20)


# ============================================================== child: one size
def child(cfg: dict) -> dict:
    import threading
    import warnings
    from contextlib import contextmanager

    import lightning as L
    import torch
    from torch.utils.data import DataLoader

    from polca_lightning import POLCACallback
    from polca_lightning import tracker as tracker_module
    from polca_lightning.core.functional import FunctionalTokenLoss, ParameterSpace, evaluation_mode
    from polca_lightning.core.losses import causal_lm_token_loss
    from polca_lightning.toy import TinyCausalLM

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    page = os.sysconf("SC_PAGE_SIZE")
    # CPU seconds of the computing thread: on a machine other jobs keep busy, what the work costs
    # rather than how long it waited (with one torch thread every op runs on the caller's thread)
    clock = time.thread_time if device.type == "cpu" and torch.get_num_threads() == 1 else time.perf_counter

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    class Sampler:
        """Peak RSS (and device memory) during each phase, sampled on a thread every 2 ms."""

        def __init__(self):
            self.open: list[list] = []  # [name, rss at start, peak rss, device at start, device peak]
            self.peaks: dict[str, int] = {}
            self.device_peaks: dict[str, int] = {}
            self.queue_peak = 0
            self.writer = None
            self.lock = threading.Lock()
            threading.Thread(target=self._run, daemon=True).start()

        def _device(self) -> int:
            return torch.cuda.memory_allocated() if device.type == "cuda" else 0

        def sample(self):
            now, dev = rss(), self._device()
            with self.lock:
                for entry in self.open:
                    entry[2], entry[4] = max(entry[2], now), max(entry[4], dev)
            queue = getattr(getattr(self.writer, "_queue", None), "_pending_bytes", 0)
            self.queue_peak = max(self.queue_peak, queue)

        def _run(self):
            while True:
                self.sample()
                time.sleep(0.002)

        @contextmanager
        def phase(self, name: str):
            now, dev = rss(), self._device()
            entry = [name, now, now, dev, dev]
            with self.lock:
                self.open.append(entry)
            try:
                yield
            finally:
                self.sample()
                with self.lock:
                    self.open.remove(entry)
                self.peaks[name] = max(self.peaks.get(name, 0), entry[2] - entry[1])
                self.device_peaks[name] = max(self.device_peaks.get(name, 0), entry[4] - entry[3])

    mem = Sampler()
    # every timer of the tracker (setup, snapshot, interval, eigensolve, backfill, io) is also a memory phase
    timed = tracker_module.POLCATracker._timed

    @contextmanager
    def timed_and_sampled(self, name):
        with timed(self, name), mem.phase(name):
            yield

    tracker_module.POLCATracker._timed = timed_and_sampled

    def markov(n: int, length: int, seed: int) -> torch.Tensor:
        """Token sequences of a sparse random Markov chain (4 likely successors per token): learnable text."""
        gen = torch.Generator().manual_seed(seed)
        ids = torch.empty(n, length, dtype=torch.long)
        ids[:, 0] = torch.randint(0, VOCAB, (n,), generator=gen)
        for t in range(1, length):
            ids[:, t] = (ids[:, t - 1] * 5 + 7 + torch.randint(0, 4, (n,), generator=gen)) % VOCAB
        return ids

    out: dict = {"device": str(device), "threads": torch.get_num_threads(), "rss_before_model": rss()}
    L.seed_everything(0, verbose=False)
    d_model, n_layers = cfg["d_model"], cfg["n_layers"]
    model = TinyCausalLM(vocab=VOCAB, max_len=CONTEXT, d_model=d_model, n_layers=n_layers, n_heads=max(1, d_model // 64),
                         lr=3e-4, warmup=1).to(device)
    d = sum(p.numel() for p in model.parameters())
    seqs, length = cfg["probe"], CONTEXT
    probe = markov(seqs, length, seed=1).to(device)
    hessian = markov(seqs, length, seed=2).to(device)
    train = markov(seqs * (cfg["snapshots"] + 2), length, seed=3).to(device)

    # 1. the model alone: parameters, gradients, AdamW state, training activations
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    step_seconds = []
    with mem.phase("model"):
        for i in range(2):
            start = clock()
            loss, mask, _ = causal_lm_token_loss(model, train[i * seqs:(i + 1) * seqs])
            loss[mask].mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=False)  # keep the gradients' memory, as during training
            step_seconds.append(clock() - start)
    model_peak = mem.peaks["model"] + out["rss_before_model"]
    del opt
    model.zero_grad(set_to_none=True)

    space = ParameterSpace.from_module(model)
    fn = FunctionalTokenLoss(model, causal_lm_token_loss, space)
    theta = space.flatten(model)
    with evaluation_mode(model), torch.no_grad():
        fn(theta, probe)
        start = clock()
        _, mask, _ = fn(theta, probe)
        forward_seconds = clock() - start
    n_tokens = int(mask.sum())
    del theta

    # 2. the callback
    k = cfg["k"]
    capped = d >= cfg["converge_below"]
    max_hvp = cfg["max_hvp"] if capped else None
    hvp_stats = {"n_hvp": 0, "hvp_seconds": 0.0, "solve_seconds": 0.0}

    solve = tracker_module.projected_hessian_eigs

    def counted_solve(hvp, dim, n, basis=None, **kwargs):
        """The tracker's eigensolve as it calls it, with its HVPs counted and timed (and capped where asked)."""
        def counted(v):
            start_ = clock()
            with mem.phase("hvp"):
                result = hvp(v)
                if result.is_cuda:
                    torch.cuda.synchronize()
            hvp_stats["hvp_seconds"] += clock() - start_
            return result

        if capped:
            kwargs["max_hvp"] = max_hvp
        start_ = clock()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*max_hvp=.* exhausted")
            res = solve(counted, dim, n, basis, **kwargs)
        hvp_stats["solve_seconds"] += clock() - start_
        hvp_stats["n_hvp"] += res.n_hvp
        hvp_stats["krylov_dim"] = kwargs.get("krylov_dim") or krylov_dim(n)
        return res

    tracker_module.projected_hessian_eigs = counted_solve

    class Marker(L.Callback):  # training steps are a phase of their own
        def on_train_batch_start(self, *args):
            self._phase = mem.phase("train_step")
            self._phase.__enter__()

        def on_train_batch_end(self, *args):
            self._phase.__exit__(None, None, None)

    store = Path(cfg["out"]) / "polca.zarr"
    callback = POLCACallback(
        store=store, probe_data=[probe], hessian_data=[hessian], snapshot_every=1, basis_every=1, k=k, max_basis=k,
        order="trapezoid", analyze=False, progress=False, basis_on_device=not cfg["host_basis"],
    )
    orig_start = callback.on_fit_start

    def on_fit_start(trainer, pl_module):  # the sampler watches the writer's queue once it exists
        orig_start(trainer, pl_module)
        mem.writer = callback.writer

    callback.on_fit_start = on_fit_start
    trainer = L.Trainer(max_steps=cfg["snapshots"] - 1, callbacks=[Marker(), callback], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator=device.type, devices=1)
    start = time.perf_counter()
    with mem.phase("fit"):
        trainer.fit(model, DataLoader([train[i * seqs:(i + 1) * seqs] for i in range(cfg["snapshots"])], batch_size=None))
    fit_seconds = time.perf_counter() - start
    t = callback.tracker
    timings = dict(t.timings)
    engine_k = t.dd.choose(t._theta(), t.probe, k, False)
    engine_goal = t.dd.choose(t._theta(), t.probe, GOAL_K, False)

    # 3. the derivatives alone, first and second order, along the basis found
    theta = t._theta()
    basis = t.basis  # where the tracker keeps it (the engine moves what it needs)

    def derivative_seconds(curvature: bool, batches=None, repeat: int = cfg["repeat"]) -> float:
        batches = t.probe if batches is None else batches
        best = float("inf")
        for _ in range(repeat):
            start_ = clock()
            t.dd(theta, batches, basis, curvature=curvature)
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, clock() - start_)
        return best

    with mem.phase("first_order"):
        first = derivative_seconds(False)
    with mem.phase("second_order"):
        second = derivative_seconds(True, repeat=1)  # the costliest call: once
    sweep = []
    if cfg["token_sweep"]:  # first-order time against probe tokens at this size
        for n in (seqs // 4, seqs // 2, seqs, 2 * seqs):
            if n >= 1:
                batch = markov(n, length, seed=4).to(device)
                t.dd(theta, [batch], basis)  # warm-up for the new shape
                sweep.append((n * (length - 1), derivative_seconds(False, [batch]) / k))

    arrays = {}
    for array in sorted(p for p in store.iterdir() if p.is_dir()):
        arrays[array.name] = sum(f.stat().st_size for f in array.rglob("*") if f.is_file())
    import zarr

    group = zarr.open_group(store, mode="r")
    shapes = {name: list(arr.shape) for name, arr in group.arrays()}
    import resource

    out.update(
        clock="thread CPU seconds" if clock is time.thread_time else "wall seconds",
        d=d, d_model=d_model, n_layers=n_layers, n_tokens=n_tokens, n_snapshots=t.n_snapshots, k=k,
        n_basis=t.n_basis, model_peak_delta=model_peak - out["rss_before_model"], train_step_seconds=min(step_seconds),
        forward_seconds=forward_seconds, fit_seconds=fit_seconds, timings=timings, phase_peaks=mem.peaks,
        device_phase_peaks=mem.device_peaks, queue_peak=mem.queue_peak, first_order_seconds=first,
        second_order_seconds=second, token_sweep=sweep, engine_k=engine_k, engine_goal=engine_goal,
        calibration=t.dd.calibration, capped=capped, max_hvp=max_hvp, array_bytes=arrays, array_shapes=shapes,
        peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        device_peak=torch.cuda.max_memory_allocated() if device.type == "cuda" else None, **hvp_stats,
    )
    return out


def run_child(cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps({**cfg, "out": tmp})],
                              capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"size {cfg['name']} failed (exit code {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ============================================================== parent: tables, fits, extrapolation
def fit_power(xs: list[float], ys: list[float]) -> tuple[float, float] | None:
    """``(c, a)`` of ``y = c x^a``, least squares in log space; None with fewer than 2 positive points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    if sxx == 0:
        return None
    a = sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx
    return math.exp(my - a * mx), a


def mib(x: float) -> str:
    return f"{x / MiB:,.1f}"


def gb(x: float) -> str:
    return f"{x / 1e9:,.1f}"


def seconds(x: float) -> str:
    if x >= 3600:
        return f"{x / 3600:,.1f} h"
    if x >= 60:
        return f"{x / 60:,.1f} min"
    return f"{x:.3g} s"


def goal_direction_seconds(r: dict) -> float:
    """First-order s/snapshot/direction at K = 30: the measured one at K, times what ``auto`` saves at K = 30.

    The engine's calibration (wall time, at setup) timed forward mode per direction and reverse
    mode as a fixed part plus a part per direction on the probe batch; ``auto`` takes the
    cheaper. The ratio of the two at K = 30 (at most 1) scales the measured forward-mode cost.
    """
    c = r["calibration"] or {}
    fwd = c.get("forward_per_direction", float("inf")) * GOAL_K
    rev = c.get("reverse_base", float("inf")) + c.get("reverse_per_direction", float("inf")) * GOAL_K
    ratio = min(1.0, rev / fwd) if math.isfinite(fwd) and fwd > 0 and math.isfinite(rev) else 1.0
    return ratio * r["first_order_seconds"] / r["k"]


def derived(r: dict) -> dict:
    """The per-size quantities the tables and fits use."""
    k, d, tim, peaks = r["k"], r["d"], r["timings"], r["phase_peaks"]
    n_snap = r["n_snapshots"]
    a = r["array_bytes"]
    per_snapshot = {name: a.get(name, 0) / n_snap for name in ("weights", "loss", "directional_grad", "curvature", "step")}
    n_int = max(n_snap - 1, 1)
    per_interval = {name: a.get(name, 0) / n_int for name in ("polca", "polca_first", "delta")}
    hvp = r["hvp_seconds"] / max(r["n_hvp"], 1)
    per_vector_hvps = r["n_hvp"] / k
    return {
        "first_dir": r["first_order_seconds"] / k,  # s per snapshot per direction
        "goal_dir": goal_direction_seconds(r),
        "second_dir": r["second_order_seconds"] / k,
        "hvp": hvp,
        "solve_per_hvp": r["solve_seconds"] / max(r["n_hvp"], 1),
        # the eigensolver's own work per HVP: Gram-Schmidt, projections, restarts (chunked, float64)
        "lanczos_per_hvp": (r["solve_seconds"] - r["hvp_seconds"]) / max(r["n_hvp"], 1),
        "hvps_per_vector": per_vector_hvps,
        "vector": r["solve_seconds"] / max(r["n_hvp"], 1) * per_vector_hvps,
        "model_measured": r["model_peak_delta"],
        "model_computed": 16 * d,
        "basis_computed": 4 * k * d,
        "krylov_computed": 4 * (r.get("krylov_dim", krylov_dim(k)) + 1) * d,
        "eigensolve_measured": peaks.get("eigensolve", 0),
        "hvp_ws": peaks.get("hvp", 0),  # one HVP call: the double-backward graph
        "setup_ws": peaks.get("setup", 0),  # the engine check and calibration
        "first_ws": peaks.get("first_order", 0),
        "second_ws": peaks.get("second_order", 0),
        "interval_ws": max(peaks.get("interval", 0), peaks.get("backfill", 0)),
        "queue": r["queue_peak"],
        "snapshot_bytes": sum(per_snapshot.values()) + sum(per_interval.values()),
        "weights_bytes": per_snapshot["weights"],
        "token_bytes": sum(v for n, v in per_snapshot.items() if n != "weights") + sum(per_interval.values()),
        "basis_bytes": a.get("basis_vectors", 0) / max(r["n_basis"], 1),
        "callback": sum(tim.values()),
        "passes_first": r["first_order_seconds"] / k / r["forward_seconds"],
        "passes_second": r["second_order_seconds"] / k / r["forward_seconds"],
        "passes_hvp": hvp / r["forward_seconds"],
        "cpu_gflops": 2 * d * r["n_tokens"] / r["forward_seconds"] / 1e9,
    }


def tables(results: list[dict], args) -> str:
    lines: list[str] = []
    emit = lines.append
    rows = [(r, derived(r)) for r in results]
    r0 = results[0]
    emit(f"{r0['device']}, {r0['threads']} torch thread(s); vocabulary {VOCAB}, context {CONTEXT}, heads of 64, "
         f"d_mlp = 4 d_model; probe = Hessian batch = {args.probe} sequences x {CONTEXT} tokens "
         f"({r0['n_tokens']} loss tokens); K = {args.k}; {args.snapshots} snapshots; order trapezoid; "
         f"basis {'on the host' if args.host_basis else 'on the device'}")
    emit("")
    emit(f"Time (measured, {r0['clock']}). Directional derivatives: the K-direction call over the probe set "
         f"after fit (first order best of {args.repeat}, second order once), divided by K; `passes`: the same in plain forward passes over the probe set; `K=30 by "
         "calibration`: the engine's own timings of forward and reverse mode (made at setup) evaluated at K = 30, "
         "the cheaper of the two, as a fraction of forward mode, times the measured figure. Engine: what `auto` picks at K and at K = 30. s/HVP: the HVP "
         "calls alone; Lanczos s/HVP: the rest of the eigensolve per HVP (Gram-Schmidt, projections, restarts); "
         "s/vector: the whole eigensolve per vector.")
    emit("")
    head = ("size", "params", "d_model x layers", "forward pass", "train step", "engine (K / K=30)",
            "1st order s/snap/dir", "passes", "K=30 by calibration", "2nd order s/snap/dir", "passes", "HVPs", "s/HVP",
            "HVP passes", "Lanczos s/HVP", "HVPs/vector", "s/vector")
    emit("| " + " | ".join(head) + " |")
    emit("|" + "---|" * len(head))
    for r, q in rows:
        hvps = f"{r['n_hvp']}" + (f" (capped at {r['max_hvp']})" if r["capped"] else "")
        per_vec = "n/a (capped)" if r["capped"] else f"{q['hvps_per_vector']:.1f}"
        s_vec = "n/a (capped)" if r["capped"] else seconds(q["vector"])
        emit(f"| {r['name']} | {r['d']:,} | {r['d_model']} x {r['n_layers']} | {seconds(r['forward_seconds'])} | "
             f"{seconds(r['train_step_seconds'])} | {r['engine_k']} / {r['engine_goal']} | {q['first_dir']:.3g} | "
             f"{q['passes_first']:.1f} | {q['goal_dir']:.3g} | {q['second_dir']:.3g} | {q['passes_second']:.1f} | {hvps} | "
             f"{q['hvp']:.3g} | {q['passes_hvp']:.1f} | {q['lanczos_per_hvp']:.3g} | {per_vec} | {s_vec} |")
    emit("")
    emit("The callback's own timers during fit (wall seconds, so inflated by other jobs on a shared machine): setup is the engine check and calibration; interval the "
         "derivatives at each snapshot along the basis and POLCA; backfill the new vectors at earlier snapshots.")
    emit("")
    parts = ("setup", "snapshot", "interval", "eigensolve", "backfill", "io")
    head = ("size", *parts, "callback total", "whole fit")
    emit("| " + " | ".join(head) + " |")
    emit("|" + "---|" * len(head))
    for r, q in rows:
        tim = r["timings"]
        emit(f"| {r['name']} | " + " | ".join(f"{tim.get(p, 0):.2f}" for p in parts) +
             f" | {q['callback']:.1f} | {r['fit_seconds']:.1f} |")
    emit("")
    emit("Host memory (MiB). `meas.`: peak RSS during the phase less RSS at its start, sampled every 2 ms; "
         "`comp.`: computed from sizes. Model: AdamW training, 16 bytes per parameter computed; basis K d 4; "
         f"eigensolver: the eigensolve phase measured (Krylov vectors, the chunked float64 products with them, of "
         f"at most `memory_cap` bytes, and the HVPs), Krylov (m+1) d 4 with m = {krylov_dim(args.k)} computed, "
         "one HVP call measured; setup: the engine check and calibration before training; "
         "derivatives: the first- and second-order calls, and the callback's interval/backfill phases; "
         "writer queue: bytes the store writer held queued (sampled). Process peak: ru_maxrss.")
    emit("")
    head = ("size", "model meas.", "model comp.", "basis comp.", "eigensolve meas.", "Krylov comp.", "one HVP meas.",
            "setup meas.", "1st order meas.", "2nd order meas.", "interval/backfill meas.", "writer queue meas.",
            "process peak")
    emit("| " + " | ".join(head) + " |")
    emit("|" + "---|" * len(head))
    for r, q in rows:
        emit(f"| {r['name']} | {mib(q['model_measured'])} | {mib(q['model_computed'])} | {mib(q['basis_computed'])} | "
             f"{mib(q['eigensolve_measured'])} | {mib(q['krylov_computed'])} | {mib(q['hvp_ws'])} | "
             f"{mib(q['setup_ws'])} | {mib(q['first_ws'])} | "
             f"{mib(q['second_ws'])} | {mib(q['interval_ws'])} | {mib(q['queue'])} | {mib(r['peak_rss'])} |")
    if any(r["device_peak"] is not None for r in results):
        emit("")
        emit("Device memory (MiB), peak allocated during each phase less allocated at its start (sampled):")
        emit("")
        emit("| size | eigensolve | 1st order | 2nd order | interval | process peak |")
        emit("|---|---|---|---|---|---|")
        for r, _ in rows:
            p = r["device_phase_peaks"]
            emit(f"| {r['name']} | {mib(p.get('eigensolve', 0))} | {mib(p.get('first_order', 0))} | "
                 f"{mib(p.get('second_order', 0))} | {mib(p.get('interval', 0))} | {mib(r['device_peak'] or 0)} |")
    emit("")
    emit("Store on disk (bytes, file sizes of each array): per snapshot (weights; per-token arrays: loss, g and, "
         "per interval, POLCA, first-order POLCA and delta) and per basis vector.")
    emit("")
    head = ("size", "weights/snapshot", "bytes/param", "per-token arrays/snapshot", "bytes/token/vector",
            "total/snapshot", "basis/vector")
    emit("| " + " | ".join(head) + " |")
    emit("|" + "---|" * len(head))
    for r, q in rows:
        emit(f"| {r['name']} | {q['weights_bytes']:,.0f} | {q['weights_bytes'] / r['d']:.2f} | {q['token_bytes']:,.0f} | "
             f"{q['token_bytes'] / (r['n_tokens'] * r['k']):.1f} | {q['snapshot_bytes']:,.0f} | {q['basis_bytes']:,.0f} |")

    sweep = next((r for r in results if r["token_sweep"]), None)
    token_fit = fit_power([p[0] for p in sweep["token_sweep"]], [p[1] for p in sweep["token_sweep"]]) if sweep else None
    emit("")
    if len(results) < 2:
        emit("Fits need at least two sizes.")
        return "\n".join(lines)
    ds = [r["d"] for r in results]
    converged = [(r["d"], q["hvps_per_vector"]) for r, q in rows if not r["capped"]]
    fits = {}
    quantities = [
        ("first_dir", "1st order s/snapshot/direction", "s"),
        ("goal_dir", "1st order s/snapshot/direction, auto at K=30", "s"),
        ("second_dir", "2nd order s/snapshot/direction", "s"),
        ("hvp", "s/HVP", "s"),
        ("lanczos_per_hvp", "Lanczos s/HVP", "s"),
        ("forward", "forward pass s", "s"),
        ("eigensolve_measured", "eigensolve working set", "B"),
        ("hvp_ws", "one HVP's working set", "B"),
        ("setup_ws", "setup (engine check, calibration) working set", "B"),
        ("first_ws", "1st order working set", "B"),
        ("second_ws", "2nd order working set", "B"),
        ("model_measured", "model (AdamW training) measured", "B"),
        ("snapshot_bytes", "store bytes/snapshot", "B"),
    ]
    for key, _, _ in quantities:
        ys = [r["forward_seconds"] if key == "forward" else q[key] for r, q in rows]
        fits[key] = fit_power(ds, ys)
    hvp_fit = fit_power([c[0] for c in converged], [c[1] for c in converged]) if len(converged) >= 2 else None
    mean_hvps = sum(c[1] for c in converged) / len(converged) if converged else float("nan")

    def power(key: str, x: float) -> float:
        c, a = fits[key]
        return c * x**a

    d_top = results[-1]["d"]
    top = {key: (results[-1]["forward_seconds"] if key == "forward" else rows[-1][1][key]) for key, _, _ in quantities}

    def at(key: str, x: float) -> float:
        """The goal's model: linear in d from the largest size measured."""
        return top[key] * x / d_top

    emit(f"Fits, y = c d^a over d = {', '.join(f'{x:,}' for x in ds)} (least squares in log space), and the "
         f"linear model y = y(largest) d / {d_top:,} that the goal's figures below use: every part here costs "
         "O(d) per probe token (matmuls, d-vectors), and overheads that make small models' exponents fall below "
         "1 shrink with size, so the linear model is the conservative one.")
    emit("")
    fmt = lambda unit, v: seconds(v) if unit == "s" else f"{gb(v)} GB"  # noqa: E731
    emit("| quantity | c | a | " + " | ".join(f"{t} (fit)" for t in TARGETS) + " | "
         + " | ".join(f"{t} (linear)" for t in TARGETS) + " |")
    emit("|---|---|---|" + "---|" * (2 * len(TARGETS)))
    for key, label, unit in quantities:
        if fits[key] is None:
            continue
        c, a = fits[key]
        emit(f"| {label} | {c:.3g} | {a:.2f} | " + " | ".join(fmt(unit, power(key, x)) for x in TARGETS.values())
             + " | " + " | ".join(fmt(unit, at(key, x)) for x in TARGETS.values()) + " |")
    if hvp_fit:
        emit(f"| HVPs/vector (sizes that converged) | {hvp_fit[0]:.3g} | {hvp_fit[1]:.2f} | "
             + " | ".join(f"{hvp_fit[0] * x ** hvp_fit[1]:.0f}" for x in TARGETS.values()) + " | "
             + " | ".join("mean of the converged sizes" for _ in TARGETS) + " |")
    if token_fit:
        emit("")
        emit(f"Probe tokens, at {sweep['name']} ({sweep['d']:,} parameters): 1st order s/snapshot/direction = "
             f"{token_fit[0]:.3g} T^{token_fit[1]:.2f} over T = "
             f"{', '.join(str(p[0]) for p in sweep['token_sweep'])} loss tokens.")

    # ------------------------------------------------------------ the goal
    T = results[-1]["n_tokens"]
    largest = rows[-1][1]
    h_vec = mean_hvps if converged else float("nan")
    m = krylov_dim(args.goal_k_step)
    emit("")
    emit(f"Extrapolation to the goal (the linear model): K = {GOAL_K}, {GOAL_SNAPSHOTS} snapshots, probe and Hessian batch of {T} "
         f"loss tokens as here, basis steps of {args.goal_k_step} vectors (Krylov m = {m}), HVPs per vector "
         f"{h_vec:.1f} (mean of the sizes that converged), fp32 AdamW training.")
    emit("")
    emit("Memory (GB): model 16 d (fp32 AdamW); basis 4 K d; Krylov 4 (m+1) d; two parameter snapshots 8 d "
         "(the tracker's last snapshot and the current one); working sets, each measured one scaled linearly: "
         "one HVP's plus `memory_cap` (1 GiB by default: the eigensolver's chunked float64 products), the "
         "setup's (the engine check and calibration, before training) and the first-order derivatives'; the "
         "total adds the largest working set to the rest (host figures, assumed to carry over to the device). "
         "With `basis_on_device=False` the basis and the Krylov vectors are in (pinned) host memory and the "
         "device holds chunks of `memory_cap` of them instead.")
    emit("")
    head = ("size", "basis kept", "model", "basis K=30", "Krylov", "snapshots", "HVP + chunks", "setup",
            "1st order", "device total", "vs 80 GB", "without setup", "host: basis + Krylov")
    emit("| " + " | ".join(head) + " |")
    emit("|" + "---|" * len(head))
    cap = float(1 << 30)
    for name, x in TARGETS.items():
        ws = {"hvp": at("hvp_ws", x) + cap, "setup": at("setup_ws", x), "first": at("first_ws", x)}
        model, basis, krylov, snaps = 16 * x, 4 * GOAL_K * x, 4 * (m + 1) * x, 8 * x
        for kept, resident, host in (("on the device", [model, basis, krylov, snaps], 0.0),
                                     ("on the host", [model, cap, cap, snaps], basis + krylov)):
            total = sum(resident) + max(ws.values())
            rest = sum(resident) + max(ws["hvp"], ws["first"])
            verdict = lambda t: "fits" if t <= GOAL_GPU_BYTES else f"over by {gb(t - GOAL_GPU_BYTES)}"  # noqa: E731
            emit(f"| {name} | {kept} | " + " | ".join(gb(v) for v in [*resident, *ws.values()])
                 + f" | {gb(total)} | {verdict(total)} | {gb(rest)} ({verdict(rest)}) | {gb(host)} |")
    tflops = args.gpu_tflops
    step = args.goal_k_step
    n_steps = math.ceil(GOAL_K / step)
    keep = max(step, min(m - 1, step + (m - step) // 2))
    mean_krylov = (keep + m) / 2 + 1  # Krylov rows an iteration works against, between thick restarts
    mean_basis = sum(min(i * step, GOAL_K) for i in range(n_steps)) / n_steps  # basis rows an eigensolve projects out
    # Gram-Schmidt against [V; B] in three passes; the Krylov rows are orthogonal to B, so H is applied
    # to them as they are, and the projection after H is the B part of the next Gram-Schmidt
    lanczos_rows = 3 * (mean_krylov + mean_basis)
    emit("")
    emit(f"POLCA time for K = {GOAL_K}, {GOAL_SNAPSHOTS} snapshots: derivatives {GOAL_SNAPSHOTS} x {GOAL_K} "
         f"snapshot-directions (each vector's g at every snapshot once, backfill included), eigensolves "
         f"{GOAL_K} x HVPs/vector HVPs, each with the eigensolver's own work (Lanczos s/HVP); store writes "
         f"{GOAL_SNAPSHOTS} x bytes/snapshot. CPU: "
         f"on this machine's {r0['threads']} thread(s), the linear model. GPU (an assumption, not a measurement): each part's "
         f"measured cost at the largest size in plain forward passes ({largest['passes_first']:.1f} per "
         f"direction first order, {largest['passes_second']:.1f} second order, {largest['passes_hvp']:.1f} per "
         f"HVP) times 2 d T FLOPs per forward pass at {tflops:g} TFLOP/s effective, and the eigensolver's own "
         f"work as {lanczos_rows:.0f} float64 rows of d read per HVP (see data movement below) at {args.hbm_tbs:g} "
         f"TB/s of device memory bandwidth (basis on the device); this machine ran "
         f"{largest['cpu_gflops']:.1f} GFLOP/s in the largest size's forward pass, so the assumed speed-up is "
         f"{tflops * 1e3 / largest['cpu_gflops']:,.0f}x.")
    emit("")
    head = ("size", "order", "derivatives CPU", "eigensolve CPU", "total CPU", "derivatives GPU", "eigensolve GPU",
            "total GPU", "store written")
    emit("| " + " | ".join(head) + " |")
    emit("|" + "---|" * len(head))
    for name, x in TARGETS.items():
        fwd_gpu = 2 * x * T / (tflops * 1e12)
        eig_cpu = GOAL_K * h_vec * (at("hvp", x) + at("lanczos_per_hvp", x))
        eig_gpu = GOAL_K * h_vec * (largest["passes_hvp"] * fwd_gpu + lanczos_rows * 8 * x / (args.hbm_tbs * 1e12))
        store = GOAL_SNAPSHOTS * at("snapshot_bytes", x)
        for order, key, passes in (("1st", "first_dir", largest["passes_first"]),
                                   ("1st, auto at K=30", "goal_dir", largest["goal_dir"] / results[-1]["forward_seconds"]),
                                   ("2nd", "second_dir", largest["passes_second"])):
            der_cpu = GOAL_SNAPSHOTS * GOAL_K * at(key, x)
            der_gpu = GOAL_SNAPSHOTS * GOAL_K * passes * fwd_gpu
            emit(f"| {name} | {order} | {seconds(der_cpu)} | {seconds(eig_cpu)} | {seconds(der_cpu + eig_cpu)} | "
                 f"{seconds(der_gpu)} | {seconds(eig_gpu)} | {seconds(der_gpu + eig_gpu)} | {gb(store)} GB |")
    # ------------------------------------------------------------ data movement the FLOP estimate leaves out
    rows_per_hvp = lanczos_rows
    # basis steps evenly spread over the snapshots: the one at snapshot s backfills s - 1 earlier ones
    reads = sum(round(GOAL_SNAPSHOTS * (i + 1) / n_steps) - 1 for i in range(n_steps))
    weights_per_param = largest["weights_bytes"] / results[-1]["d"]
    emit("")
    emit(f"Data movement (computed, not measured). With the basis on the host, every product with the basis "
         f"and the Krylov vectors streams them to the device: per HVP about 3 (Krylov rows + basis rows) "
         f"= {rows_per_hvp:.0f} rows of 4 d bytes (Gram-Schmidt in three passes over them, which also projects "
         f"the basis out; {mean_krylov:.0f} Krylov rows and {mean_basis:.1f} basis rows on average over "
         f"{n_steps} basis steps of {step}), and each snapshot-direction one row; at {args.pcie_gbs:g} GB/s "
         f"(an assumed host-to-device rate). Backfill reads {reads} earlier snapshots' weights from the store "
         f"({weights_per_param:.2f} bytes per parameter as stored here) with the basis steps spread evenly "
         f"over the {GOAL_SNAPSHOTS} snapshots.")
    emit("")
    head = ("size", "host-basis HVP transfers", "time", "host-basis direction transfers", "time",
            "backfill weight reads")
    emit("| " + " | ".join(head) + " |")
    emit("|" + "---|" * len(head))
    rate = args.pcie_gbs * 1e9
    for name, x in TARGETS.items():
        hvp_bytes = GOAL_K * h_vec * rows_per_hvp * 4 * x
        dir_bytes = GOAL_SNAPSHOTS * GOAL_K * 4 * x
        emit(f"| {name} | {gb(hvp_bytes)} GB | {seconds(hvp_bytes / rate)} | {gb(dir_bytes)} GB | "
             f"{seconds(dir_bytes / rate)} | {gb(reads * weights_per_param * x)} GB |")
    return "\n".join(lines)


def code_version() -> str:
    """The commit measured, and the package files that differ from it (a shared working tree)."""
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout  # noqa: E731
        # the modules a measurement runs through
        core = [f"polca_lightning/{m}" for m in ("callback.py", "tracker.py", "toy.py", "core", "store")]
        dirty = [line[3:] for line in git("status", "--porcelain", "--", *core).splitlines()]
        return f"commit {git('rev-parse', '--short', 'HEAD').strip()}" + (
            f", with uncommitted changes in {', '.join(dirty)}" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "commit unknown (not a git checkout)"


def parse_sizes(text: str) -> list[tuple[str, int, int]]:
    sizes = []
    for item in text.split(","):
        item = item.strip()
        if item in PRESETS:
            sizes.append((item, *PRESETS[item]))
        elif ":" in item:
            try:
                d_model, n_layers = (int(x) for x in item.split(":"))
            except ValueError:
                raise argparse.ArgumentTypeError(f"--sizes: expected a preset or d_model:n_layers, got {item!r}")
            if d_model < 1 or n_layers < 1:
                raise argparse.ArgumentTypeError(f"--sizes: d_model and n_layers must be positive, got {item!r}")
            sizes.append((f"{n_params(d_model, n_layers) / 1e6:.2g}M", d_model, n_layers))
        else:
            raise argparse.ArgumentTypeError(
                f"--sizes: expected presets {', '.join(PRESETS)} or d_model:n_layers, got {item!r}")
    return sorted(sizes, key=lambda s: n_params(s[1], s[2]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=parse_sizes, default=parse_sizes(",".join(PRESETS)),
                   help=f"comma-separated presets ({', '.join(PRESETS)}) or d_model:n_layers (default: all presets)")
    p.add_argument("--quick", action="store_true", help="only the two smallest sizes (a smoke run)")
    p.add_argument("--k", type=int, default=4, help="basis vectors (one basis step at step 0)")
    p.add_argument("--probe", type=int, default=16, help=f"probe (and Hessian batch) sequences of {CONTEXT} tokens")
    p.add_argument("--snapshots", type=int, default=3, help="snapshots (one per training step)")
    p.add_argument("--repeat", type=int, default=2, help="timed repeats of the derivative calls (best is kept)")
    p.add_argument("--max-hvp", type=int, default=10, help="HVPs per eigensolve at sizes from --converge-below on")
    p.add_argument("--converge-below", type=float, default=10e6,
                   help="sizes with fewer parameters run the eigensolve to its tolerance (default 1e7)")
    p.add_argument("--host-basis", action="store_true", help="basis_on_device=False")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each size's process (default: torch's)")
    p.add_argument("--goal-k-step", type=int, default=5, help="vectors per basis step assumed for the goal's Krylov size")
    p.add_argument("--gpu-tflops", type=float, default=50.0,
                   help="assumed effective GPU FLOP rate for the GPU time estimate (default 50 TFLOP/s)")
    p.add_argument("--hbm-tbs", type=float, default=2.0,
                   help="assumed device memory bandwidth for the eigensolver's own work on a GPU (default 2 TB/s)")
    p.add_argument("--pcie-gbs", type=float, default=25.0,
                   help="assumed host-to-device rate for the host-basis transfer estimate (default 25 GB/s)")
    p.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    p.add_argument("--results", type=Path, default=None,
                   help="keep each size's measurements in this JSON file; sizes already in it are not rerun")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    for name in ("k", "probe", "snapshots", "repeat", "max_hvp"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}: expected a positive int, got {getattr(args, name)}")
    if args.snapshots < 2:
        p.error(f"--snapshots: expected at least 2 (one interval), got {args.snapshots}")
    sizes = args.sizes[:2] if args.quick else args.sizes
    results = []
    cache = json.loads(args.results.read_text()) if args.results and args.results.exists() else {}
    wall = time.perf_counter()
    for i, (name, d_model, n_layers) in enumerate(sizes):
        cfg = {"name": name, "d_model": d_model, "n_layers": n_layers, "k": args.k, "probe": args.probe,
               "snapshots": args.snapshots, "repeat": args.repeat, "max_hvp": args.max_hvp,
               "converge_below": args.converge_below, "host_basis": args.host_basis, "threads": args.threads,
               "token_sweep": i == min(1, len(sizes) - 1)}
        key = json.dumps(cfg, sort_keys=True)
        if key not in cache:
            start = time.perf_counter()
            cache[key] = {**run_child(cfg), "name": name, "code": code_version()}
            cache[key]["wall_seconds"] = time.perf_counter() - start
            print(f"# {name}: {cache[key]['d']:,} parameters in {cache[key]['wall_seconds']:.0f} s",
                  file=sys.stderr, flush=True)
            if args.results:
                args.results.write_text(json.dumps(cache, indent=1))
        results.append(cache[key])
    text = tables(results, args)
    walls = ", ".join(f"{r['name']} {r['wall_seconds']:.0f} s" for r in results if "wall_seconds" in r)
    text += (f"\n\nwall time of each size's process: {walls or 'not recorded'}; this run "
             f"{time.perf_counter() - wall:.0f} s. Code measured: "
             + "; ".join(f"{r['name']} at {r.get('code', 'unknown')}" for r in results))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
