"""Peak host memory of one basis step and one snapshot, with the default and a tight ``memory_cap``.

The work measured, on a ``polca_lightning.toy.TinyTransformer`` of a few million
parameters (``--d-model``, ``--layers``) and 3-digit addition data, with a
:class:`~polca_lightning.tracker.POLCATracker` that writes nothing (a ``NullWriter``):

1. snapshot 0 (the loss of every probe token);
2. a basis step of ``K`` Hessian eigenvectors at snapshot 0 (the projected Lanczos, the
   orthonormalisation in float64, the backfill of ``g`` along the new vectors);
3. snapshot 1 after one SGD step: the ``K``-direction derivatives of every probe token.

Each setting runs in a fresh process. Memory: the peak RSS (``getrusage`` ``ru_maxrss``,
and ``/proc/self/statm`` sampled every 2 ms by a thread) minus the RSS just before the
work, with glibc told to return large blocks at once (``MALLOC_MMAP_THRESHOLD_``) so that
memory freed earlier does not hide the work's. On a CPU the model's device *is* host
memory, so the rows the method must hold somewhere at its peak (the ``m + 1`` Lanczos
vectors and the ``K`` Ritz vectors formed from them; the ``K``-row basis is allocated
after the Lanczos vectors are freed) are counted in every setting, ``(m + 1 + K) d 4``
bytes, printed as ``storage``. What ``memory_cap`` bounds is the rest, the working set:
``excess = peak - baseline - storage``, printed against ``memory_cap + model``
(``model``: ``d * 4`` bytes, one parameter vector). Run with ``PYTHONPATH`` pointing at
another checkout to measure another version of the code the same way. With
``basis_on_device=False`` on a GPU the storage rows are in pinned host memory and the
GPU holds the model, a few d-vectors and at most ``memory_cap`` of chunks.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/memory_cap.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import threading
import time

MiB = 1 << 20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def _peak():
    """``{"baseline", "peak", "seconds"}`` of the work inside: RSS before, peak RSS during."""
    import gc

    peak_sampled, stop, out = [0], threading.Event(), {}

    def sample():
        while not stop.is_set():
            peak_sampled[0] = max(peak_sampled[0], _rss())
            time.sleep(0.002)

    gc.collect()
    out["baseline"] = _rss()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    try:
        yield out
    finally:
        out["seconds"] = time.perf_counter() - start
        stop.set()
        thread.join()
        out["peak"] = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, peak_sampled[0])


def _child(args) -> dict:
    import torch

    from polca_lightning.core.functional import ParameterSpace
    from polca_lightning.core.losses import causal_lm_token_loss
    from polca_lightning.toy import TinyTransformer, addition_data
    from polca_lightning.config import POLCAConfig
    from polca_lightning.tracker import POLCATracker

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = TinyTransformer(d_model=args.d_model, n_layers=args.layers, n_heads=args.d_model // 64)
    space = ParameterSpace.from_module(model)

    def data(n, seed, size):
        d = addition_data(n, seed=seed)
        return [{"input_ids": d["input_ids"][i : i + size], "labels": d["labels"][i : i + size]}
                for i in range(0, n, size)]

    probe, hessian = data(args.probe, 1, 32), data(args.hessian, 2, 16)
    engine = "auto" if args.phase == "setup" else "forward"
    config = POLCAConfig(order="trapezoid", k=args.k, max_basis=args.k, engine=engine,
                         memory_cap=args.memory_cap, basis_on_device=args.basis_on_device, lanczos_tol=args.tol)
    if args.phase == "setup":  # the tracker's setup: token index, engine check, both engines' costs measured
        with _peak() as measured:
            POLCATracker(model, causal_lm_token_loss, space, probe, hessian, config, progress=False)
        return {"d": space.dim, **measured}
    tracker = POLCATracker(model, causal_lm_token_loss, space, probe, hessian, config, progress=False)
    batch = data(16, 3, 16)[0]
    with _peak() as measured:
        tracker.snapshot(0)
        tracker.grow_basis(0)
        with torch.enable_grad():  # one SGD step, so that snapshot 1 has an interval
            loss, mask, _ = causal_lm_token_loss(model, batch)
            grads = torch.autograd.grad(loss[mask].mean(), list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= 1e-2 * g
        del grads
        tracker.snapshot(1)
    m = min(max(2 * args.k + 10, 20), space.dim)
    return {"d": space.dim, **measured, "rows": m + 1 + args.k, "n_basis": tracker.n_basis}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("-k", type=int, default=8, help="basis vectors, found in one basis step")
    parser.add_argument("--probe", type=int, default=128, help="probe sequences (4 loss tokens each)")
    parser.add_argument("--hessian", type=int, default=32, help="Hessian sample sequences")
    parser.add_argument("--tol", type=float, default=1e-2, help="Lanczos tolerance (memory does not depend on it)")
    parser.add_argument("--tight", type=int, default=8 * MiB, help="the tight memory_cap, bytes")
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    parser.set_defaults(phase="work")
    args = parser.parse_args()
    if args.child is not None:
        for key, value in json.loads(args.child).items():
            setattr(args, key, value)
        print(json.dumps(_child(args)))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "OMP_NUM_THREADS": "1"}

    def run(**child) -> dict:  # one measurement in a fresh process
        out = subprocess.run([sys.executable, __file__, "--child", json.dumps(child), "--d-model", str(args.d_model),
                              "--layers", str(args.layers), "-k", str(args.k), "--probe", str(args.probe),
                              "--hessian", str(args.hessian), "--tol", str(args.tol)],
                             env=env, capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    settings = [(True, 1 << 30), (False, 1 << 30), (True, args.tight), (False, args.tight)]
    rows = [(on_device, cap, run(basis_on_device=on_device, memory_cap=cap)) for on_device, cap in settings]
    d = rows[0][2]["d"]
    model = d * 4
    storage = rows[0][2]["rows"] * model
    print(f"TinyTransformer d_model={args.d_model} layers={args.layers}: d = {d:,} parameters "
          f"(model {model / MiB:.1f} MiB float32), K = {args.k}, Lanczos m + 1 = {rows[0][2]['rows'] - args.k}, "
          f"storage rows (Lanczos + Ritz vectors) = {rows[0][2]['rows']} = {storage / MiB:.0f} MiB")
    print(f"{'basis_on_device':>15} {'memory_cap MiB':>14} {'peak-base MiB':>13} {'excess MiB':>10} "
          f"{'excess/(cap+model)':>18} {'excess/model':>12} {'seconds':>8}")  # seconds: wall clock, shared machine
    for on_device, cap, r in rows:
        extra = r["peak"] - r["baseline"]
        excess = extra - storage
        print(f"{str(on_device):>15} {cap / MiB:>14.0f} {extra / MiB:>13.0f} {excess / MiB:>10.0f} "
              f"{excess / (cap + model):>18.2f} {excess / model:>12.1f} {r['seconds']:>8.1f}")
    print("setup (the tracker's construction with engine='auto': token index, engine check with the activation "
          "path's check against per-sample Jacobians, both engines' costs measured):")
    print(f"{'memory_cap MiB':>14} {'peak-base MiB':>13} {'bytes/parameter':>15} {'(peak-base)/(cap+model)':>23} "
          f"{'seconds':>8}")
    for cap in (1 << 30, args.tight):
        r = run(basis_on_device=True, memory_cap=cap, phase="setup")
        extra = r["peak"] - r["baseline"]
        print(f"{cap / MiB:>14.0f} {extra / MiB:>13.0f} {extra / d:>15.1f} {extra / (cap + model):>23.2f} "
              f"{r['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
