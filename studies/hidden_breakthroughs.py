"""Hidden breakthroughs in arithmetic runs: which clusters learn after the mean loss is flat.

For every store given (``examples/arithmetic.py ... --out runs/regimes/NAME/seed_S``), runs
the analysis with τ where the mean exact loss flattens (``tau="plateau"``) and the appendix G
carry restriction, and reports

1. the hidden-breakthrough fraction per trajectory type (clusters whose onset, Eq. 9 on
   the cluster's mean curve, is after τ), under the plateau rule and under the paper's τ
   (10 % of the run), beside the paper's table 9;
2. every hidden cluster of POLCA, first-order POLCA and the exact loss: its vector, size, onset, the
   (place, carry) group most of its tokens belong to and that group's share, and how much
   of it the exact loss's own hidden clusters hold (``covered``: the share of its tokens
   inside a hidden exact-loss cluster). A hidden POLCA cluster with ``covered`` below 0.5
   is **a late group that the exact-loss clusters miss**;
3. per (place, carry) group, the share of its loss decrease that comes after τ, beside the
   mean loss's (which is at most the plateau rule's 5 % by construction): the group that
   learns after the mean loss is flat, if there is one;

then the same over seeds, per regime (the stores of one regime are the ``seed_*`` folders
under one parent), and a figure per regime (``--figure-dir``): the mean exact loss of each
(place, carry) group of the 10s and 100s places over training, the overall mean, and both τs.

Usage:
    python studies/hidden_breakthroughs.py runs/regimes/slow/seed_*/polca.zarr --out runs/regimes/hidden.md \\
        --figure-dir docs/figures
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from polca_lightning import open_store
from polca_lightning.analysis import METHODS as SPECS
from polca_lightning.analysis import analyze

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from arithmetic import PAPER, TYPE_NAMES  # noqa: E402  (the paper's table 9, one definition)
from carry_regimes import measure_stores  # noqa: E402  (the per-store loop that keeps what it measured)

RESTRICT = {"carry": ("place", (1, 2))}
PLACES = ("1000s", "100s", "10s", "1s")
#: a POLCA cluster counts as missed by the exact loss when less than this share of it is in
#: a hidden exact-loss cluster
COVERED = 0.5


def _groups(ds) -> tuple[np.ndarray, list[str]]:
    """Each token's (place, carry) group index and the groups' names."""
    place, carry = ds["place"].values.astype(int), ds["carry"].values.astype(int)
    names = [f"{PLACES[p]}, {'carry' if c else 'no carry'}" for p in range(4) for c in (0, 1)]
    return place * 2 + carry, names


def late_share(loss: np.ndarray, step: np.ndarray, tau: float) -> float:
    """Share of a curve's total decrease (first snapshot to its minimum) that comes after τ."""
    total = loss[0] - loss.min()
    if total <= 0:
        return float("nan")
    at_tau = np.interp(tau, step, loss)
    return float(max(at_tau - loss[step >= tau].min(), 0.0) / total)


def store_figures(path: str) -> dict:
    store = open_store(path)
    ds = store[[v for v in ("loss", "directional_grad", "delta", "polca", "polca_first", "eigenvalue",
                            "lca_polca", "lca_parameter") if v in store]]
    ds.attrs.update(store.attrs)
    res = analyze(ds, labels=["carry", "place"], restrict=RESTRICT, tau="plateau", entropy_scores=False)
    step = np.asarray(ds["step"].values[: res.sizes["snapshot"]], dtype=float)
    tau, tau_paper = float(res["tau"]), float(res["tau_paper"])
    types = [str(t) for t in res["trajectory_type"].values]
    em, eu, ec = (np.asarray(res[k].values) for k in ("entry_method", "entry_unit", "entry_cluster"))
    onset, hidden = np.asarray(res["entry_onset"].values), np.asarray(res["entry_hidden"].values, dtype=bool)
    out = {"store": path, "tau": tau, "tau_paper": tau_paper, "steps": [float(step[0]), float(step[-1])],
           "clusters": {}, "late_share": {}}
    for name in ("hidden_fraction", "hidden_fraction_paper"):
        out[name] = {t: None if np.isnan(v) else float(v) for t, v in zip(types, res[name].values.tolist())}
    group, names = _groups(ds)
    loss_labels = np.asarray(res["loss_cluster"].values).ravel()
    hidden_loss = {int(c) for m, c, h in zip(em, ec, hidden) if m == "loss" and h}
    in_hidden_loss = np.isin(loss_labels, sorted(hidden_loss))
    for t in ("polca", "polca_first", "loss"):
        labels = np.atleast_2d(res[SPECS[t].prefix + "cluster"].values)
        rows = []
        for e in np.flatnonzero((em == t) & hidden):
            members = labels[eu[e]] == ec[e]
            counts = np.bincount(group[members], minlength=len(names))
            g = int(counts.argmax())
            rows.append({"vector": int(eu[e]), "cluster": int(ec[e]), "size": int(members.sum()),
                         "onset": float(onset[e]), "group": names[g], "group_share": float(counts[g] / members.sum()),
                         "covered": float(in_hidden_loss[members].mean())})
        out["clusters"][t] = rows
    loss = np.asarray(ds["loss"].values[: step.size], dtype=float)  # [snapshot, token]
    out["late_share"]["mean loss"] = late_share(loss.mean(axis=1), step, tau)
    out["curves"] = {"step": step.tolist(), "mean": loss.mean(axis=1).tolist()}
    for gi, name in enumerate(names):
        if (group == gi).any():
            curve = loss[:, group == gi].mean(axis=1)
            out["late_share"][name] = late_share(curve, step, tau)
            out["curves"][name] = curve.tolist()
    return out


