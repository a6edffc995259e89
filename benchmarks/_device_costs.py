"""The costs of ``benchmarks/device_check.py``: the engines on the device against the cost model,
and the time model that trims the ``--paper`` run to the time left.

:func:`measure_costs` times, on the example's ``--paper`` model (at the sizes given), a plain
forward pass over the probe set, both engines and ``auto`` at several K (in plain forward
passes: per direction for forward mode, per loss-bearing position for reverse mode, beside
:func:`~polca_lightning.core.engine.estimate_cost` and the calibration), one HVP over the
Hessian sample, one eigensolve, a training step, a weight snapshot written to and read
from a store, and one HDBSCAN clustering. :func:`predict` turns these into the seconds of
a run of the example; :func:`choose_run` picks the largest run that fits.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch

from polca_lightning.core._streaming import orthonormalize_rows
from polca_lightning.core.engine import (FORWARD_PASSES_PER_DIRECTION, REVERSE_PASSES_PER_POSITION,
                                         DirectionalDerivatives, check_rtol, estimate_cost)
from polca_lightning.core.functional import FunctionalTokenLoss, ParameterSpace, evaluation_mode
from polca_lightning.core.hessian import projected_hessian_eigs
from polca_lightning.core.losses import causal_lm_token_loss
from polca_lightning.toy import TinyTransformer

from _device_steps import Checks, Setting, addition_batches, on, rel, seconds, sync

POSITIONS, SEQUENCE = 4, 10  # the digits format: 10 tokens, the 4 sum digits loss-bearing
D_MLP, CONTEXT, VOCAB = 2048, 14, 10  # examples/arithmetic.py --paper


def paper_model(s: Setting) -> TinyTransformer:
    """The example's ``--paper`` network (``TinyCausalLM.net``) at the sizes of ``s``."""
    z = s.sizes
    return TinyTransformer(vocab=VOCAB, d_model=z.paper_d_model, n_layers=z.paper_layers, n_heads=z.paper_heads,
                           d_mlp=D_MLP, max_len=CONTEXT)


