"""What the callback costs on the arithmetic example's settings.

Trains the arithmetic example's model (2-layer d=128 transformer, batch 64, 600 probe
sequences, snapshots every 25 steps, a Hessian vector every 200) three times, each in
its own process so peak memory is its own: without the callback, with it, and with it
keeping the basis off the device. Prints

- the callback's time split into snapshots, eigensolves, interval POLCA, backfill and
  I/O, and its total as a multiple of the training time without it;
- bytes in the store per token, interval and vector;
- the peak extra memory (host RSS; device when on a GPU) as a multiple of the model's
  parameter memory.

Usage:
    python benchmarks/callback.py               # 1000 steps (5 basis vectors), ~5 min on 2 CPU cores
    python benchmarks/callback.py --steps 3000  # the example's full length
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from arithmetic import batches, token_labels  # noqa: E402

from polca_lightning import POLCACallback  # noqa: E402
from polca_lightning.toy import TinyCausalLM, addition_data  # noqa: E402


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def child(kind: str, steps: int, out: Path) -> dict:
    L.seed_everything(0, verbose=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train = addition_data(steps * 64, seed=0)
    probe = addition_data(600, seed=10_000)
    hessian = addition_data(256, seed=20_000)
    model = TinyCausalLM()
    callbacks = []
    if kind != "plain":
        callbacks.append(POLCACallback(
            store=out / "polca.zarr", probe_data=batches(probe, 200),
            hessian_data=batches(hessian, 256, keys=("input_ids", "labels")), token_labels=token_labels,
            snapshot_every=25, basis_every=200, k=1, max_basis=15, analyze=False, progress=False,
            basis_on_device=kind != "polca-basis-off-device",
        ))
    trainer = L.Trainer(max_steps=steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator=device, devices=1)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    trainer.fit(model, DataLoader(batches(train, 64), batch_size=None))
    seconds = time.perf_counter() - start
    result = {
        "seconds": seconds,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_fit": rss0,
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "device_peak": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "device": device,
    }
    if callbacks:
        cb = callbacks[0]
        t = cb.tracker
        result.update(timings=dict(t.timings), n_snapshots=t.n_snapshots, n_basis=t.n_basis,
                      n_tokens=len(cb.writer.tokens), store_bytes=du(out / "polca.zarr"),
                      n_params=cb.tracker.space.dim)
    return result


def run_child(kind: str, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            [sys.executable, __file__, "--child", kind, "--steps", str(steps), "--out", tmp],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, Path(args.out))))
        return
    plain = run_child("plain", args.steps)
    runs = {kind: run_child(kind, args.steps) for kind in ("polca", "polca-basis-off-device")}
    r = runs["polca"]
    t = r["timings"]
    callback_total = sum(t.values())
    print(f"arithmetic settings, {args.steps} steps on {r['device']}: {r['n_snapshots']} snapshots, "
          f"{r['n_basis']} basis vectors, {r['n_tokens']} probe tokens, {r['n_params']:,} parameters")
    print(f"training without the callback {plain['seconds']:.1f} s, with it {r['seconds']:.1f} s")
    print()
    print("| part | seconds | share of the callback | multiple of training time |")
    print("|---|---|---|---|")
    for name in ("setup", "snapshot", "eigensolve", "interval", "backfill", "io"):
        print(f"| {name} | {t.get(name, 0):.1f} | {t.get(name, 0) / callback_total:.1%} | "
              f"{t.get(name, 0) / plain['seconds']:.2f} |")
    other = r["seconds"] - plain["seconds"] - callback_total  # hooks, token index, run-to-run noise: bookkeeping
    print(f"| bookkeeping (rest of the difference) | {other:.1f} | {other / callback_total:.1%} | "
          f"{other / plain['seconds']:.2f} |")
    print(f"| **callback total** | {callback_total:.1f} | 100% | {callback_total / plain['seconds']:.2f} |")
    print(f"\nbookkeeping + I/O: {(other + t.get('io', 0)) / callback_total:.1%} of the callback's time")
    n_intervals = r["n_snapshots"] - 1
    per = r["store_bytes"] / (r["n_tokens"] * n_intervals * r["n_basis"])
    print(f"store: {r['store_bytes'] / 2**20:.1f} MiB = {per:.1f} bytes per token x interval x vector "
          f"(all variables, weights included)")
    print()
    print(f"parameter memory {r['param_bytes'] / 2**20:.2f} MiB")
    print("| basis kept | peak extra host memory | / parameter memory | peak extra device memory / parameter memory |")
    print("|---|---|---|---|")
    for kind, run in runs.items():
        host = (run["peak_rss"] - plain["peak_rss"]) / run["param_bytes"]
        dev = "n/a (CPU)" if run["device_peak"] is None else f"{(run['device_peak'] - plain['device_peak']) / run['param_bytes']:.1f}"
        where = "on the device" if kind == "polca" else "off the device"
        print(f"| {where} | {(run['peak_rss'] - plain['peak_rss']) / 2**20:.0f} MiB | {host:.1f} | {dev} |")


if __name__ == "__main__":
    main()