def missed(f: dict, method: str = "polca") -> list[dict]:
    """The hidden clusters of ``method`` that the exact loss's hidden clusters do not hold."""
    return [c for c in f["clusters"][method] if c["covered"] < COVERED]


def _cell(values) -> str:
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    ok = v[np.isfinite(v)]
    if not ok.size:
        return "-"
    return f"{ok.mean():.3f} ± {ok.std(ddof=1):.3f}" if ok.size > 1 else f"{ok[0]:.3f}"


def tables(figures: list[dict]) -> str:
    by_regime = defaultdict(list)
    for f in figures:
        by_regime[Path(f["store"]).parent.parent.name].append(f)
    lines = []
    for regime, fs in by_regime.items():
        taus = ", ".join(f"{f['tau']:g}" for f in fs)
        taus_paper = ", ".join(f"{f['tau_paper']:g}" for f in fs)
        lines += [f"### {regime}: {len(fs)} seeds, τ (plateau) = {taus}; the paper's τ = {taus_paper}", "",
                  "| trajectories clustered | hidden fraction, τ plateau | hidden fraction, paper's τ (10 %) "
                  "| paper (table 9) |", "|---|---|---|---|"]
        for t, name in TYPE_NAMES.items():
            if not any(t in f["hidden_fraction"] for f in fs):
                continue
            lines.append(f"| {name} | {_cell(f['hidden_fraction'].get(t) for f in fs)} | "
                         f"{_cell(f['hidden_fraction_paper'].get(t) for f in fs)} | {PAPER[t][3]:.3f} |")
        lines += ["", "Hidden clusters (τ plateau) of POLCA and of the exact loss: vector, cluster, size, onset, the "
                      "(place, carry) group most of it belongs to, and the share of it inside a hidden exact-loss "
                      "cluster:", "",
                  "| seed | trajectories | vector | cluster | size | onset | main group (share) "
                  "| in a hidden exact-loss cluster |", "|---|---|---|---|---|---|---|---|"]
        for f in fs:
            seed = Path(f["store"]).parent.name
            for t in ("polca", "loss"):
                for c in f["clusters"][t]:
                    vector = c["vector"] if t != "loss" else "-"
                    lines.append(f"| {seed} | {TYPE_NAMES[t]} | {vector} | {c['cluster']} | {c['size']} | "
                                 f"{c['onset']:g} | {c['group']} ({c['group_share']:.2f}) | {c['covered']:.2f} |")
                if not f["clusters"][t]:
                    lines.append(f"| {seed} | {TYPE_NAMES[t]} | - | - | - | - | none hidden | - |")
        n_missed = sum(bool(missed(f)) for f in fs)
        lines += ["", f"Seeds where POLCA flags a late group that the exact-loss clusters miss (a hidden POLCA "
                      f"cluster less than {COVERED:.0%} inside hidden exact-loss clusters): {n_missed} of {len(fs)}.",
                  "", "Share of each group's loss decrease that comes after τ (plateau), mean ± sd over seeds:", "",
                  "| group | late share |", "|---|---|"]
        for g in fs[0]["late_share"]:
            lines.append(f"| {g} | {_cell(f['late_share'].get(g) for f in fs)} |")
        lines.append("")
    return "\n".join(lines)


def figure(fs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(fs), figsize=(4.4 * len(fs), 3.6), squeeze=False, constrained_layout=True)
    for ax, f in zip(axes[0], fs):
        c = f["curves"]
        for i, name in enumerate(n for n in c if n.startswith(("100s", "10s"))):
            ax.plot(c["step"], c[name], color=f"C{i}", linewidth=1.2, label=name)
        ax.plot(c["step"], c["mean"], color="k", linewidth=1.8, label="mean, all tokens")
        ax.axvline(f["tau"], color="k", linestyle=":", label=f"τ = {f['tau']:g} (plateau: mean loss flat)")
        ax.axvline(f["tau_paper"], color="0.5", linestyle="--", label=f"τ = {f['tau_paper']:g} (paper: 10% of the run)")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("mean exact loss")
        ax.set_title(Path(f["store"]).parent.name, fontsize=9)
        ax.legend(fontsize=6, loc="upper right")
    fig.suptitle(f"{Path(fs[0]['store']).parent.parent.name}: exact loss of the 10s/100s-place groups", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stores", nargs="+")
    p.add_argument("--out", help="the markdown tables; the per-store figures beside it as JSON (reused)")
    p.add_argument("--figure-dir", help="write one PNG per regime here (hidden_<regime>.png)")
    args = p.parse_args(argv)
    figures = measure_stores(args.stores, args.out, store_figures, verb="analysing")
    text = tables(figures)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.figure_dir:
        by_regime = defaultdict(list)
        for f in figures:
            by_regime[Path(f["store"]).parent.parent.name].append(f)
        for regime, fs in by_regime.items():
            figure(fs, Path(args.figure_dir) / f"hidden_{regime}.png")


if __name__ == "__main__":
    main()
