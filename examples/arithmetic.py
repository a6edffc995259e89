"""3-digit addition with POLCA: the paper's section 4 on a CPU-sized run.

A small causal transformer learns ``a a a + b b b = s s s s`` (the sum's 4 digits, most
significant first, are the loss-bearing tokens). ``POLCACallback`` snapshots it every
``--snapshot-every`` steps, adds a Hessian eigenvector every ``--basis-every`` steps,
and streams per-token POLCA into a Zarr store; every sum digit carries the labels
``place`` (0 = 1000s ... 3 = 1s) and ``carry`` (1 when the column below carries into it).
After training the callback clusters the trajectories and logs the figures to W&B
(offline: no account needed; ``wandb sync`` uploads the run later).

Usage:
    python examples/arithmetic.py                  # the default run (about 11 min on 2 CPU cores)
    python examples/arithmetic.py --tiny           # seconds: the CI smoke run
    python examples/arithmetic.py --seeds 0 1 2    # 3 runs and the table of their mean and spread
    python examples/arithmetic.py --paper          # the paper's settings (appendix E): a GPU job
    python examples/arithmetic.py --paper-cpu      # the paper's run trimmed to 2 CPU cores (make paper)
    python examples/arithmetic.py --help

Each run ends with the appendix G comparison (the best carry cluster per trajectory
type, and the fraction of clusters with hidden breakthroughs under both rules for τ:
where the mean loss flattens, the analysis default, and the paper's 10 % of the run,
which the paper's own figures used) and the causal check of the best POLCA carry vector:
the loss change of its clusters when the final model's movement along it is undone.
``results.json`` beside the store keeps these figures, and ``appendix_g_carry.png`` draws
the top three carry clusters of each trajectory type beside their chance levels and the
paper's table 8.

A run with ``--checkpoint-every`` (``--paper-cpu``: every 500 steps) keeps the last two
Lightning checkpoints in ``OUT/checkpoints``; started again with the same flags, it resumes
from the newer one that loads (the store in ``mode="a"``, the training batches from the
checkpoint's step), so a long run can span several sessions. A complete run (its
``results.json`` written) is reused unless ``--overwrite``. Every ``--time-left-every``
steps a line says how long training has left, from the costs measured so far.

Then:
    polca info runs/arithmetic/polca.zarr
    python -c "import polca_lightning as p; print(p.open_store('runs/arithmetic/polca.zarr'))"
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from polca_lightning import POLCACallback
from polca_lightning.time_left import TimeLeft
from polca_lightning.toy import ADDITION_VOCAB, TinyCausalLM, addition_data


def batches(data: dict, size: int, keys=("input_ids", "labels", "place", "carry")) -> list[dict]:
    n = len(data["input_ids"])
    return [{k: data[k][i : i + size] for k in keys} for i in range(0, n, size)]


def decode(data: dict, sequence: int, position: int) -> str:
    """The problem of a probe token, its digit in brackets: ``123+456=0[5]79`` (the digits-only
    format shows the same, its ``+`` and ``=`` drawn where the numbers meet)."""
    chars = "0123456789+="
    ids = data["input_ids"][sequence].tolist()
    symbols = len(ids) == 12
    out = []
    for i, t in enumerate(ids):
        if not symbols and i in (3, 6):
            out.append("+" if i == 3 else "=")
        out.append(f"[{chars[t]}]" if i == position else chars[t])
    return "".join(out)


def token_labels(batch: dict) -> dict:
    """The ``place`` and ``carry`` of every position (-1 where it is not a sum digit)."""
    return {"place": batch["place"], "carry": batch["carry"]}


PRESETS = {
    # CPU default: a 2-layer, d=128 model (docs/paper.md) with snapshots and basis steps where it
    # learns. At lr 1e-3 the loss is flat (tau) by step 330-475 of every seed we ran, so the
    # run stops at 600 steps, snapshots every 5 and adds a vector every 40 (3000 steps with
    # snapshots every 25 and a vector every 200 put 13 of 15 vectors on the flat tail)
    "default": dict(steps=600, batch=64, d_model=128, n_layers=2, n_heads=4, lr=1e-3, probe=600,
                    hessian=256, snapshot_every=5, basis_every=40, k=1, max_basis=15,
                    min_cluster_size=0.03, min_samples=10.0, beta2=0.98, warmup=100, checkpoint_every=0),
    # CI smoke run: seconds
    "tiny": dict(steps=24, batch=32, d_model=16, n_layers=1, n_heads=2, lr=3e-3, probe=48,
                 hessian=32, snapshot_every=4, basis_every=8, k=2, max_basis=4,
                 min_cluster_size=0.03, min_samples=10.0, beta2=0.98, warmup=100, checkpoint_every=0),
    # the paper's appendix E settings (9.5M parameters; a GPU job): 3 layers, d 512, 4 heads,
    # MLP 2048, 10000 AdamW steps at lr 1e-5, 1250 probe problems (5000 tokens) and a 1250-problem
    # Hessian sample, one eigenvector every 200 steps (50 in all), HDBSCAN min cluster size 150
    # and min_samples = tokens / 15. The POLCA interval is 20 steps as the text says twice (its
    # table says 5, which would store 2000 weight snapshots of 38 MB each).
    "paper": dict(steps=10000, batch=64, d_model=512, n_layers=3, n_heads=4, lr=1e-5, probe=1250,
                  hessian=1250, snapshot_every=20, basis_every=200, k=1, max_basis=50,
                  min_cluster_size=150.0, min_samples=1 / 15, beta2=0.95, warmup=100, checkpoint_every=500),
}
#: the paper's run on 2 CPU cores (``make paper``): its model, tokenisation, optimizer, learning
#: rate, warm-up, batch, 10,000 steps, 1,250-problem probe and HDBSCAN settings untouched; trimmed
#: only (docs/paper.md gives each trim's measured cost): the Hessian sample (256 problems instead
#: of 1,250), the number of vectors (the first 8 of the paper's 50, one every 200 steps as the
#: paper), the snapshot interval (100 steps instead of 20) and the LCA baseline (none: it costs
#: what the snapshots cost again)
PAPER_CPU_TRIMS = dict(hessian=256, max_basis=8, snapshot_every=100, lca_directions=0)
PRESETS["paper_cpu"] = {**PRESETS["paper"], **PAPER_CPU_TRIMS}

#: appendix G, Table 9 (best carry cluster: homogeneity, recall, F1) and the fraction of
#: clusters with hidden breakthroughs, for the trajectory types this example compares; the
#: paper's τ was 1000 of 10,000 steps (10 % of the run), so its fractions compare with ours
#: under the paper's rule (``hidden_fraction_paper``)
PAPER = {
    "loss": (0.514, 0.771, 0.617, 0.0),
    "loss_change": (0.524, 0.958, 0.678, 0.0),
    "fisher": (0.664, 0.947, 0.781, 0.284),
    "lca": (0.792, 0.772, 0.782, 0.019),
    "polca_first": (0.948, 0.767, 0.848, 0.307),
    "polca": (0.973, 0.736, 0.838, 0.355),
}
#: appendix G, table 8: the homogeneity of the top three carry clusters per trajectory type
#: (one for the exact loss and its change), drawn beside the run's in appendix_g_carry.png
PAPER_TABLE_8 = {"loss": (0.514,), "loss_change": (0.524,), "fisher": (0.664, 0.643, 0.637),
                 "lca": (0.792, 0.614, 0.592), "polca_first": (0.948, 0.928, 0.887), "polca": (0.973, 0.946, 0.903)}
TYPE_NAMES = {"loss": "exact loss", "loss_change": "change in exact loss", "fisher": "Fisher",
              "lca": "LCA", "polca_first": "first-order POLCA", "polca": "POLCA"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI)")
    size.add_argument("--paper", action="store_true", help="the paper's settings (appendix E): a GPU job")
    size.add_argument("--paper-cpu", action="store_true",
                      help="the paper's run with only the Hessian sample, the vectors and the snapshot interval "
                           "trimmed to fit 2 CPU cores (make paper)")
    p.add_argument("--out", default="runs/arithmetic", help="output folder (store, W&B run, results.json)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", metavar="S",
                   help="run these seeds (into OUT/seed_S; complete runs are reused unless --overwrite) "
                        "and print the table of their mean and spread")
    p.add_argument("--format", default=None, choices=["symbols", "digits"],
                   help="symbols (default): 'aaa+bbb=ssss' over 12 token ids, context 12; digits (--paper's "
                        "default): 'aaabbbssss' over the 10 digits with a context of 14, the sizes the "
                        "paper's parameter count implies")
    p.add_argument("--order", default="trapezoid", choices=["first", "second", "trapezoid", "exact"])
    p.add_argument("--engine", default="auto", choices=["auto", "forward", "reverse"])
    p.add_argument("--basis", default="hessian", choices=["hessian", "random"],
                   help="Hessian eigenvectors (Algorithm 1) or a random orthonormal basis (appendix H)")
    p.add_argument("--lca-directions", type=int, default=None, metavar="N",
                   help="parameters of the LCA baseline after fit (default: as many as basis vectors; 0: none)")
    p.add_argument("--no-ablate", action="store_true", help="skip the causal check after fit")
    p.add_argument("--wandb-project", default="polca-arithmetic")
    p.add_argument("--online", action="store_true", help="log to W&B online (default: offline)")
    p.add_argument("--no-wandb", action="store_true", help="no W&B: figures go to a folder beside the store")
    p.add_argument("--overwrite", action="store_true",
                   help="start again: replace the store, checkpoints and results in --out")
    p.add_argument("--no-bars", action="store_true",
                   help="no progress bars: a log file gets the time-left lines alone")
    p.add_argument("--time-left-every", type=int, default=None, metavar="N",
                   help="print the time left every N steps (default: 20 lines a run)")
    for name, value in PRESETS["default"].items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=None,
                       help=f"(default {value:g}; --tiny: {PRESETS['tiny'][name]:g}; --paper: {PRESETS['paper'][name]:g}; "
                            f"--paper-cpu: {PRESETS['paper_cpu'][name]:g})")
    args = p.parse_args(argv)
    args.paper = args.paper or args.paper_cpu  # the paper's model and tokenisation
    preset = PRESETS["tiny" if args.tiny else "paper_cpu" if args.paper_cpu else "paper" if args.paper else "default"]
    if args.format is None:
        args.format = "digits" if args.paper else "symbols"
    if args.time_left_every is None:
        args.time_left_every = max(1, (args.steps or preset["steps"]) // 20)
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("min_cluster_size", "min_samples"):  # counts as ints, fractions as floats
        value = getattr(args, name)
        if value >= 1 and float(value).is_integer():
            setattr(args, name, int(value))
    return args


#: appendix G: a carry cluster counts if most of its carries land on the 10s or 100s digit
#: (a carry into the 1000s digit is just predicting a leading 1)
APPENDIX_G_CARRY = {"carry": ("place", (1, 2))}


def analysis_settings(args) -> dict:
    """The analysis settings of a run: HDBSCAN's, and appendix G's restriction of carry clusters."""
    return {
        "min_cluster_size": args.min_cluster_size,
        "min_samples": args.min_samples,
        "restrict": APPENDIX_G_CARRY,
    }


def splits(args) -> tuple[dict, dict, dict]:
    """Training problems (fresh ones every step), held-out probe problems, a Hessian sample."""
    symbols = getattr(args, "format", "symbols") == "symbols"  # examples/huggingface.py has no --format
    return (addition_data(args.steps * args.batch, seed=args.seed, symbols=symbols),
            addition_data(args.probe, seed=10_000 + args.seed, symbols=symbols),
            addition_data(args.hessian, seed=20_000 + args.seed, symbols=symbols))


def addition_callback(store: Path, probe: dict, hessian: dict, args, callback_class=POLCACallback,
                      **kwargs) -> POLCACallback:
    """``POLCACallback`` (or ``callback_class``: ``POLCATrainerCallback`` takes the same arguments)
    on the addition problems: place/carry labels, decoded contexts, the schedule, engine and
    seed of ``args``; ``kwargs`` (e.g. ``order``) go to the callback."""
    kwargs.setdefault("analysis_kwargs", {"restrict": APPENDIX_G_CARRY})
    return callback_class(
        store=store,
        probe_data=batches(probe, 200),
        hessian_data=batches(hessian, 256, keys=("input_ids", "labels")),
        token_labels=token_labels,
        snapshot_every=args.snapshot_every,
        basis_every=args.basis_every,
        k=args.k,
        max_basis=args.max_basis,
        engine=args.engine,
        seed=args.seed,
        decode=lambda sequence, position: decode(probe, sequence, position),
        **kwargs,
    )


def main(argv=None) -> Path:
    """Run the example; returns the store (with ``--seeds``: the folder of the runs)."""
    args = parse_args(argv)
    if args.seeds:
        return run_seeds(args)
    results = run(args, Path(args.out))
    print_results(results)
    return Path(results["store"])


def run(args, out: Path) -> dict:
    """Train one seed with the callback into ``out``; returns (and writes) its results.

    A complete run (``results.json``) is reused; a run with checkpoints in ``out/checkpoints``
    resumes from the newest that loads; ``--overwrite`` starts again."""
    store, ckpt_dir, results = out / "polca.zarr", out / "checkpoints", out / "results.json"
    if args.overwrite:
        for path in (store, ckpt_dir, results):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    elif results.exists():
        print(f"{out}: reusing the complete run (--overwrite runs it again)")
        return json.loads(results.read_text())
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(args.seed, verbose=False)
    resume = latest_checkpoint(ckpt_dir) if store.exists() else None
    if store.exists() and resume is None:
        raise SystemExit(f"{store} exists but {ckpt_dir} holds no checkpoint to resume it from: "
                         "--overwrite starts the run again")
    start_step = 0 if resume is None else resume[1]
    if resume is not None:
        print(f"resuming {store} from {resume[0]} (step {start_step})")

    train, probe, hessian = splits(args)
    callback = addition_callback(store, probe, hessian, args, order=args.order, basis=args.basis,
                                 lca_directions=args.lca_directions, ablate=not args.no_ablate,
                                 analysis_kwargs=analysis_settings(args), mode="w-" if resume is None else "a",
                                 progress=not args.no_bars)
    if args.no_wandb:
        logger = False
    else:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(project=args.wandb_project, save_dir=str(out), offline=not args.online,
                             config={**vars(args), "seed": args.seed})
    model = build_model(args)
    clock = TimeLeft(args.time_left_every)  # also the run's time over every process that resumed it
    callbacks = [callback, clock]
    if args.checkpoint_every:  # the last two: a kill while one is written leaves the other
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, filename="{step:06d}", every_n_train_steps=args.checkpoint_every,
                                         save_top_k=2, monitor="step", mode="max"))
    trainer = L.Trainer(  # one epoch of exactly `steps` batches: the progress bar counts steps
        max_steps=args.steps, max_epochs=1, callbacks=callbacks, logger=logger, default_root_dir=out,
        accelerator="auto", devices=1, log_every_n_steps=max(1, min(25, args.steps // 4)),
        enable_checkpointing=bool(args.checkpoint_every), enable_model_summary=False, enable_progress_bar=not args.no_bars,
    )
    with warnings.catch_warnings():  # FromStep starts the data where the checkpoint stopped
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        trainer.fit(model, FromStep(batches(train, args.batch), start_step),
                    ckpt_path=None if resume is None else str(resume[0]))
    totals = clock.totals()
    if logger:
        import wandb

        wandb.finish()
    return write_results(store, {"fit": totals["seconds"], "cpu": totals["cpu_seconds"], **totals["timings"]},
                         resumed_at=None if resume is None else start_step)


def build_model(args) -> TinyCausalLM:
    """The model of ``args`` (its initial weights from the global seed)."""
    vocab, context = (ADDITION_VOCAB, 12) if args.format == "symbols" else (10, 14)
    return TinyCausalLM(vocab, context, args.d_model, args.n_layers, args.n_heads,
                        d_mlp=2048 if args.paper else None, lr=args.lr, warmup=args.warmup, betas=(0.9, args.beta2))


class FromStep:
    """The training batches from ``start`` on, with the length of all of them.

    Lightning restores a mid-epoch checkpoint's step counters but restarts a plain iterable
    from its first batch; a run resumed at step ``start`` must train on the batches an
    uninterrupted run trains on from there (every problem is fresh: batch ``i`` is step ``i``'s).
    """

    def __init__(self, batches: list, start: int = 0):
        self.batches, self.start = batches, start

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches[self.start:])


def latest_checkpoint(folder: Path) -> tuple[Path, int] | None:
    """The newest checkpoint in ``folder`` that loads, and its step (``None``: none does)."""
    found = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    for path in found:
        try:  # a kill while a checkpoint is written leaves a file that does not load
            step = torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"]
        except Exception as err:  # noqa: BLE001 - any unreadable file: try the older one
            print(f"skipping {path}: it does not load ({type(err).__name__}: {err})")
            continue
        return path, int(step)
    return None


def run_seeds(args) -> Path:
    """``--seeds``: one run per seed (complete ones reused), then the table of mean and spread."""
    root = Path(args.out)
    results = []
    for seed in args.seeds:
        out = root / f"seed_{seed}"
        complete = (out / "results.json").exists() and not args.overwrite
        if not complete:
            print(f"seed {seed}: training into {out}")
        args.seed = seed
        results.append(run(args, out))
        if not complete:
            print_results(results[-1])
    table = seeds_table(results)
    (root / "table.md").write_text(table)
    print(f"\n{len(results)} seeds ({', '.join(str(r['seed']) for r in results)}): mean ± standard deviation\n")
    print(table)
    print(f"written to {root / 'table.md'}")
    return root


# ----------------------------------------------------------------------------- results
def write_results(store: Path, timings: dict | None = None, resumed_at: int | None = None) -> dict:
    """What a finished run found, as JSON-able figures (also written to ``results.json``).

    Coverage, and per trajectory type the best 10s/100s carry cluster (homogeneity,
    recall, F1, its vector and size) and the fraction of clusters with hidden
    breakthroughs under the analysis' τ (``hidden_fraction``; where the mean loss
    flattens by default) and under the paper's (``hidden_fraction_paper``, 10 % of the
    run); both τs (``tau``); the causal check of the best POLCA carry vector.
    """
    from polca_lightning.report import appendix_g_figure, open_analysed_store

    ds = open_analysed_store(store)
    config = json.loads(ds.attrs["config"]) if isinstance(ds.attrs.get("config"), str) else ds.attrs.get("config", {})
    out = {"store": str(store), "seed": config.get("seed"), "snapshots": ds.sizes["snapshot"],
           "basis": ds.sizes["basis"], "tokens": ds.sizes["token"], "order": ds.attrs["order"],
           "timings": timings or {}, "resumed_at_step": resumed_at, "coverage": {}, "carry": {}}
    real = (ds["loss"][-1] - ds["loss"][0]).values  # [token]
    for name in ("polca", "polca_first"):
        alloc = ds[name].sum(("interval", "basis")).values
        out["coverage"][name] = {"allocated": float(alloc.mean()), "real": float(real.mean()),
                                 "ratio": float(alloc.sum() / real.sum())}
    out["signal"] = carry_signal(ds)
    if "tau" in ds:
        out["tau"] = {"value": float(ds["tau"]), "rule": ds["cluster"].attrs.get("analysis_tau_rule"),
                      "paper": float(ds["tau_paper"]) if "tau_paper" in ds else None}
    if "carry_homogeneity" in ds:
        types = ds["trajectory_type"].values.tolist()
        hidden = {name: dict(zip(types, ds[name].values.tolist()))
                  for name in ("hidden_fraction", "hidden_fraction_paper") if name in ds}
        out["carry"] = best_carry_clusters(ds)
        for name, fractions in hidden.items():
            for t, fraction in fractions.items():
                out["carry"].setdefault(t, {})[name] = None if np.isnan(fraction) else fraction
        fig = appendix_g_figure(ds, "carry", reference=PAPER_TABLE_8, reference_name="paper (table 8)")
        out["appendix_g_figure"] = str(Path(store).parent / "appendix_g_carry.png")
        fig.savefig(out["appendix_g_figure"], dpi=120)
        out["ablation"] = ablation_of_best_carry_vector(ds, out["carry"].get("polca", {}).get("unit"))
        out["finding"] = finding(out["carry"])
    path = Path(store).parent / "results.json"
    path.write_text(json.dumps(out, indent=1))
    return out


def best_carry_clusters(ds) -> dict:
    """Per trajectory type, the best 10s/100s carry cluster of the analysis ``ds`` holds
    (appendix G's rank 0 for carry = 1): homogeneity, chance, recall, F1, its vector, size
    and share of all probe tokens."""
    from polca_lightning.report import appendix_g_table

    table = appendix_g_table(ds)
    col = {name: i for i, name in enumerate(table.columns)}
    keys = [k for k in ("homogeneity", "chance", "recall", "f1", "unit", "size") if k in col]
    return {row[col["trajectory_type"]]: {k: row[col[k]] for k in keys} | {"share": row[col["size"]] / ds.sizes["token"]}
            for row in table.rows if row[col["label"]] == "carry" and row[col["value"]] == 1 and row[col["rank"]] == 0}


#: the bar a carry cluster must clear to count as the paper's finding: homogeneity, recall,
#: share of all probe tokens, and margin over the exact-loss baseline's best carry cluster
FINDING_BAR = {"homogeneity": 0.8, "recall": 0.3, "share": 0.03, "margin": 0.25}


def finding(carry: dict) -> dict:
    """Whether a POLCA or first-order POLCA carry cluster clears :data:`FINDING_BAR`."""
    baseline = (carry.get("loss") or {}).get("homogeneity") or 0.0
    met = {}
    for t in ("polca", "polca_first"):
        c = carry.get(t) or {}
        met[t] = bool(c.get("homogeneity") is not None
                      and c["homogeneity"] >= FINDING_BAR["homogeneity"] and c["recall"] >= FINDING_BAR["recall"]
                      and c["share"] >= FINDING_BAR["share"]
                      and c["homogeneity"] - baseline >= FINDING_BAR["margin"])
    return {"bar": FINDING_BAR, "baseline": baseline, "met": met, "found": any(met.values())}


def carry_signal(ds) -> dict:
    """The signal check on the 10s/100s-place tokens, label ``carry``, for POLCA and first-order
    POLCA: is the carry information in the trajectories at all (see ``signal_check``)?"""
    from polca_lightning.analysis import signal_check

    where = ds["place"].isin([1, 2])
    out = {}
    for name in ("polca", "polca_first"):
        s = signal_check(ds, "carry", where=where, method=name)
        out[name] = {k: float(s[k]) for k in ("majority", "accuracy_loss", "accuracy_all")}
        out[name] |= {"accuracy": [float(v) for v in s["accuracy"].values],
                      "auc": [float(v) for v in s["auc"].values], "tokens": int(s["n_tokens"])}
    return out


def ablation_of_best_carry_vector(ds, unit) -> dict | None:
    """The causal check of ``unit``: per cluster, the loss change when the final model's
    movement along the vector is undone, with the cluster's share of 10s/100s carries."""
    if unit is None or unit < 0 or "ablation_loss_change" not in ds:
        return None
    from polca_lightning.analysis.ablation import ablation_table

    table = ablation_table(ds, [unit])
    col = {name: i for i, name in enumerate(table.columns)}
    change = ds["ablation_loss_change"].values[unit]
    carry = (ds["carry"].values == 1) & np.isin(ds["place"].values, (1, 2))
    clusters = [{k: row[col[k]] for k in ("tokens", "size", "loss_change", "polca_total", "most_affected")}
                | {"carry_share": float(np.mean(carry[ds["cluster"].values[unit] == row[col["cluster"]]]))
                   if row[col["cluster"]] is not None else float(carry.mean())}
                for row in table.rows]
    return {"vector": int(unit), "coefficient": float(ds["ablation_coefficient"].values[unit]),
            "carry_tokens": float(change[carry].mean()), "other_tokens": float(change[~carry].mean()),
            "clusters": clusters}


def print_results(r: dict) -> None:
    print(f"\nPOLCA store: {r['store']}  ({r['snapshots']} snapshots, {r['basis']} basis vectors, "
          f"{r['tokens']} probe tokens, order {r['order']!r})")
    if r["timings"]:
        t = dict(r["timings"])
        cpu = t.pop("cpu", None)  # None: a run resumed from a checkpoint that did not count it
        fit = t.pop("fit")
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in sorted(t.items()))
        print(f"fit took {fit:.0f} s{'' if cpu is None else f' ({cpu:.0f} s of CPU)'}"
              + (f", of which the callback: {parts}" if parts else ""))
    for name, c in r["coverage"].items():
        print(f"coverage of {name:<11}: allocated {c['allocated']:+.4f} of a real mean loss change "
              f"{c['real']:+.4f} per token (ratio {c['ratio']:.2f})")
    if not r["carry"]:
        return
    tau = r.get("tau") or {}
    print("\nbest cluster of carry tokens per trajectory type (appendix G: 10s/100s-place carry clusters,")
    print("outliers excluded), and the fraction of clusters with hidden breakthroughs (onset after τ) under")
    print(f"two rules: 'plateau' (τ = {tau.get('value', float('nan')):g}, where the mean loss flattens) and 'paper' "
          f"(τ = {tau.get('paper') or float('nan'):g}, 10% of the run,")
    print("as the paper's own τ = 1000 of 10,000 steps); the paper's figures in brackets. 'chance' is the")
    print("homogeneity the same cluster would have if it knew the place of each digit but nothing of carries")
    print("(the carry rate of its mix of places):")
    print(f"  {'trajectory':<21} {'homogeneity':>14} {'chance':>6} {'recall':>14} {'F1':>14} {'hidden':>7} "
          f"{'hidden':>14} {'vector':>6} {'size':>5}")
    print(f"  {'':<21} {'':>14} {'':>6} {'':>14} {'':>14} {'plateau':>7} {'paper τ':>14}")
    for t, name in TYPE_NAMES.items():
        if t not in r["carry"]:
            continue
        c, paper = r["carry"][t], PAPER[t]
        cells = [f"{_num(c.get(k))} ({v:.3f})"
                 for k, v in zip(("homogeneity", "recall", "f1", "hidden_fraction_paper"), paper)]
        unit = c.get("unit", -1)
        print(f"  {name:<21} {cells[0]:>14} {_num(c.get('chance')):>6} {cells[1]:>14} {cells[2]:>14} "
              f"{_num(c.get('hidden_fraction')):>7} {cells[3]:>14}"
              f" {unit if unit is not None and unit >= 0 else '-':>6} {c.get('size', '-'):>5}")
    if r.get("appendix_g_figure"):
        print(f"the top three beside the paper's table 8, with their chance levels: {r['appendix_g_figure']}")
    f = r.get("finding")
    if f:
        bar = f["bar"]
        verdict = ", ".join(f"{TYPE_NAMES[t]} {'yes' if v else 'no'}" for t, v in f["met"].items())
        print(f"carry cluster with homogeneity >= {bar['homogeneity']}, recall >= {bar['recall']}, >= "
              f"{bar['share']:.0%} of the tokens and >= {bar['margin']} above the exact loss "
              f"({f['baseline']:.3f}): {verdict}")
    signal = r.get("signal") or {}
    if signal:
        first = next(iter(signal.values()))
        print(f"\nsignal check: is carry information in the trajectories at all? ({first['tokens']} tokens of the "
              f"10s/100s places, majority rate {first['majority']:.3f})")
        print("cross-validated accuracy of a linear classifier on the trajectories, and the best vector's AUC of "
              "its final projected loss (0.5: none; shown as max(AUC, 1 - AUC)):")
        print(f"  {'trajectory':<21} {'exact loss':>10} {'all vectors':>11} {'best vector':>13} {'best AUC':>13}")
        for name, sc in signal.items():
            acc, auc = np.array(sc["accuracy"]), np.array(sc["auc"])
            sep = np.maximum(auc, 1 - auc)
            print(f"  {TYPE_NAMES[name]:<21} {sc['accuracy_loss']:>10.3f} {sc['accuracy_all']:>11.3f} "
                  f"{f'{acc.max():.3f} ({acc.argmax()})':>13} {f'{sep.max():.3f} ({sep.argmax()})':>13}")
    a = r.get("ablation")
    if a:
        print(f"\ncausal check: undo the final model's movement along POLCA vector {a['vector']} (its best carry "
              f"cluster; moved {a['coefficient']:+.3g} along it).")
        print(f"mean loss change: 10s/100s carry tokens {a['carry_tokens']:+.4f}, the other tokens {a['other_tokens']:+.4f}")
        print(f"  {'tokens':<11} {'size':>5} {'carry share':>11} {'loss change':>11} {'POLCA total':>11}")
        for c in a["clusters"]:
            print(f"  {c['tokens']:<11} {c['size']:>5} {c['carry_share']:>11.3f} {c['loss_change']:>+11.4f} "
                  f"{c['polca_total']:>+11.4f}{'   <- most affected' if c['most_affected'] else ''}")


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def seeds_table(results: list[dict]) -> str:
    """Markdown: per trajectory type, mean ± standard deviation over seeds, beside the paper."""
    def cell(t, key):
        v = np.array([r["carry"].get(t, {}).get(key) for r in results], dtype=float)
        v = v[np.isfinite(v)]
        if not v.size:
            return "-"
        return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if v.size > 1 else f"{v[0]:.3f}"

    lines = ["| trajectories clustered | carry homogeneity | its chance level | recall | F1 "
             "| hidden fraction, plateau τ | hidden fraction, paper's τ | paper: homogeneity / recall / F1 / hidden "
             "(paper's τ) |",
             "|---|---|---|---|---|---|---|---|"]
    for t, name in TYPE_NAMES.items():
        paper = " / ".join(f"{v:.3f}" for v in PAPER[t])
        lines.append(f"| {name} | " + " | ".join(cell(t, k) for k in ("homogeneity", "chance", "recall", "f1",
                                                                       "hidden_fraction", "hidden_fraction_paper"))
                     + f" | {paper} |")
    taus = [r["tau"] for r in results if r.get("tau")]
    if taus:
        lines += ["", "τ per seed: plateau (where the mean loss flattens) "
                      + ", ".join(f"{t['value']:g}" for t in taus) + "; the paper's (10% of the run) "
                      + ", ".join(f"{t['paper']:g}" for t in taus if t.get("paper") is not None) + "."]
    found = [r for r in results if (r.get("finding") or {}).get("found")]
    lines += ["", f"Runs with a POLCA or first-order POLCA carry cluster of homogeneity >= 0.8, recall >= 0.3, "
                  f">= 3% of the tokens and >= 0.25 above the exact loss: {len(found)} of {len(results)}."]
    signal = [r["signal"] for r in results if r.get("signal")]
    if signal:
        def mean(name, key):
            v = np.array([s_[name][key] for s_ in signal])
            return f"{v.mean():.3f}" + (f" ± {v.std(ddof=1):.3f}" if v.size > 1 else "")
        best_auc = np.array([max(max(a, 1 - a) for a in s_["polca"]["auc"]) for s_ in signal])
        lines += ["", f"Signal check (10s/100s tokens, label carry): majority rate {mean('polca', 'majority')}; "
                      f"linear-classifier accuracy on the exact-loss trajectories {mean('polca', 'accuracy_loss')}, "
                      f"on all POLCA trajectories {mean('polca', 'accuracy_all')}, on all first-order POLCA "
                      f"trajectories {mean('polca_first', 'accuracy_all')}; best single-vector AUC "
                      f"{best_auc.mean():.3f}."]
    ablation = [r["ablation"] for r in results if r.get("ablation")]
    if ablation:
        carry = np.array([a["carry_tokens"] for a in ablation])
        other = np.array([a["other_tokens"] for a in ablation])
        lines += ["", f"Undoing the best POLCA carry vector's movement: mean loss change of 10s/100s carry tokens "
                      f"{carry.mean():+.4f} (seeds: {', '.join(f'{v:+.4f}' for v in carry)}), other tokens "
                      f"{other.mean():+.4f} (seeds: {', '.join(f'{v:+.4f}' for v in other)})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    main()
