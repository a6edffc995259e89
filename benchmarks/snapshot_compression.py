"""What zarr 3 codecs save on weight snapshots, and what they cost to write and read.

Trains the arithmetic example's model (``TinyCausalLM``: 2-layer d=128 transformer, ~400k
parameters, AdamW with warmup, batch 64) for ``--steps`` optimizer steps, keeping the
flattened float32 parameters every ``--every`` steps, as the store's ``weights`` variable
holds them. Then writes the snapshots, and the per-interval differences
``theta_{i+1} - theta_i``, into zarr arrays laid out like the store's (one snapshot per
chunk along time, at most 1M parameters per chunk), once per codec:

- none (the store's layout before compression),
- zstd at levels 1, 3 and 9,
- blosc zstd (levels 1 and 5) and blosc lz4 (level 5), each with byte shuffle and with
  bit shuffle.

Prints, per codec and per kind of data, the stored bytes as a fraction of the raw
float32 bytes, and the write and read rates in MB/s of raw data (best of ``--repeats``),
with each rate also as a multiple of the uncompressed one measured in the same run. All
codecs are lossless: every array is read back and compared bit for bit.

Usage:
    python benchmarks/snapshot_compression.py                # 300 steps, snapshots every 5 (~1 min on 2 CPU cores)
    python benchmarks/snapshot_compression.py --d-model 256  # a 4x larger model
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, ZstdCodec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from polca_lightning.core.losses import causal_lm_token_loss  # noqa: E402
from polca_lightning.toy import TinyCausalLM, addition_data  # noqa: E402

PARAMS_PER_CHUNK = 1 << 20  # the store's cut of the param axis (4 MiB of float32)

CODECS: dict[str, list | None] = {
    "none": None,
    "zstd-1": [ZstdCodec(level=1)],
    "zstd-3": [ZstdCodec(level=3)],
    "zstd-9": [ZstdCodec(level=9)],
    "blosc-zstd-1 shuffle": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=4)],
    "blosc-zstd-1 bitshuffle": [BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", typesize=4)],
    "blosc-zstd-5 shuffle": [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle", typesize=4)],
    "blosc-zstd-5 bitshuffle": [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle", typesize=4)],
    "blosc-lz4-5 shuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=4)],
    "blosc-lz4-5 bitshuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=4)],
}


def train_snapshots(steps: int, every: int, d_model: int, n_layers: int, seed: int) -> np.ndarray:
    """Flattened float32 parameters [S, d] at step 0 and every `every` optimizer steps."""
    torch.manual_seed(seed)
    model = TinyCausalLM(d_model=d_model, n_layers=n_layers)
    conf = model.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    data = addition_data(64 * 50, seed=seed)
    snaps = []
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()]).float().numpy().copy()  # noqa: E731
    for step in range(steps + 1):
        if step % every == 0:
            snaps.append(flat())
        if step == steps:
            break
        i = (step * 64) % len(data["input_ids"])
        batch = {"input_ids": data["input_ids"][i: i + 64], "labels": data["labels"][i: i + 64]}
        loss, mask, _ = causal_lm_token_loss(model, batch)
        opt.zero_grad()
        loss[mask].mean().backward()
        opt.step()
        sched.step()
    return np.stack(snaps)  # [S, d]


def stored_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "zarr.json")


def measure(values: np.ndarray, compressors, root: Path, repeats: int) -> dict[str, float]:
    """Write `values` [S, d] row by row as the store writer does, read it back; bytes and rates."""
    n_rows, d = values.shape
    best_write = best_read = float("inf")
    for r in range(repeats):
        path = root / f"a{r}.zarr"
        arr = zarr.create_array(str(path), shape=values.shape, chunks=(1, min(d, PARAMS_PER_CHUNK)),
                                dtype="float32", fill_value=np.nan, compressors=compressors,
                                dimension_names=("snapshot", "param"))
        t0 = time.perf_counter()
        for i in range(n_rows):
            arr[i, :] = values[i]
        best_write = min(best_write, time.perf_counter() - t0)
        reader = zarr.open_array(str(path), mode="r")
        t0 = time.perf_counter()
        back = np.stack([reader[i, :] for i in range(n_rows)])
        best_read = min(best_read, time.perf_counter() - t0)
        if not np.array_equal(back.view(np.uint32), values.view(np.uint32)):
            raise AssertionError("a lossless codec changed the data")
        size = stored_bytes(path)
        shutil.rmtree(path)
    mb = values.nbytes / 1e6
    return {"ratio": size / values.nbytes, "write": mb / best_write, "read": mb / best_read}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=5, help="optimizer steps between snapshots")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--n-layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timings are the best of this many")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    weights = train_snapshots(args.steps, args.every, args.d_model, args.n_layers, args.seed)
    diffs = np.diff(weights, axis=0)  # [S-1, d], float32 as a reader computes it
    print(f"TinyCausalLM d_model={args.d_model} n_layers={args.n_layers}: {weights.shape[1]:,} parameters, "
          f"{len(weights)} snapshots over {args.steps} steps (every {args.every}); "
          f"{weights.nbytes / 1e6:.1f} MB raw; trained in {time.perf_counter() - t0:.0f} s\n")

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, compressors in CODECS.items():
            rows[name] = {kind: measure(values, compressors, Path(tmp), args.repeats)
                          for kind, values in (("weights", weights), ("differences", diffs))}
    base = rows["none"]
    header = (f"| {'codec':<24} | weights: bytes | write MB/s (x none) | read MB/s (x none) "
              f"| differences: bytes | write MB/s (x none) | read MB/s (x none) |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, row in rows.items():
        cells = []
        for kind in ("weights", "differences"):
            m, b = row[kind], base[kind]
            cells += [f"{m['ratio']:.3f}", f"{m['write']:7.0f} ({m['write'] / b['write']:.2f})",
                      f"{m['read']:7.0f} ({m['read'] / b['read']:.2f})"]
        print(f"| {name:<24} | {cells[0]:>14} | {cells[1]:>19} | {cells[2]:>18} "
              f"| {cells[3]:>18} | {cells[4]:>19} | {cells[5]:>18} |")
    print("\nbytes: stored bytes / raw float32 bytes (lower is better); every codec read back bit for bit")


if __name__ == "__main__":
    main()
