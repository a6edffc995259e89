"""3-digit addition with POLCA in a plain PyTorch loop: no Lightning, no Trainer.

The task of ``examples/arithmetic.py`` (``a a a + b b b = s s s s``; every sum digit labelled
with its ``place`` and whether it receives a ``carry``), trained by a loop written by hand.
``polca_lightning.track`` wraps the loop; ``polca.step()`` follows each optimizer step. Leaving
the block completes the store, clusters the trajectories and logs the report to the W&B run
that is open (offline: no account needed), or with ``--no-wandb`` writes it to a folder
beside the store.

Usage:
    python examples/plain_loop.py            # minutes on 2 CPU cores
    python examples/plain_loop.py --tiny     # seconds: the CI smoke run
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import polca_lightning
from polca_lightning import causal_lm_token_loss
from polca_lightning.toy import TinyTransformer, addition_data

SIZES = {  # the model, the run and POLCA's schedule
    "default": dict(d_model=128, n_layers=2, n_heads=4, steps=600, lr=1e-3, snapshot_every=5, basis_every=40,
                    k=1, max_basis=15, probe=600, hessian=256),
    "tiny": dict(d_model=16, n_layers=1, n_heads=2, steps=24, lr=3e-3, snapshot_every=4, basis_every=8,
                 k=2, max_basis=4, probe=48, hessian=32),
}


def batches(data: dict, size: int) -> list[dict]:
    """``data``'s rows, ``size`` at a time: dicts of ``input_ids``, ``labels``, ``place``, ``carry``."""
    return [{k: v[i : i + size] for k, v in data.items()} for i in range(0, len(data["input_ids"]), size)]


def main(argv=None) -> Path:
    """Train in a plain loop with POLCA into ``--out``; returns the store."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI)")
    p.add_argument("--out", default="runs/plain_loop", help="output folder (store, W&B run)")
    p.add_argument("--no-wandb", action="store_true", help="no W&B: the report goes to a folder beside the store")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store in --out")
    args = p.parse_args(argv)
    size = SIZES["tiny" if args.tiny else "default"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(0)
    train = batches(addition_data(64 * size["steps"], seed=0), 64)  # fresh problems at every step
    probe = batches(addition_data(size["probe"], seed=1), 64)  # held out: their tokens are decomposed
    hessian = batches(addition_data(size["hessian"], seed=2), 64)  # a training sample: its mean loss, the Hessian
    model = TinyTransformer(d_model=size["d_model"], n_layers=size["n_layers"], n_heads=size["n_heads"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=size["lr"], weight_decay=0.1, betas=(0.9, 0.98))
    if not args.no_wandb:
        import wandb

        wandb.init(project="polca-plain-loop", dir=str(out), mode="offline", config=size)  # track reports here

    with polca_lightning.track(
        model, out / "polca.zarr", probe_data=probe, hessian_data=hessian,
        token_labels=lambda batch: {"place": batch["place"], "carry": batch["carry"]},
        snapshot_every=size["snapshot_every"], basis_every=size["basis_every"], k=size["k"],
        max_basis=size["max_basis"], mode="w" if args.overwrite else "w-",
    ) as polca:
        for batch in train:
            loss, mask, _ = causal_lm_token_loss(model, batch)  # per-token losses [B, L], loss-bearing mask
            loss = loss[mask].mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            polca.step()  # a snapshot every snapshot_every steps, a basis step every basis_every
            if not args.no_wandb:
                wandb.log({"train/loss": loss.item(), "global_step": polca.global_step})
    if not args.no_wandb:
        wandb.finish()  # an offline run is readable once finished

    ds = polca_lightning.open_store(polca.store)
    print(f"{polca.global_step} steps; store {polca.store}: {ds.sizes['snapshot']} snapshots, "
          f"{ds.sizes['basis']} vectors, {int(ds['kept'].sum())} kept after the analysis")
    return polca.store


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    main()
