"""Where the paper's run spends its time on this machine, and what its untrimmed settings would cost.

    python benchmarks/paper_costs.py                                    # unit costs, the time model's table
    python benchmarks/paper_costs.py --run runs/paper/hessian_seed0     # beside a finished make paper run

On the example's ``--paper`` model (9,475,594 parameters) and its 1,250-problem probe, it
times the unit costs a run is made of: an AdamW step on a batch of 64, the engines'
calibration (seconds per probe batch of 200 problems: forward mode per direction, reverse
mode's base and per direction, as the callback measures them before training), one
Hessian-vector product on the 256-problem Hessian sample of ``make paper`` and on the
paper's 1,250, one eigensolve (the callback's tolerance) on the 256, a weight snapshot
written to a store and read back, and one HDBSCAN clustering of 5,000 trajectories. The
time model of ``benchmarks/device_check.py`` (``_device_costs.predict``) turns them into
the seconds of a run by part: training, the snapshots' derivatives, the eigensolves, the
backfill, the LCA baseline and the analysis; the eigensolves of a 1,250-problem Hessian
sample are the 256-problem eigensolve's products at the 1,250-problem product's cost. At
the initialisation Lanczos converges in a few products; with ``--run`` the eigensolve is
timed again where the run made one (its weights at step 1,000, its earlier vectors
projected out), and the predictions use that one.

It prints, by part and in total, ``make paper`` (the trims of docs/paper.md), the paper's
settings (a snapshot every 20 steps, 50 vectors from a 1,250-problem Hessian sample, LCA
along 50 parameters) and the steps between, each as a ratio to ``make paper``; with
``--run``, the measured totals of a finished run beside the prediction of its settings.
About 4 minutes on 2 idle cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "examples"))

from _device_costs import (Schedule, _clustering, _hvp_and_eigensolve, _store_io, _training_step,  # noqa: E402
                           paper_model, predict, random_directions)
from _device_steps import DEVICE, Setting, addition_batches, seconds  # noqa: E402

from polca_lightning.core.engine import DirectionalDerivatives  # noqa: E402
from polca_lightning.core.functional import ParameterSpace  # noqa: E402
from polca_lightning.core.losses import causal_lm_token_loss  # noqa: E402

#: the runs compared: (name, snapshot_every, vectors, Hessian problems, LCA directions)
SETTINGS = (
    ("make paper (docs/paper.md)", 100, 8, 256, 0),
    ("16 vectors", 100, 16, 256, 0),
    ("every 50 steps", 50, 8, 256, 0),
    ("every 20 steps", 20, 8, 256, 0),
    ("50 vectors, 1,250 Hessian problems", 100, 50, 1250, 0),
    ("the paper (every 20, 50 vectors, 1,250, LCA 50)", 20, 50, 1250, 50),
)
PROBE, STEPS, BASIS_EVERY = 1250, 10_000, 200


def unit_costs(workdir: Path, run: Path | None = None, at_step: int = 1000) -> dict:
    """The unit costs of the paper's model on this machine (seconds). With ``run``, the eigensolve
    is also timed where the run made one (its weights at ``at_step``, its earlier vectors
    projected out): Lanczos needs more products there than at the initialisation."""
    s = Setting(torch.device("cpu"), replace(DEVICE, paper_hessian=256), workdir)
    torch.manual_seed(0)
    model = paper_model(s)
    space = ParameterSpace.from_module(model)
    theta = space.flatten(model)
    probe = addition_batches(PROBE, 10_000, 200, symbols=False)
    costs: dict = {"d": space.dim, "batch_problems": 200}
    start = time.perf_counter()
    costs |= {"train_step": _training_step(model, s.device, 1)["train_step_s"]}
    print(f"  training step (batch 64): {costs['train_step']:.3f} s", flush=True)
    dd = DirectionalDerivatives(model, causal_lm_token_loss, space, engine="auto")
    dd(theta, probe[:1])  # warm-up
    costs["loss_batch"] = seconds(lambda: dd(theta, probe), s.device) / len(probe)
    t0 = time.perf_counter()
    costs |= dd.calibrate(theta, probe[0], max_directions=16)
    costs["calibration"] = time.perf_counter() - t0
    print(f"  per probe batch of 200: loss {costs['loss_batch']:.2f} s, forward mode {costs['forward_per_direction']:.2f} s "
          f"a direction, reverse mode {costs['reverse_base']:.2f} s + {costs['reverse_per_direction']:.2f} s a direction",
          flush=True)
    directions = random_directions(8, space.dim, s.device, seed=8)
    costs["snapshot_8"] = seconds(lambda: dd(theta, probe, directions), s.device)
    engine = min(costs["forward_per_direction"] * 8, costs["reverse_base"] + costs["reverse_per_direction"] * 8)
    print(f"  one snapshot's derivatives along 8 directions over the probe: {costs['snapshot_8']:.1f} s "
          f"(the calibration says {engine * len(probe):.1f} s)", flush=True)
    hessian = addition_batches(256, 20_000, 256, symbols=False)
    eig = _hvp_and_eigensolve(model, space, theta, hessian, s.device, 2)
    costs |= {"hvp": eig["hvp_s"], "eigensolve": eig["eigensolve_s"], "eigensolve_hvps": eig["eigensolve_hvps"]}
    costs["hvp_1250"] = _hvp_and_eigensolve(model, space, theta, addition_batches(1250, 20_000, 256, symbols=False),
                                            s.device, 1, eigensolve=False)["hvp_s"]
    print(f"  Hessian-vector product: {costs['hvp']:.2f} s (256 problems), {costs['hvp_1250']:.2f} s (1,250); "
          f"eigensolve {costs['eigensolve']:.1f} s ({costs['eigensolve_hvps']} products, 256 problems)", flush=True)
    if run is not None:
        costs |= trained_eigensolve(model, space, hessian, run / "polca.zarr", at_step)
        print(f"  eigensolve at step {at_step} of {run}: {costs['eigensolve_trained']:.1f} s "
              f"({costs['eigensolve_trained_hvps']} products, {costs['eigensolve_trained_projected']} vectors "
              "projected out)", flush=True)
    io = _store_io(s, space, theta)
    costs |= {"write_snapshot": io["write_snapshot_s"], "read_snapshot": io["read_snapshot_s"]}
    cl = _clustering(PROBE * 4)
    costs |= {"clustering": cl["clustering_s"], "clustering_tokens": cl["clustering_tokens"]}
    print(f"  weight snapshot: write {costs['write_snapshot']:.2f} s, read {costs['read_snapshot']:.2f} s; "
          f"HDBSCAN of 5,000 trajectories {costs['clustering']:.1f} s", flush=True)
    costs["measured_in_s"] = time.perf_counter() - start
    return costs


def trained_eigensolve(model, space, hessian, store: Path, at_step: int) -> dict:
    """One eigensolve of the callback's (tolerance 1e-3) at a run's snapshot of ``at_step``, its
    earlier vectors projected out, on the 256-problem Hessian sample."""
    from polca_lightning import open_store
    from polca_lightning.checkpoints import load_weights, read_state_dict, store_snapshots

    snapshot = next(s for s in store_snapshots(store) if s.step == at_step)
    load_weights(model, read_state_dict(snapshot), f"the snapshot of step {at_step}")
    ds = open_store(store, analysis=False)
    earlier = ds["basis_step"].values < at_step
    basis = torch.from_numpy(ds["basis_vectors"].values[earlier]).float() if earlier.any() else None
    eig = _hvp_and_eigensolve(model, space, space.flatten(model), hessian, torch.device("cpu"), 1, basis=basis)
    return {"eigensolve_trained": eig["eigensolve_s"], "eigensolve_trained_hvps": eig["eigensolve_hvps"],
            "eigensolve_trained_projected": int(earlier.sum())}


def predictions(costs: dict) -> list[dict]:
    rows = []
    for name, every, vectors, hessian, lca in SETTINGS:
        c = dict(costs)
        if "eigensolve_trained" in costs:  # the eigensolve as the run needs it, not at the initialisation
            c["eigensolve"], c["eigensolve_hvps"] = costs["eigensolve_trained"], costs["eigensolve_trained_hvps"]
        if hessian != 256:  # as many products, each over the larger sample
            c["eigensolve"] = costs["eigensolve"] * costs["hvp_1250"] / costs["hvp"]
            c["hvp"] = costs["hvp_1250"]
        p = predict(STEPS, every, PROBE, lca, True, c, Schedule(basis_every=BASIS_EVERY, max_basis=vectors))
        rows.append({"name": name, "hessian": hessian, **p})
    return rows


def fmt_h(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


PARTS = ("train", "snapshots", "eigensolves", "backfill", "lca", "ablation", "analysis")


def table(rows: list[dict]) -> str:
    base = rows[0]["seconds"]["total"]
    lines = ["| run | snapshots | vectors | " + " | ".join(PARTS) + " | total | × make paper |",
             "|---|---|---|" + "---|" * (len(PARTS) + 2)]
    for r in rows:
        s = r["seconds"]
        lines.append(f"| {r['name']} | {r['snapshots']} | {r['basis']} | "
                     + " | ".join(fmt_h(s[p]) for p in PARTS) + f" | {fmt_h(s['total'])} | {s['total'] / base:.1f} |")
    return "\n".join(lines)


def measured(run: Path, predicted: dict) -> str:
    """A finished run's totals (results.json) beside the prediction of its settings."""
    t = json.loads((run / "results.json").read_text())["timings"]
    fit = t.get("fit", float("nan"))
    snapshots = sum(t.get(k, 0.0) for k in ("interval", "snapshot", "io"))
    known = snapshots + t.get("eigensolve", 0.0) + t.get("backfill", 0.0) + t.get("setup", 0.0)
    s = predicted["seconds"]
    rows = [("snapshots (derivatives and writes)", snapshots, s["snapshots"] + s["snapshot_writes"]),
            ("eigensolves", t.get("eigensolve", float("nan")), s["eigensolves"]),
            ("backfill", t.get("backfill", float("nan")), s["backfill"]),
            ("training and the rest of fit (the analysis after training included)", fit - known,
             s["train"] + s["start"] + s["after_fit"]),
            ("total", fit, s["total"])]
    lines = [f"{run}: measured (results.json) against predicted", "",
             "| part | measured | predicted | measured / predicted |", "|---|---|---|---|"]
    lines += [f"| {name} | {fmt_h(m)} | {fmt_h(p)} | {m / p:.2f} |" for name, m, p in rows]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", type=Path, help="a finished make paper run (its results.json) to compare with")
    p.add_argument("--out", type=Path, default=Path("runs/paper_costs.json"), help="the costs and predictions (JSON)")
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"unit costs on {torch.get_num_threads()} threads:", flush=True)
    costs = unit_costs(args.out.parent, args.run)
    rows = predictions(costs)
    print("\npredicted seconds of the paper's run, 10,000 steps, 1,250 probe problems, by part:\n")
    print(table(rows))
    if args.run:
        print("\n" + measured(args.run, rows[0]))
    args.out.write_text(json.dumps({"costs": costs, "predictions": rows}, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