def random_directions(k: int, d: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """``[k, d]`` orthonormal float32 rows drawn and orthonormalised on ``device``."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rows = torch.randn(k, d, generator=gen, device=device)
    return orthonormalize_rows(rows, device=device)


def measure_costs(s: Setting) -> dict:
    """The engines' passes per direction and per position on the device, and the unit costs of a run."""
    z, dev, checks = s.sizes, s.device, Checks()
    torch.manual_seed(0)
    model = paper_model(s).to(dev)
    space = ParameterSpace.from_module(model)
    theta, d = space.flatten(model), space.dim
    probe = on(addition_batches(z.paper_probe, 10_000, z.paper_batch, symbols=False), dev)
    hessian = on(addition_batches(z.paper_hessian, 20_000, z.hessian_batch, symbols=False), dev)
    engines = {e: DirectionalDerivatives(model, causal_lm_token_loss, space, engine=e)
               for e in ("forward", "reverse", "auto")}
    auto = engines["auto"]
    auto(theta, probe)  # warm-up: kernels, allocator
    fwd = seconds(lambda: auto(theta, probe), dev, repeat=3)  # a plain forward pass over the probe set
    fwd_batch = seconds(lambda: auto(theta, probe[:1]), dev, repeat=3)
    start = time.perf_counter()
    calibration = auto.calibrate(theta, probe[0], max_directions=16)  # as the callback does before training
    calibration_s = time.perf_counter() - start
    out = {"cuda_check": s.cuda, "d": d, "probe_problems": z.paper_probe, "probe_batches": len(probe),
           "positions_per_sequence": POSITIONS, "forward_pass_s": fwd, "forward_pass_batch_s": fwd_batch,
           "calibration": calibration, "calibration_s": calibration_s,
           "bound": {"forward_passes_per_direction": FORWARD_PASSES_PER_DIRECTION,
                     "reverse_passes_per_position": REVERSE_PASSES_PER_POSITION},
           "activation_path": engines["reverse"]._ghost is not None, "by_k": []}
    per_batch = z.paper_probe / z.paper_batch  # the calibration is per batch of paper_batch problems
    for k in z.ks:
        V = random_directions(k, d, dev, seed=k)
        t = {}
        for name, dd in engines.items():
            dd(theta, probe[:1], V)  # warm-up (the reverse engine's one-time check of its activation path)
            t[name] = seconds(lambda dd=dd: dd(theta, probe, V), dev, repeat=z.repeat)
        est = estimate_cost(k, POSITIONS, SEQUENCE, False, activations=out["activation_path"])
        measured = {"forward": t["forward"] / fwd, "reverse": t["reverse"] / fwd}
        row = {"k": k, "seconds": t, "auto_picks": auto.choose(theta, probe, k, False),
               "passes": measured, "estimate_passes": est,
               "measured_over_estimate": {e: measured[e] / est[e] for e in est},
               "forward_passes_per_direction": measured["forward"] / k,
               "reverse_passes_per_position": measured["reverse"] / POSITIONS,
               "calibrated_seconds": {
                   "forward": calibration["forward_per_direction"] * k * per_batch,
                   "reverse": (calibration["reverse_base"] + calibration["reverse_per_direction"] * k) * per_batch},
               "auto_over_best": t["auto"] / min(t["forward"], t["reverse"])}
        row["forward_within_bound"] = row["forward_passes_per_direction"] <= FORWARD_PASSES_PER_DIRECTION
        row["auto_within_1.3_of_best"] = row["auto_over_best"] <= 1.3  # docs/engines.md's target
        out["by_k"].append(row)
    # the two engines agree (the same numbers), at the largest K timed up to 16
    k = max(x for x in z.ks if x <= 16)
    V = random_directions(k, d, dev, seed=k)
    g_fwd, g_rev = engines["forward"](theta, probe, V).g, engines["reverse"](theta, probe, V).g
    out["forward_vs_reverse"] = rel(g_fwd, g_rev)
    checks.bound(f"forward against reverse mode at K={k} on the paper model", out["forward_vs_reverse"],
                 check_rtol("float32", d), why="two float32 computations of g over d parameters: the engine's own check")
    # forward mode at K with a larger memory_cap (the 1 GiB default chunks directions on the paper model),
    # and the reduced precisions
    big = DirectionalDerivatives(model, causal_lm_token_loss, space, engine="forward", memory_cap=16 << 30)
    big(theta, probe[:1], V)
    out["forward_16GiB_cap_s"] = seconds(lambda: big(theta, probe, V), dev, repeat=z.repeat)
    out["forward_default_cap_s"] = seconds(lambda: engines["forward"](theta, probe, V), dev, repeat=z.repeat)
    for precision in ("tf32", "bf16"):
        dd = DirectionalDerivatives(model, causal_lm_token_loss, space, engine="forward", compute_precision=precision)
        dd(theta, probe[:1], V)
        out[f"forward_{precision}_over_float32"] = seconds(lambda: dd(theta, probe, V), dev) / out["forward_default_cap_s"]
    out |= _hvp_and_eigensolve(model, space, theta, hessian, dev, z.repeat)
    out |= _training_step(model, dev, z.repeat)
    out |= _store_io(s, space, theta)
    out |= _clustering(z.paper_probe * POSITIONS)
    out["costs"] = {"batch_problems": z.paper_batch, "loss_batch": fwd_batch,
                    "forward_per_direction": calibration["forward_per_direction"],
                    "reverse_base": calibration["reverse_base"],
                    "reverse_per_direction": calibration["reverse_per_direction"],
                    "eigensolve": out["eigensolve_s"], "eigensolve_hvps": out["eigensolve_hvps"],
                    "hvp": out["hvp_s"], "train_step": out["train_step_s"], "write_snapshot": out["write_snapshot_s"],
                    "read_snapshot": out["read_snapshot_s"], "calibration": calibration_s,
                    "clustering": out["clustering_s"], "clustering_tokens": out["clustering_tokens"]}
    out["checks"] = checks
    if s.cuda:
        out["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out


def _hvp_and_eigensolve(model, space, theta, hessian, dev, repeat, basis=None, eigensolve=True) -> dict:
    """Seconds of one Hessian-vector product of the mean loss on ``hessian`` (the best of
    ``repeat``) and, with ``eigensolve``, of one eigensolve at the callback's tolerance,
    ``basis`` (``[k, d]`` rows) projected out."""
    fn = FunctionalTokenLoss(model, causal_lm_token_loss, space)
    with evaluation_mode(model):
        hvp = fn.mean_loss_hvp(theta, hessian)
        v = torch.randn(theta.shape[0], generator=torch.Generator().manual_seed(0)).to(theta)
        hvp(v)
        hvp_s = seconds(lambda: hvp(v), dev, repeat=repeat)
        if not eigensolve:
            return {"hvp_s": hvp_s}
        start = time.perf_counter()
        res = projected_hessian_eigs(hvp, theta.shape[0], 1, basis, tol=1e-3, device=dev)  # the callback's tolerance
        sync(dev)
    return {"hvp_s": hvp_s, "eigensolve_s": time.perf_counter() - start, "eigensolve_hvps": res.n_hvp,
            "top_eigenvalue": float(res.eigenvalues[0])}


def _training_step(model, dev, repeat) -> dict:
    """An AdamW step of the paper's settings on a batch of 64 (plain torch; Lightning adds its own loop)."""
    import copy

    net = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-5, weight_decay=0.1, betas=(0.9, 0.95))
    n = 10
    train = on(addition_batches(64 * (n + 3), 30_000, 64, symbols=False), dev)

    def step(batch):
        loss, mask, _ = causal_lm_token_loss(net, batch)
        opt.zero_grad(set_to_none=True)
        loss[mask].mean().backward()
        opt.step()

    for batch in train[:3]:
        step(batch)
    total = seconds(lambda: [step(b) for b in train[3:]], dev)
    return {"train_step_s": total / n}


def _store_io(s: Setting, space, theta) -> dict:
    """Seconds to write one weight snapshot to a store (compressed, flushed) and to read one back."""
    from polca_lightning.store import StoreWriter, TokenIndex

    path = s.workdir / "io_check.zarr"
    shutil.rmtree(path, ignore_errors=True)
    tokens = TokenIndex(np.zeros(4), np.arange(4), np.full(4, -1))
    writer = StoreWriter(path, tokens=tokens, parameters=list(zip(space.names, space.shapes)), order="trapezoid",
                         config={}, max_basis=1, with_curvature=False)
    weights = theta.detach().cpu().numpy()
    n = 3
    start = time.perf_counter()
    for i in range(n):
        writer.write_snapshot(i, step=i, loss=np.zeros(4, np.float32), weights=weights + np.float32(i * 1e-3))
        writer.commit(i + 1, 0)
    writer.flush()
    write_s = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for i in range(n):
        np.asarray(writer.read_weights(i))
    read_s = (time.perf_counter() - start) / n
    writer.close()
    shutil.rmtree(path, ignore_errors=True)
    return {"write_snapshot_s": write_s, "read_snapshot_s": read_s, "snapshot_bytes": weights.nbytes}


def _clustering(tokens: int) -> dict:
    """Seconds of one HDBSCAN clustering (PCA included) of ``tokens`` trajectories of 101 snapshots,
    with the paper's settings (a minimum cluster of 3% of the tokens, min_samples = tokens / 15)."""
    from polca_lightning.analysis.clustering import ClusterSettings, cluster_trajectories

    rng = np.random.default_rng(0)
    traj = rng.normal(size=(tokens, 101)).cumsum(1)  # [token, snapshot] random walks
    traj[: tokens // 4] -= np.linspace(0, 30, 101)  # a planted group that learns
    settings = ClusterSettings(min_cluster_size=0.03, min_samples=1 / 15)
    best = math.inf
    for _ in range(2):
        start = time.perf_counter()
        cluster_trajectories(traj, settings)
        best = min(best, time.perf_counter() - start)
    return {"clustering_s": best, "clustering_tokens": tokens}


# ------------------------------------------------------------------------- time model
@dataclass(frozen=True)
class Schedule:
    """What a run of the example fixes besides the trims: the basis schedule and the post-fit constants."""

    basis_every: int
    max_basis: int
    # The work after fit that the costs do not measure whole: a clustering in the analysis is
    # `analysis_over_clustering` times HDBSCAN's own (its PCA, medoids, onsets and scores: 1.7x
    # in benchmarks/analysis.py), scaled by tokens; the report about 1 s a vector on 2 CPU
    # cores of this project's machines (twice that here), and a fixed part for the rest
    # (signal check, tables, results).
    analysis_over_clustering: float = 2.0
    report_per_vector_s: float = 2.0
    post_fixed_s: float = 20.0
    lightning_step_s: float = 0.004  # Lightning's loop around a training step
    # the tracker's derivatives against the calibration's engine alone (its loop over batches,
    # gathering, NaN checks, the writer beside it): 1.4x in a 400-step run on this project's CPUs
    derivative_overhead: float = 1.3
    start_s: float = 10.0  # Trainer start, data, model


def _engine_s(costs: dict, k: int) -> float:
    """Seconds per probe batch for ``k`` directions by the cheaper engine (as calibrated)."""
    if k <= 0:
        return costs["loss_batch"]
    return min(costs["forward_per_direction"] * k, costs["reverse_base"] + costs["reverse_per_direction"] * k)


def predict(steps: int, snapshot_every: int, probe: int, lca: int, ablate: bool, costs: dict,
            schedule: Schedule) -> dict:
    """Predicted seconds of ``examples/arithmetic.py --paper`` with these trims, by part.

    Snapshots at every multiple of ``snapshot_every`` from 0 to ``steps``; basis vectors at the
    multiples of ``basis_every`` (after that step's snapshot), at most ``max_basis``; each new
    vector backfilled over every earlier snapshot (a weight read each); the LCA baseline and
    the causal check after fit, then the analysis and the report.
    """
    nb = probe / costs["batch_problems"]  # probe batches, as many as the calibration's
    n_snap = steps // snapshot_every + 1
    basis_at = [b for b in range(0, steps + 1, schedule.basis_every) if b % snapshot_every == 0][: schedule.max_basis]
    k_final = len(basis_at)

    def vectors_before(step):  # the basis a snapshot's derivatives see
        return sum(1 for b in basis_at if b < step)

    def engine(k):  # seconds of the derivatives over the probe set
        return schedule.derivative_overhead * nb * _engine_s(costs, k)

    tokens = POSITIONS * probe
    parts = {
        "start": schedule.start_s + costs["calibration"],
        "train": steps * (costs["train_step"] + schedule.lightning_step_s),
        "snapshots": sum(engine(vectors_before(j * snapshot_every)) for j in range(n_snap)),
        "snapshot_writes": n_snap * costs["write_snapshot"],
        "eigensolves": k_final * max(costs["eigensolve"], costs["hvp"] * max(costs["eigensolve_hvps"], 20)),
        "backfill": sum((b // snapshot_every) * costs["read_snapshot"]
                        + (b // snapshot_every + 1) * engine(1) for b in basis_at),
        "lca": n_snap * (costs["read_snapshot"] + engine(lca)) if lca else 0.0,
        "ablation": 2 * k_final * nb * costs["loss_batch"] if ablate else 0.0,
        "analysis": (3 * k_final + lca + 2) * schedule.analysis_over_clustering * costs["clustering"]
                    * tokens / costs["clustering_tokens"] + k_final * schedule.report_per_vector_s + schedule.post_fixed_s,
    }
    parts["total"] = sum(parts.values())
    parts["after_fit"] = parts["lca"] + parts["ablation"] + parts["analysis"]
    return {"steps": steps, "snapshot_every": snapshot_every, "probe": probe, "lca_directions": lca,
            "ablate": ablate, "snapshots": n_snap, "basis": k_final, "seconds": parts}


def choose_run(costs: dict, budget_s: float, schedule: Schedule, steps: tuple[int, ...],
               trims: tuple[tuple[int, int], ...], lca_max: int, min_intervals: int = 1) -> tuple[dict, list[dict]]:
    """The first run, in order of preference, predicted to fit in ``budget_s``.

    First the untrimmed run (``steps[0]``, ``trims[0]``, the LCA baseline along as many
    parameters as ``max_basis``, the example's default, and the causal check). Then most
    steps first (down to the floor, the last of ``steps``), at each ``trims`` in order
    ((snapshot_every, probe): sparser snapshots, then fewer probe problems; none with fewer
    than ``min_intervals`` intervals between snapshots), with the LCA
    baseline along as many parameters as basis vectors, at most ``lca_max``. Where nothing
    fits, the smallest run (the floor, the last trim, 5 LCA directions, no causal check).

    Returns:
        The run, and every run considered (the first is the untrimmed one).
    """
    every, probe = trims[0]
    tried = [predict(steps[0], every, probe, schedule.max_basis, True, costs, schedule)]
    if tried[0]["seconds"]["total"] <= budget_s:
        return tried[0], tried
    for n in steps:
        for every, probe in trims:
            if n // every < min_intervals:
                continue
            k = len([b for b in range(0, n + 1, schedule.basis_every) if b % every == 0][: schedule.max_basis])
            tried.append(predict(n, every, probe, min(k, lca_max), True, costs, schedule))
            if tried[-1]["seconds"]["total"] <= budget_s:
                return tried[-1], tried
    every, probe = trims[-1]
    tried.append(predict(steps[-1], every, probe, min(lca_max, 5), False, costs, schedule))
    return tried[-1], tried


def trim_reasons(run: dict, paper: dict, budget_s: float, label: str = "the paper's settings") -> list[str]:
    """What was trimmed from the untrimmed run ``paper`` (called ``label``) and why, in words."""
    s = paper["seconds"]
    lines = [f"{label} ({paper['steps']} steps, a snapshot every {paper['snapshot_every']}, "
             f"{paper['probe']} probe problems, {paper['basis']} vectors): predicted {s['total']:.0f} s "
             f"(" + ", ".join(f"{k} {v:.0f} s" for k, v in s.items() if k not in ("total", "after_fit")) +
             f"), against {budget_s:.0f} s available"]
    if run is paper:
        return lines + ["nothing trimmed"]
    for key, what in (("steps", "steps"), ("snapshot_every", "snapshot every"), ("probe", "probe problems"),
                      ("lca_directions", "LCA directions"), ("ablate", "causal check")):
        if run[key] != paper[key]:
            lines.append(f"{what}: {paper[key]} -> {run[key]}")
    t = run["seconds"]
    lines.append(f"predicted: {t['total']:.0f} s ({run['snapshots']} snapshots, {run['basis']} vectors: "
                 + ", ".join(f"{k} {v:.0f} s" for k, v in t.items() if k not in ("total", "after_fit")) + ")")
    return lines
