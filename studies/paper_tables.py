"""The tables and figures of ``studies/paper_run.py table``: the paper's run over seeds and bases.

Kept apart from the runs so that the tables can be drawn again from the finished runs'
measures (``OUT/figures.json``) without training or measuring anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

import arithmetic
from carry_regimes import measure_stores

TYPES = ("polca", "polca_first", "loss", "loss_change", "fisher", "lca")
GROUPS = ("1000s", "100s no carry", "100s carry", "10s no carry", "10s carry", "1s")
CHECK_STEPS = (500, 1000, 1500, 2000, 3000, 5000, 10000)


def _num(v, digits=3) -> str:
    return "-" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{digits}f}"


def _mean_sd(values) -> str:
    v = np.array([np.nan if x is None else x for x in values], dtype=float)
    n = len(v)
    v = v[np.isfinite(v)]
    if not v.size:
        return "-"
    text = f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if v.size > 1 else f"{v[0]:.3f}"
    return text + (f" ({v.size} of {n})" if v.size < n else "")


def appendix_g_rows(figures: list[dict]) -> list[str]:
    """One row per run: per trajectory type, the best carry cluster's homogeneity (chance level)."""
    lines = ["| run | " + " | ".join(arithmetic.TYPE_NAMES[t] for t in TYPES) + " | bar met |",
             "|---|" + "---|" * len(TYPES) + "---|"]
    for f in figures:
        carry = f["results"].get("carry", {})
        cells = []
        for t in TYPES:
            c = carry.get(t) or {}
            cells.append(f"{_num(c.get('homogeneity'))} ({_num(c.get('chance'))})" if c.get("homogeneity") is not None
                         else "-")
        met = (f["results"].get("finding") or {}).get("found")
        lines.append(f"| {f['run']} | " + " | ".join(cells) + f" | {'yes' if met else 'no'} |")
    paper = " | ".join(f"{arithmetic.PAPER[t][0]:.3f}" for t in TYPES)
    lines.append(f"| paper (table 8) | {paper} | yes |")
    return lines


def over_seeds(figures: list[dict], basis: str) -> list[str]:
    """Mean ± sd over the seeds of one basis: homogeneity, chance, recall, F1, both hidden fractions."""
    fs = [f for f in figures if f["basis"] == basis]
    lines = [f"**{basis} basis, {len(fs)} seed(s)** (mean ± sd):", "",
             "| trajectories | homogeneity | chance | recall | F1 | hidden, plateau τ | hidden, paper's τ "
             "| paper: homogeneity / recall / F1 / hidden |", "|---|---|---|---|---|---|---|---|"]
    for t in TYPES:
        cs = [(f["results"].get("carry") or {}).get(t) or {} for f in fs]
        if not any(cs):
            continue
        cells = [_mean_sd(c.get(k) for c in cs)
                 for k in ("homogeneity", "chance", "recall", "f1", "hidden_fraction", "hidden_fraction_paper")]
        paper = " / ".join(f"{v:.3f}" for v in arithmetic.PAPER[t])
        lines.append(f"| {arithmetic.TYPE_NAMES[t]} | " + " | ".join(cells) + f" | {paper} |")
    taus = [f["results"].get("tau") or {} for f in fs]
    lines += ["", "τ: plateau " + ", ".join(_num(t.get("value"), 0) for t in taus)
              + "; paper's rule " + ", ".join(_num(t.get("paper"), 0) for t in taus) + "."]
    return lines


def normalized_rows(figures: list[dict]) -> list[str]:
    """Per run, the best carry cluster as analysed, with each token's trajectory normalised, and
    with every vector clustered (no §4.1 vector filter; the vectors it drops in brackets)."""
    lines = ["| run | POLCA | normalised per token | no vector filter (vectors it drops) | first-order "
             "| normalised per token | no vector filter (vectors it drops) |", "|---|---|---|---|---|---|---|"]
    for f in figures:
        cells = []
        for t in ("polca", "polca_first"):
            unfiltered = (f.get("unfiltered") or {}).get(t) or {}
            for c in ((f["results"].get("carry") or {}).get(t) or {}, (f.get("normalized") or {}).get(t) or {},
                      unfiltered):
                cells.append(f"{_num(c.get('homogeneity'))} ({_num(c.get('chance'))})"
                             if c.get("homogeneity") is not None else "no eligible cluster")
            if unfiltered:
                cells[-1] += f" ({', '.join(map(str, unfiltered['dropped_vectors'])) or 'none'})"
        lines.append(f"| {f['run']} | " + " | ".join(cells) + " |")
    return lines


