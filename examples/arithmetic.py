"""3-digit addition with POLCA: the paper's section 4 on a CPU-sized run.

A small causal transformer learns ``a a a + b b b = s s s s`` (the sum's 4 digits, most
significant first, are the loss-bearing tokens). ``POLCACallback`` snapshots it every
``--snapshot-every`` steps, adds a Hessian eigenvector every ``--basis-every`` steps,
and streams per-token POLCA into a Zarr store; every sum digit carries the labels
``place`` (0 = 1000s ... 3 = 1s) and ``carry`` (1 when the column below carries into it).
After training the callback clusters the trajectories and logs the figures to W&B
(offline: no account needed; ``wandb sync`` uploads the run later).

Usage:
    python examples/arithmetic.py                  # the default run (about 10 min on 2 CPU cores)
    python examples/arithmetic.py --tiny           # seconds: the CI smoke run
    python examples/arithmetic.py --help

Then:
    polca info runs/arithmetic/polca.zarr
    python -c "import polca_lightning as p; print(p.open_store('runs/arithmetic/polca.zarr'))"
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from polca_lightning import POLCACallback, open_store
from polca_lightning.losses import causal_lm_token_loss
from polca_lightning.toy import TinyTransformer, addition_data


class AdditionModel(L.LightningModule):
    """A causal transformer trained on the sum digits only (labels -100 elsewhere)."""

    def __init__(self, d_model: int = 128, n_layers: int = 2, n_heads: int = 4, lr: float = 1e-3,
                 weight_decay: float = 0.1, max_steps: int = 3000, warmup: int = 100):
        super().__init__()
        self.save_hyperparameters()
        self.net = TinyTransformer(d_model=d_model, n_layers=n_layers, n_heads=n_heads, max_len=12)

    def forward(self, input_ids):
        return self.net(input_ids)

    def training_step(self, batch, _):
        loss, mask, _ = causal_lm_token_loss(self, batch)
        loss = loss[mask].mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=h.lr, weight_decay=h.weight_decay, betas=(0.9, 0.98))
        # linear warmup, then constant: the paper's runs use a constant rate after warmup
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / h.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def batches(data: dict, size: int, keys=("input_ids", "labels", "place", "carry")) -> list[dict]:
    n = len(data["input_ids"])
    return [{k: data[k][i : i + size] for k in keys} for i in range(0, n, size)]


def decode(data: dict, sequence: int, position: int) -> str:
    """The problem of a probe token, its digit in brackets: ``123+456=0[5]79``."""
    chars = "0123456789+="
    ids = data["input_ids"][sequence].tolist()
    return "".join(f"[{chars[t]}]" if i == position else chars[t] for i, t in enumerate(ids))


def token_labels(batch: dict) -> dict:
    """The ``place`` and ``carry`` of every position (-1 where it is not a sum digit)."""
    return {"place": batch["place"], "carry": batch["carry"]}


PRESETS = {
    # CPU default: the prototype's scale (DESIGN.md), about 10 minutes on 2 cores
    "default": dict(steps=3000, batch=64, d_model=128, n_layers=2, n_heads=4, lr=1e-3, probe=600,
                    hessian=256, snapshot_every=25, basis_every=200, k=1, max_basis=15),
    # CI smoke run: seconds
    "tiny": dict(steps=24, batch=32, d_model=16, n_layers=1, n_heads=2, lr=3e-3, probe=48,
                 hessian=32, snapshot_every=4, basis_every=8, k=2, max_basis=4),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI)")
    p.add_argument("--out", default="runs/arithmetic", help="output folder (store, W&B run, checkpoints)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--order", default="trapezoid", choices=["first", "second", "trapezoid", "exact"])
    p.add_argument("--engine", default="auto", choices=["auto", "forward", "reverse"])
    p.add_argument("--wandb-project", default="polca-arithmetic")
    p.add_argument("--online", action="store_true", help="log to W&B online (default: offline)")
    p.add_argument("--no-wandb", action="store_true", help="no W&B: figures go to a folder beside the store")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store in --out")
    for name, value in PRESETS["default"].items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None,
                       help=f"(default {value}; --tiny: {PRESETS['tiny'][name]})")
    args = p.parse_args(argv)
    preset = PRESETS["tiny" if args.tiny else "default"]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    out = Path(args.out)
    store = out / "polca.zarr"
    if store.exists() and args.overwrite:
        shutil.rmtree(store)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(args.seed, verbose=False)

    train = addition_data(args.steps * args.batch, seed=args.seed)  # fresh problems every step
    probe = addition_data(args.probe, seed=10_000 + args.seed)  # held out
    hessian = addition_data(args.hessian, seed=20_000 + args.seed)  # a sample of the training distribution

    callback = POLCACallback(
        store=store,
        probe_data=batches(probe, 200),
        hessian_data=batches(hessian, 256, keys=("input_ids", "labels")),
        token_labels=token_labels,
        snapshot_every=args.snapshot_every,
        basis_every=args.basis_every,
        k=args.k,
        max_basis=args.max_basis,
        order=args.order,
        engine=args.engine,
        seed=args.seed,
        # appendix G: a carry cluster counts if most of its carries land on the 10s or 100s
        # digit (a carry into the 1000s digit is just predicting a leading 1)
        analysis_kwargs={"restrict": {"carry": ("place", (1, 2))}},
        decode=lambda sequence, position: decode(probe, sequence, position),
    )
    if args.no_wandb:
        logger = False
    else:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(project=args.wandb_project, save_dir=str(out), offline=not args.online,
                             config=vars(args))
    model = AdditionModel(args.d_model, args.n_layers, args.n_heads, args.lr, max_steps=args.steps)
    trainer = L.Trainer(
        max_steps=args.steps, callbacks=[callback], logger=logger, default_root_dir=out, accelerator="auto",
        devices=1, log_every_n_steps=max(1, min(25, args.steps // 4)), enable_checkpointing=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model, DataLoader(batches(train, args.batch), batch_size=None, shuffle=False))
    total = time.perf_counter() - start
    if logger:
        import wandb

        wandb.finish()
    summarize(store, callback, total)
    return store


def summarize(store: Path, callback: POLCACallback, total: float) -> None:
    """What the run found, printed: time, coverage, and the clusters' carry homogeneity."""
    ds = open_store(store)
    t = callback.tracker.timings
    print(f"\nPOLCA store: {store}  ({ds.sizes['snapshot']} snapshots, {ds.sizes['basis']} basis vectors, "
          f"{ds.sizes['token']} probe tokens, order {ds.attrs['order']!r})")
    print(f"fit took {total:.0f} s, of which the callback: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(t.items())))
    real = (ds["loss"][-1] - ds["loss"][0]).values  # [token]
    for name in ("polca", "polca_first"):
        alloc = ds[name].sum(("interval", "basis")).values
        print(f"coverage of {name:<11}: allocated {alloc.mean():+.4f} of a real mean loss change "
              f"{real.mean():+.4f} per token (ratio {alloc.sum() / real.sum():.2f})")
    if "carry_homogeneity" not in ds:
        return
    from polca_lightning.report import appendix_g_table, open_analysed_store

    table = appendix_g_table(open_analysed_store(store))
    col = {name: i for i, name in enumerate(table.columns)}
    print("best cluster of carry tokens per trajectory type (appendix G: 10s/100s-place carry clusters,")
    print("outliers excluded; paper, Table 1: POLCA 0.97, exact loss 0.514):")
    print(f"  {'trajectory':<14} {'homogeneity':>11} {'recall':>7} {'F1':>6} {'vector':>6} {'size':>5}")
    for row in table.rows:
        if row[col["label"]] == "carry" and row[col["value"]] == 1 and row[col["rank"]] == 0:
            unit = row[col["unit"]]
            print(f"  {row[col['trajectory_type']]:<14} {row[col['homogeneity']]:>11.3f} {row[col['recall']]:>7.3f} "
                  f"{row[col['f1']]:>6.3f} {unit if unit >= 0 else '-':>6} {row[col['size']]:>5}")


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    main()
