"""Where the carry signal is, per training regime: the signal check and the appendix G table over seeds.

For every arithmetic store given (``examples/arithmetic.py --seeds ... --out runs/regimes/NAME``;
the stores of one regime are the ``seed_*`` folders under one parent), prints and writes:

1. **signal check** (:func:`polca_lightning.analysis.signal_check`) on the 10s/100s-place
   tokens with label ``carry``: the majority rate, the cross-validated accuracy of a
   linear classifier on the exact-loss trajectories, on all POLCA trajectories together,
   the best single vector's accuracy and the best single vector's AUC of its final
   projected loss (as ``max(auc, 1 - auc)``, so 0.5 is no signal whichever the sign);
2. **appendix G** (the paper's protocol: the 85 % rule, outliers excluded) under several
   clustering settings: the best carry cluster of POLCA, first-order POLCA and the exact
   loss (homogeneity, its chance level from the cluster's place mix, recall, share of the
   tokens), and whether the run meets the finding's bar: a POLCA or first-order POLCA
   carry cluster with homogeneity >= 0.8, recall >= 0.3, at least 3 % of the tokens and at
   least 0.25 above the exact-loss baseline;

then the mean ± standard deviation over the seeds of each regime, as a markdown table.
Nothing is written into the stores.

Usage:
    python examples/arithmetic.py --seeds 0 1 2 --out runs/regimes/default --no-wandb --lca-directions 0
    python studies/carry_regimes.py runs/regimes/*/seed_*/polca.zarr --out runs/regimes/table.md
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

import sys

from polca_lightning import open_store
from polca_lightning.analysis import METHODS as SPECS
from polca_lightning.analysis import analyze, complete_snapshots, reduce_trajectories, signal_check

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from arithmetic import finding  # noqa: E402  (the bar a run must clear, one definition)

TRAINING = ("loss", "directional_grad", "delta", "polca", "polca_first", "eigenvalue", "basis_vectors")
RESTRICT = {"carry": ("place", (1, 2))}
#: clustering settings compared (analyze's keyword arguments)
SETTINGS = {
    "default": {},
    "whole trajectories, no PCA": {"n_components": None, "time_points": None},
    "paper's min_samples = tokens/15": {"min_samples": 1 / 15},
    "min_cluster_size 1%, min_samples 5": {"min_cluster_size": 0.01, "min_samples": 5},
}
METHODS = ("polca", "polca_first", "loss")


def signal_figures(ds) -> dict:
    where = ds["place"].isin([1, 2])
    out = {}
    for method in ("polca", "polca_first"):
        s = signal_check(ds, "carry", where=where, method=method)
        auc = np.asarray(s["auc"].values, dtype=float)
        out[method] = {"majority": float(s["majority"]), "accuracy_loss": float(s["accuracy_loss"]),
                       "accuracy_all": float(s["accuracy_all"]),
                       "accuracy_best": float(np.nanmax(s["accuracy"].values)),
                       "auc_best": float(np.nanmax(np.maximum(auc, 1 - auc)))}
    return out


def neighbour_purity(ds, res, k: int = 10) -> dict:
    """How carry-pure the neighbourhoods HDBSCAN sees are, per trajectory type.

    For each clustering (vector; one for the exact loss), on the tokens it clustered, in
    the space it clustered in (64 time blocks, 10 principal components): the mean fraction
    of carry tokens among the ``k`` nearest neighbours of the 10s/100s carry tokens, beside
    the carry rate of those tokens (what random neighbours give). A density cluster of
    homogeneity h needs neighbourhoods about that pure; the best vector is reported.
    """
    from sklearn.neighbors import NearestNeighbors

    carry = ds["carry"].values == 1
    target = carry & ds["place"].isin([1, 2]).values
    out = {}
    for m in METHODS:
        spec = SPECS[m]
        p = spec.prefix
        labels = np.atleast_2d(res[p + "cluster"].values)  # [unit, token]
        best = (np.nan, np.nan, -1)
        for u in range(labels.shape[0]):
            tok = labels[u] != -2  # clustered (outlier or cluster)
            if (target & tok).sum() < k or tok.sum() <= k:
                continue
            traj = spec.trajectory(ds, u, complete_snapshots(ds))
            x = reduce_trajectories(np.asarray(traj)[:, tok].T)
            _, idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x[target[tok]])
            purity = carry[tok][idx[:, 1:]].mean()
            if not purity <= best[0]:
                best = (float(purity), float(carry[tok].mean()), u)
        out[m] = {"purity": best[0], "rate": best[1], "unit": best[2]}
    return out


def best_carry(res, method: str) -> dict:
    """The best eligible carry cluster of ``method`` (rank 0 of ``carry_best``), or empty."""
    e = int(res["carry_best"].sel(trajectory_type=method, carry_value=1, rank=0))
    if e < 0:
        return {}
    n_tokens = res.sizes["token"]
    out = {"homogeneity": float(res["carry_homogeneity"].sel(carry_value=1)[e]),
           "recall": float(res["carry_recall"].sel(carry_value=1)[e]),
           "share": float(res["entry_size"][e]) / n_tokens, "unit": int(res["entry_unit"][e]),
           "size": int(res["entry_size"][e])}
    if "carry_chance" in res:
        out["chance"] = float(res["carry_chance"].sel(carry_value=1)[e])
    return out


def store_figures(path: str) -> dict:
    store = open_store(path)
    ds = store[[v for v in TRAINING if v in store]]
    ds.attrs.update(store.attrs)
    out = {"store": path, "signal": signal_figures(ds), "clusters": {}}
    for name, kwargs in SETTINGS.items():
        start = time.perf_counter()
        res = analyze(ds, methods=list(METHODS), labels=["carry", "place"], restrict=RESTRICT,
                      entropy_scores=False, **kwargs)
        best = {m: best_carry(res, m) for m in METHODS}
        best["found"] = finding(best)["found"]  # the example's bar (FINDING_BAR)
        best["seconds"] = time.perf_counter() - start
        out["clusters"][name] = best
        if name == "default":
            out["purity"] = neighbour_purity(ds, res)
    return out


def _cell(values) -> str:
    """Mean ± sample sd of the finite values; ``(n of N)`` when some seeds have none (no
    eligible cluster), ``-`` when none has one."""
    values = list(values)
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    v = v[np.isfinite(v)]
    if not v.size:
        return "-"
    text = f"{v.mean():.2f} ± {v.std(ddof=1):.2f}" if v.size > 1 else f"{v[0]:.2f}"
    return text + (f" ({v.size} of {len(values)})" if v.size < len(values) else "")


def tables(figures: list[dict]) -> str:
    by_regime = defaultdict(list)
    for f in figures:
        by_regime[Path(f["store"]).parent.parent.name].append(f)
    lines = ["Signal check (10s/100s tokens, label carry; mean ± sd over seeds):", "",
             "| regime | seeds | majority | exact-loss accuracy | POLCA all-vector accuracy | best vector accuracy "
             "| best vector AUC | first-order all-vector accuracy |", "|---|---|---|---|---|---|---|---|"]
    for regime, fs in by_regime.items():
        s = [f["signal"]["polca"] for f in fs]
        s1 = [f["signal"]["polca_first"] for f in fs]
        lines.append(f"| {regime} | {len(fs)} | {_cell(x['majority'] for x in s)} | "
                     f"{_cell(x['accuracy_loss'] for x in s)} | {_cell(x['accuracy_all'] for x in s)} | "
                     f"{_cell(x['accuracy_best'] for x in s)} | {_cell(x['auc_best'] for x in s)} | "
                     f"{_cell(x['accuracy_all'] for x in s1)} |")
    lines += ["", "Best carry cluster (appendix G, 85 % rule; homogeneity / its chance level / recall / share "
                  "of tokens; mean ± sd over seeds) and the runs meeting the bar:", "",
              "| regime | clustering | exact loss | first-order POLCA | POLCA | runs meeting the bar |",
              "|---|---|---|---|---|---|"]
    for regime, fs in by_regime.items():
        for name in SETTINGS:
            cells = []
            for m in ("loss", "polca_first", "polca"):
                cs = [f["clusters"][name][m] for f in fs]
                cells.append(" / ".join(_cell(c.get(k) for c in cs) for k in ("homogeneity", "chance", "recall", "share")))
            found = sum(f["clusters"][name]["found"] for f in fs)
            lines.append(f"| {regime} | {name} | " + " | ".join(cells) + f" | {found} of {len(fs)} |")
    lines += ["", "Neighbourhoods HDBSCAN clusters in (default reduction): the share of carries among the 10 nearest "
                  "neighbours of the 10s/100s carry tokens, on the best vector, beside the carry rate of the tokens "
                  "clustered (mean ± sd over seeds):", "",
              "| regime | exact loss | first-order POLCA | POLCA |", "|---|---|---|---|"]
    for regime, fs in by_regime.items():
        cells = [" / ".join(_cell(f["purity"][m][k] for f in fs) for k in ("purity", "rate"))
                 for m in ("loss", "polca_first", "polca")]
        lines.append(f"| {regime} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def measure_stores(stores: list[str], out: str | None, measure=store_figures, verb: str = "measuring") -> list[dict]:
    """``measure`` of each store, in order. With ``out``, the figures are kept in ``out``'s
    ``.json`` after every store (a long run keeps what it measured) and the stores already
    there are not measured again."""
    cache = Path(out).with_suffix(".json") if out else None
    done = {f["store"]: f for f in json.loads(cache.read_text())} if cache and cache.exists() else {}
    figures = []
    for i, path in enumerate(stores, 1):
        if path not in done:
            print(f"[{i}/{len(stores)}] {verb} {path}", flush=True)
        figures.append(done.get(path) or measure(path))
        if cache:
            cache.write_text(json.dumps(list({**done, **{f["store"]: f for f in figures}}.values()), indent=1))
    return figures


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stores", nargs="+")
    p.add_argument("--out", help="write the tables (markdown) here and the figures beside it as JSON "
                                 "(stores already in that JSON are not measured again)")
    args = p.parse_args(argv)
    figures = measure_stores(args.stores, args.out)
    text = tables(figures)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
