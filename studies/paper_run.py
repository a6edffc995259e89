"""The paper's own run on 2 CPU cores: three seeds with Algorithm 1's Hessian basis, three with
appendix H's random basis, and what they show beside the paper's tables.

``run`` trains the runs one after the other with ``make paper``'s command
(``examples/arithmetic.py --paper-cpu``: the paper's model, tokenisation, optimizer, schedule,
10,000 steps, 1,250-problem probe and HDBSCAN settings; the Hessian sample, the vectors and
the snapshot interval trimmed). Every run resumes from its last checkpoint when started
again and a complete one is reused, so the command can be stopped at any moment and run
again. The random basis takes its vectors all at step 0 (appendix H: a random orthonormal
basis, as many vectors as the Hessian runs'): no backfill.

``table`` reads the finished runs (``results.json`` and the analysed stores) and writes
``OUT/table.md`` and the figures beside it:

1. appendix G per run and over seeds: the best 10s/100s carry cluster of every trajectory
   type (homogeneity beside its chance level, recall, F1), the hidden fractions under the
   plateau τ and the paper's τ; the paper's table 8 and 9 beside them;
2. the signal check (is carry information in the trajectories at all) and the neighbourhood
   purity of the 10s/100s carry tokens (how carry-pure the neighbourhoods HDBSCAN sees are);
3. the exact loss per (place, carry) at steps 1,000 / 2,000 / 5,000 / 10,000, beside what
   appendix F's figures show, and ``loss_by_place_carry.png``;
4. which vectors carry what: per vector of each run, its basis step, eigenvalue, movement,
   the loss it allocates to 10s/100s carries against the other 10s/100s tokens, and its
   best carry cluster;
5. ``best_carry_cluster.png``: the best POLCA carry cluster over all runs, as the paper's
   figure 4 (its projected loss and its exact loss against the other tokens').

Usage:
    python studies/paper_run.py run --seeds 0 1 2 --bases hessian random --out runs/paper
    python studies/paper_run.py table --out runs/paper
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[0] / "examples"))
sys.path.insert(0, str(HERE))

import arithmetic  # noqa: E402

#: the flags of every run beyond make paper's (the random basis: every vector at step 0)
BASIS_FLAGS = {
    "hessian": [],
    "random": ["--k", str(arithmetic.PAPER_CPU_TRIMS["max_basis"]), "--basis-every", "10000"],
}
def run_dir(out: Path, basis: str, seed: int) -> Path:
    return out / f"{basis}_seed{seed}"


def command(out: Path, basis: str, seed: int) -> list[str]:
    """The flags of one run (``make paper SEED=.. BASIS=..`` is the same for the Hessian basis)."""
    return ["--paper-cpu", "--seed", str(seed), "--basis", basis, "--no-wandb", "--no-bars",
            "--out", str(run_dir(out, basis, seed)), *BASIS_FLAGS[basis]]


def run(args) -> None:
    out = Path(args.out)
    for seed in args.seeds:  # a seed's Hessian run first: its random-basis run reads the weights it keeps
        for basis in sorted(args.bases):
            flags = command(out, basis, seed)
            trajectory = run_dir(out, "hessian", seed) / "results.json"
            if basis == "random" and trajectory.exists() and not args.train_random:
                print(f"== random basis, seed {seed}: along the weight snapshots of {trajectory.parent}", flush=True)
                arithmetic.print_results(along_random_basis(out, seed))
                continue
            print(f"== {basis} basis, seed {seed}: python examples/arithmetic.py {' '.join(flags)}", flush=True)
            arithmetic.print_results(arithmetic.run(arithmetic.parse_args(flags), run_dir(out, basis, seed)))


def along_random_basis(out: Path, seed: int) -> dict:
    """The random-basis run of ``seed`` over the weight snapshots its Hessian run kept."""
    return along_random_basis_of(run_dir(out, "hessian", seed), run_dir(out, "random", seed),
                                 command(out, "random", seed))


def along_random_basis_of(trained: Path, folder: Path, flags: list[str]) -> dict:
    """The example's run of ``flags`` (a random basis) into ``folder``, over the weight
    snapshots of the finished run in ``trained`` instead of training.

    POLCA reads training without changing it, so a run's snapshots are the random-basis
    run's too (``tests/test_checkpoints.py`` checks that a random-basis callback keeps the same
    weights and writes the store this writes): the same trajectory along the other basis,
    without training it again. Killed, it continues at the next snapshot, and its wall and CPU
    time (``time_spent.json``) add up over the processes; a finished one is reused.
    """
    from polca_lightning import from_checkpoints
    from polca_lightning.time_left import Stopwatch

    results = folder / "results.json"
    if results.exists():
        print(f"{folder}: reusing the complete run")
        return json.loads(results.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    args = arithmetic.parse_args(flags)
    weights, store = trained / "polca.zarr", folder / "polca.zarr"
    arithmetic.L.seed_everything(args.seed, verbose=False)
    _, probe, hessian = arithmetic.splits(args)
    model = arithmetic.build_model(args)
    with Stopwatch(folder / "time_spent.json") as clock:  # over every process that resumed it
        arithmetic.addition_callback(  # the example's settings, over the stored snapshots instead of training
            store, probe, hessian, args, callback_class=lambda **kw: from_checkpoints(model, weights, **kw),
            order=args.order, basis="random", lca_directions=args.lca_directions, ablate=not args.no_ablate,
            analysis_kwargs=arithmetic.analysis_settings(args), mode="a" if store.exists() else "w-",
            progress=True, wandb_run=False)  # the bar over the snapshots, with its estimate of the time left
    spent = clock.totals()
    results = arithmetic.write_results(store, {"fit": spent["seconds"], "cpu": spent["cpu_seconds"]})
    results["weights_from"] = str(weights)  # the run whose snapshots these are
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    return results


# ------------------------------------------------------------------------------ measures
def group_masks(ds) -> dict[str, np.ndarray]:
    place, carry = ds["place"].values, ds["carry"].values
    return {"1000s": place == 0, "100s no carry": (place == 1) & (carry == 0), "100s carry": (place == 1) & (carry == 1),
            "10s no carry": (place == 2) & (carry == 0), "10s carry": (place == 2) & (carry == 1), "1s": place == 3}


def loss_by_group(ds) -> dict:
    """Mean and median exact loss per (place, carry) group at every snapshot."""
    loss = ds["loss"].transpose("snapshot", "token").values.astype(float)
    out = {"step": ds["step"].values.astype(int).tolist()}
    for name, sel in group_masks(ds).items():
        out[name] = {"n": int(sel.sum()), "mean": np.nanmean(loss[:, sel], 1).tolist(),
                     "median": np.nanmedian(loss[:, sel], 1).tolist()}
    return out


def vectors(ds) -> list[dict]:
    """Per basis vector: where it came from, how far training moved along it, and what it allocates."""
    place, carry = ds["place"].values, ds["carry"].values
    mid = np.isin(place, (1, 2))
    total = ds["polca"].sum("interval").transpose("basis", "token").values.astype(float)  # [basis, token]
    movement = np.abs(ds["delta"].transpose("interval", "basis").values.astype(float)).sum(0)
    rows = []
    for b in range(ds.sizes["basis"]):
        row = {"vector": b, "basis_step": int(ds["basis_step"][b]), "eigenvalue": float(ds["eigenvalue"][b]),
               "movement": float(movement[b]), "carry": float(np.nanmean(total[b, mid & (carry == 1)])),
               "no_carry": float(np.nanmean(total[b, mid & (carry == 0)])),
               "by_place": [float(np.nanmean(total[b, place == p])) for p in range(4)]}
        rows.append(row)
    return rows


def directional_scale(ds) -> dict:
    """How large the directional derivatives and the movement are along the basis: the median
    over tokens of |g| and the total |δ| per vector (the random-basis diagnosis)."""
    g = np.abs(ds["directional_grad"].values.astype(float))  # [snapshot, basis, token]
    delta = np.abs(ds["delta"].values.astype(float))  # [interval, basis]
    return {"g_median": np.nanmedian(g, axis=(0, 2)).tolist(), "delta_sum": delta.sum(0).tolist(),
            "polca_abs_median": np.nanmedian(np.abs(ds["polca"].values.astype(float)), axis=(0, 2)).tolist()}


def measure(path: Path) -> dict:
    """Everything the table needs from one finished run."""
    from carry_regimes import neighbour_purity

    from polca_lightning.analysis import analyze
    from polca_lightning.report import open_analysed_store

    results = json.loads((path / "results.json").read_text())
    ds = open_analysed_store(path / "polca.zarr")
    train = ds[[v for v in ("loss", "directional_grad", "delta", "polca", "polca_first", "eigenvalue",
                            "basis_vectors", "step", "basis_step") if v in ds]]
    train.attrs.update(ds.attrs)
    config = json.loads(ds.attrs["config"]) if isinstance(ds.attrs.get("config"), str) else ds.attrs.get("config", {})
    settings = json.loads(ds["cluster"].attrs.get("analysis_settings", "{}")) if "cluster" in ds else {}
    hdbscan = {k: settings[k] for k in ("min_cluster_size", "min_samples") if k in settings}
    res = analyze(train, methods=["polca", "polca_first", "loss"], labels=["carry", "place"],
                  restrict=arithmetic.APPENDIX_G_CARRY, entropy_scores=False, **hdbscan)
    # the same clustering of each token's trajectory divided by its root mean square: shapes, not sizes
    shaped = analyze(train, methods=["polca", "polca_first"], labels=["carry", "place"],
                     restrict=arithmetic.APPENDIX_G_CARRY, entropy_scores=False, normalize="token", **hdbscan)
    return {"run": path.name, "basis": config.get("basis"), "seed": config.get("seed"), "results": results,
            "purity": neighbour_purity(train, res), "loss_by_group": loss_by_group(ds), "vectors": vectors(ds),
            "scale": directional_scale(ds), "normalized": best_carry(train, shaped),
            "unfiltered": {t: without_vector_filter(ds, t, hdbscan) for t in ("polca", "polca_first")}}


def without_vector_filter(ds, name: str, hdbscan: dict) -> dict:
    """The best 10s/100s carry cluster of ``name``'s trajectories with every vector clustered:
    the §4.1 token filter (tokens whose projected loss decreases) without its vector filter
    (vectors whose mean projected loss decreases). Where the filter drops a vector that
    allocates carries apart from the rest, this says whether HDBSCAN would have found them."""
    from polca_lightning.analysis import filter_trajectories, projected_loss
    from polca_lightning.analysis.clustering import ClusterSettings, cluster_trajectories
    from polca_lightning.analysis.scores import label_scores

    place, carry = ds["place"].values, ds["carry"].values
    traj = projected_loss(ds[name].transpose("interval", "basis", "token").values)  # [snapshot, basis, token]
    kept, tokens = filter_trajectories(traj, vectors=False)
    settings = ClusterSettings(**hdbscan)
    best: dict = {"dropped_vectors": np.flatnonzero(~kept).tolist()}
    for b in range(traj.shape[1]):
        labels = cluster_trajectories(traj[:, b].T, settings, mask=tokens[b])
        if not (labels >= 0).any():
            continue
        scores = label_scores(labels, carry, values=[1], restrict=np.isin(place, (1, 2)), group=place)
        h = np.where(scores["eligible"][:, 0], scores["homogeneity"][:, 0], np.nan)
        if np.isfinite(h).any() and np.nanmax(h) > best.get("homogeneity", -1.0):
            c = int(np.nanargmax(h))
            best.update(homogeneity=float(h[c]), chance=float(scores["chance"][c, 0]),
                        recall=float(scores["recall"][c, 0]), vector=b, size=int((labels == c).sum()))
    return best


def best_carry(ds, res) -> dict:
    """The best 10s/100s carry cluster per trajectory type of an analysis ``res`` of the store ``ds``."""
    import xarray as xr

    from polca_lightning.report.pipeline import result_variables

    return arithmetic.best_carry_clusters(
        ds.assign({k: xr.Variable(d, v, a) for k, (d, v, a) in result_variables(res, ds).items()}))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["run", "table"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bases", nargs="+", default=["hessian", "random"], choices=["hessian", "random"])
    p.add_argument("--out", default="runs/paper")
    p.add_argument("--train-random", action="store_true",
                   help="train the random-basis runs (default: read along the weight snapshots of the seed's "
                        "finished Hessian run, the same training)")
    p.add_argument("--figures", metavar="DIR",
                   help="table: also copy the two figures into DIR as paper_<name>.png (docs/figures for the docs)")
    args = p.parse_args(argv)
    if args.what == "run":
        run(args)
    else:
        from paper_tables import write_tables

        write_tables(Path(args.out), args.bases, args.seeds, measure, figure_dir=args.figures)


if __name__ == "__main__":
    main()