def signal_rows(figures: list[dict]) -> list[str]:
    lines = ["| run | majority | exact loss | POLCA, all vectors | first-order, all vectors | best vector (AUC) "
             "| purity: exact loss | purity: first-order | purity: POLCA | carry rate clustered |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for f in figures:
        s, s1 = f["results"]["signal"]["polca"], f["results"]["signal"]["polca_first"]
        auc = np.array(s["auc"], dtype=float)
        sep = np.maximum(auc, 1 - auc)
        best = f"{max(s['accuracy']):.3f} ({sep.max():.3f})" if len(auc) else "-"
        p = f["purity"]
        lines.append(f"| {f['run']} | {s['majority']:.3f} | {s['accuracy_loss']:.3f} | {s['accuracy_all']:.3f} | "
                     f"{s1['accuracy_all']:.3f} | {best} | {_num(p['loss']['purity'])} | "
                     f"{_num(p['polca_first']['purity'])} | {_num(p['polca']['purity'])} | {_num(p['polca']['rate'])} |")
    return lines


def weights_source(f: dict, figures: list[dict]) -> str | None:
    """The run among ``figures`` whose weight snapshots ``f`` was read along (its store's path
    if none of them), or None for a run that trained."""
    source = f["results"].get("weights_from")
    if source is None:
        return None
    return next((x["run"] for x in figures if (Path(x["store"]) / "polca.zarr").resolve() == Path(source).resolve()), source)


def trainings(figures: list[dict]) -> list[dict]:
    """The runs that trained: a run over another's weight snapshots has that run's losses."""
    return [f for f in figures if "weights_from" not in f["results"]]


def loss_rows(figures: list[dict]) -> list[str]:
    """Mean exact loss per (place, carry) group at CHECK_STEPS and the last step, one row per
    training and step."""
    lines = ["| run | step | " + " | ".join(GROUPS) + " |", "|---|---|" + "---|" * len(GROUPS)]
    for f in trainings(figures):
        lg = f["loss_by_group"]
        step = np.array(lg["step"])
        rows = sorted({int(np.argmin(np.abs(step - s))) for s in CHECK_STEPS if s <= step[-1]} | {len(step) - 1})
        for i in rows:
            lines.append(f"| {f['run']} | {step[i]} | " + " | ".join(f"{lg[g]['mean'][i]:.3f}" for g in GROUPS) + " |")
    return lines


def vector_rows(figures: list[dict], top: int = 4) -> list[str]:
    """Per run, the vectors that allocate the most to 10s/100s carries over the other 10s/100s tokens."""
    lines = ["| run | vector | basis step | eigenvalue | movement Σ|δ| | POLCA, 10s/100s carry | POLCA, 10s/100s no carry "
             "| POLCA by place (1000s, 100s, 10s, 1s) |", "|---|---|---|---|---|---|---|---|"]
    for f in figures:
        rows = sorted(f["vectors"], key=lambda r: r["carry"] - r["no_carry"])[:top]  # most negative: learns carries
        for r in rows:
            lines.append(f"| {f['run']} | {r['vector']} | {r['basis_step']} | {r['eigenvalue']:.3g} | {r['movement']:.3g} "
                         f"| {r['carry']:+.2e} | {r['no_carry']:+.2e} | "
                         + ", ".join(f"{v:+.1e}" for v in r["by_place"]) + " |")
    return lines


def time_rows(figures: list[dict]) -> list[str]:
    """Per run: the command that made it, its wall and CPU time."""
    lines = ["| run | command | wall time | CPU time |", "|---|---|---|---|"]
    for f in figures:
        r, t = f["results"], f["results"]["timings"]
        seed = r.get("seed")
        if "weights_from" in r:
            made = (f"`python studies/paper_run.py run --seeds {seed} --bases random` (over "
                    f"{weights_source(f, figures)}'s weight snapshots, no training)")
        elif f["basis"] == "hessian":
            made = f"`make paper SEED={seed}`"
        else:
            made = f"`python studies/paper_run.py run --seeds {seed} --bases random --train-random`"
        cpu = "not measured" if t.get("cpu") is None else f"{t['cpu'] / 3600:.1f} h"
        lines.append(f"| {f['run']} | {made} | {_num(t.get('fit', float('nan')) / 3600, 1)} h | {cpu} |")
    return lines


def loss_figure(figures: list[dict], path: Path) -> None:
    """Mean exact loss per (place, carry) group over training, one panel per training (a run
    over another's weight snapshots shares its panel), beside appendix F's readings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = trainings(figures)
    fig, axes = plt.subplots(1, len(trained), figsize=(5 * len(trained), 4.2), squeeze=False, sharey=True)
    colours = dict(zip(GROUPS, plt.cm.tab10.colors))
    for ax, f in zip(axes[0], trained):
        lg = f["loss_by_group"]
        for g in GROUPS:
            ax.plot(lg["step"], lg[g]["mean"], color=colours[g], lw=1.2, label=g,
                    ls="--" if "carry" in g and "no" not in g else "-")
        ax.scatter([1000, 1000], [0.5, 0.6], marker="x", color="k", zorder=5, label="appendix F, step 1,000 (read off)")
        ax.set_xlim(0, min(5000, lg["step"][-1]))
        ax.set_xlabel("step")
        shared = [x["run"] for x in figures if weights_source(x, figures) == f["run"]]
        ax.set_title(f"seed {f['results'].get('seed')}: {f['run']}" + (f" and {', '.join(shared)}" if shared else ""),
                     fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("exact loss")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("mean exact loss per place and carry on the probe", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def best_cluster_figure(out: Path, figures: list[dict], path: Path) -> dict | None:
    """The paper's figure 4 for the best POLCA carry cluster over the runs: its projected loss
    along its vector and its exact loss, against the other tokens of the 10s/100s places."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from polca_lightning.report import open_analysed_store

    ranked = [(f["results"]["carry"]["polca"]["homogeneity"], f) for f in figures
              if (f["results"].get("carry") or {}).get("polca", {}).get("homogeneity") is not None]
    if not ranked:
        return None
    _, f = max(ranked, key=lambda x: x[0])
    ds = open_analysed_store(out / f["run"] / "polca.zarr")
    e = int(ds["carry_best"].sel(trajectory_type="polca", carry_value=1, rank=0))
    unit, cluster = int(ds["entry_unit"][e]), int(ds["entry_cluster"][e])
    members = ds["cluster"].values[unit] == cluster
    place, carry = ds["place"].values, ds["carry"].values
    mid = np.isin(place, (1, 2))
    step = ds["step"].values
    projected = np.concatenate([np.zeros((1, ds.sizes["token"])),
                                np.cumsum(ds["polca"].isel(basis=unit).transpose("interval", "token").values, 0)])
    loss = ds["loss"].transpose("snapshot", "token").values
    groups = {"the cluster": members, "other 10s/100s carries": mid & (carry == 1) & ~members,
              "10s/100s without a carry": mid & (carry == 0) & ~members}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (name, sel), colour in zip(groups.items(), ("C3", "C1", "C0")):
        for ax, values in zip(axes, (projected, loss)):
            q = np.nanpercentile(values[:, sel], [25, 50, 75], axis=1)
            ax.plot(step, q[1], color=colour, label=f"{name} ({int(sel.sum())})")
            ax.fill_between(step, q[0], q[2], color=colour, alpha=0.2)
    c = f["results"]["carry"]["polca"]
    axes[0].set_title(f"{f['run']}: POLCA vector {unit}, projected loss (median, IQR)")
    axes[1].set_title(f"exact loss; cluster homogeneity {c['homogeneity']:.3f} (chance {c['chance']:.3f})")
    for ax in axes:
        ax.set_xlim(0, min(4000, step[-1]))  # the paper's plots stop at step 4,000
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return {"run": f["run"], "vector": unit, "cluster": cluster, "size": int(members.sum())}


def write_tables(out: Path, bases, seeds, measure, figure_dir: str | None = None) -> str:
    runs = [out / f"{b}_seed{s}" for b in bases for s in seeds if (out / f"{b}_seed{s}" / "results.json").exists()]
    if not runs:
        raise SystemExit(f"no finished run under {out} (studies/paper_run.py run first)")
    figures = measure_stores([str(r) for r in runs], str(out / "figures.md"),
                             measure=lambda p: {"store": p, **measure(Path(p))})
    loss_figure(figures, out / "loss_by_place_carry.png")
    best = best_cluster_figure(out, figures, out / "best_carry_cluster.png")
    lines = [f"# The paper's run on 2 CPU cores: {len(figures)} run(s)", "",
             "Best 10s/100s carry cluster per trajectory type (appendix G, 85 % rule, outliers excluded): "
             "homogeneity (its chance level: the carry rate of the cluster's mix of places):", "",
             *appendix_g_rows(figures), ""]
    for basis in bases:
        if any(f["basis"] == basis for f in figures):
            lines += [*over_seeds(figures, basis), ""]
    lines += ["Signal check (10s/100s tokens, label carry: cross-validated accuracy of a linear classifier) and "
              "neighbourhood purity (share of carries among the 10 nearest neighbours of the 10s/100s carry tokens, "
              "best vector):", "", *signal_rows(figures), "",
              "Best carry cluster (homogeneity, chance) with HDBSCAN on the trajectories as they are, on each "
              "token's trajectory divided by its root mean square (`normalize=\"token\"`: shapes, not sizes), and on "
              "every vector's decreasing tokens without the §4.1 vector filter:", "",
              *normalized_rows(figures), "",
              "Mean exact loss per (place, carry) group:", "", *loss_rows(figures), "",
              "The vectors that allocate the most loss decrease to 10s/100s carries beyond the other 10s/100s tokens "
              "(POLCA summed over training, mean per token):", "", *vector_rows(figures), "",
              "What each run took on 2 cores (`Trainer.fit`: the training, everything POLCA does during it and "
              "the analysis after; wall time over every process of a resumed run, the cores shared with other jobs "
              "for part of it):", "", *time_rows(figures)]
    if best:
        lines += ["", f"best_carry_cluster.png: {best['run']}, vector {best['vector']}, cluster {best['cluster']} "
                      f"({best['size']} tokens)."]
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    if figure_dir:  # the copies the docs show
        Path(figure_dir).mkdir(parents=True, exist_ok=True)
        for name in ("loss_by_place_carry.png", "best_carry_cluster.png"):
            if (out / name).exists():
                shutil.copyfile(out / name, Path(figure_dir) / f"paper_{name}")
    print(text)
    return text
