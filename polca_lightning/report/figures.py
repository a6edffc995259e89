"""Figures of an analysed POLCA store. Every function returns a ``matplotlib`` Figure
and never logs or saves it (the reporters do).

Every function takes ``ds``: a store Dataset that also holds the analysis results, i.e.
``open_store(path)`` after :func:`polca_lightning.report.analyze_store` wrote them, or
``store.assign(result_variables(res, store))``. ``unit`` is a basis vector index for
``method`` ``"polca"`` (default), ``"polca_first"`` or ``"fisher"``.

Artists carry a ``gid`` so that tests (and users) can find them:
``"cluster_mean"``, ``"onset"``, ``"tau"``, ``"tau_paper"``, ``"mean_loss"``, ``"allocated"``,
``"real"``, ``"base_share"``, ``"ablation"``, ``"chance"``, ``"reference"``, ``"fixed"``. The τ
line's legend says τ's rule (``"τ = 330 (plateau: mean loss flat)"``, from the attribute
``analysis_tau_rule``).
Bars of the label-composition and App. G figures are ``BarContainer``\\ s, one per label
value (composition) or per rank (App. G).
"""

from __future__ import annotations

import numpy as np

from polca_lightning.analysis.methods import METHODS
from polca_lightning.report.tau_figures import mean_loss_figure, tau_line as _tau_line  # noqa: F401
from polca_lightning.analysis.tables import (  # noqa: F401  (cluster_members, unit_trajectories: also importable from here)
    _check_results, _n_snapshots, _prefix, cluster_members, unit_trajectories,
)
from polca_lightning.report.appendix_g import appendix_g_figure  # noqa: F401  (importable from here too)
from polca_lightning.store.schema import BASIS, BASIS_STEP, EIGENVALUE, LOSS, SNAPSHOT, STEP, TOKEN

__all__ = [
    "mean_loss_figure",
    "projected_loss_figure",
    "exact_loss_figure",
    "label_composition_figure",
    "cluster_targets_figure",
    "coverage_figure",
    "appendix_g_figure",
    "ablation_figure",
    "cluster_members",
    "unit_trajectories",
]


def new_figure(nrows: int = 1, ncols: int = 1, *, width: float = 6.4, height: float = 4.0):
    """A Figure not registered with pyplot (so nothing leaks when reporters drop it)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _steps(ds, n: int) -> np.ndarray:
    return np.asarray(ds[STEP].values[:n], dtype=np.float64)


def _unit_sel(ds, unit, method):
    return {} if METHODS[method].unit_dim is None else {METHODS[method].unit_dim: unit}


def _title(ds, unit, method, what):
    if METHODS[method].unit_dim != BASIS:
        return f"{method}: {what}"
    bits = [f"vector {unit}"]
    if EIGENVALUE in ds.variables and np.isfinite(float(ds[EIGENVALUE].values[unit])):
        bits.append(f"λ={float(ds[EIGENVALUE].values[unit]):.3g}")
    if BASIS_STEP in ds.variables:
        bits.append(f"joined at step {int(ds[BASIS_STEP].values[unit])}")
    return f"{method} {', '.join(bits)}: {what}"


def _onset_lines(ax, ds, unit, method, n_c, colors):
    p = _prefix(method)
    onset = np.asarray(ds[p + "cluster_onset"].isel(_unit_sel(ds, unit, method)).values, dtype=np.float64)
    hidden = np.asarray(ds[p + "hidden"].isel(_unit_sel(ds, unit, method)).values, dtype=bool)
    for c in range(n_c):
        if np.isfinite(onset[c]):
            ax.axvline(onset[c], color=colors[c], linestyle="--", linewidth=1.0, gid="onset",
                       label=f"onset c{c}{' (hidden)' if hidden[c] else ''}")
    _tau_line(ax, ds)


def _legend(ax, fontsize=7, loc="best"):
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize, loc=loc)


def _colors(n):
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def projected_loss_figure(ds, unit: int, *, method: str = "polca", quantiles=(0.25, 0.75)):
    """Mean projected loss of each cluster, with a quantile band over its member tokens.

    One line per cluster (``gid="cluster_mean"``; the analysis' ``cluster_trajectory``),
    a band between the ``quantiles`` of the member trajectories, a dashed vertical line
    at each cluster's onset (``gid="onset"``, Eq. 9) and a dotted one at τ (``gid="tau"``).

    Args:
        ds: store + results Dataset (module docstring).
        unit: basis vector (or the method's unit).
        method: analysis method whose clusters to draw.
        quantiles: lower and upper quantile of the band (25-75 % by default).

    Returns:
        ``matplotlib.figure.Figure``.
    """
    p = _check_results(ds, method)
    labels, n_c = cluster_members(ds, unit, method)
    traj = unit_trajectories(ds, unit, method)  # [snapshot, token]
    step = _steps(ds, traj.shape[0])
    curves = np.asarray(ds[p + "cluster_trajectory"].isel(_unit_sel(ds, unit, method)).values)
    curves = curves[:, : traj.shape[0]]  # [cluster, snapshot]
    fig, axes = new_figure()
    ax = axes[0, 0]
    colors = _colors(n_c)
    for c in range(n_c):
        members = traj[:, labels == c]  # [snapshot, members]
        lo, hi = np.quantile(members, quantiles, axis=1)
        ax.fill_between(step, lo, hi, color=colors[c], alpha=0.2, linewidth=0)
        ax.plot(step, curves[c], color=colors[c], linewidth=2, gid="cluster_mean",
                label=f"cluster {c} (n={members.shape[1]})")
    n_out = int((labels == -1).sum())
    if n_c == 0:
        ax.text(0.5, 0.5, "no clusters", transform=ax.transAxes, ha="center", va="center", color="gray")
    _onset_lines(ax, ds, unit, method, n_c, colors)
    ax.set_xlabel("step")
    ax.set_ylabel("projected loss" if METHODS[method].kind == "projected" else method)
    ax.set_title(_title(ds, unit, method, f"cluster means, {int(quantiles[0] * 100)}-{int(quantiles[1] * 100)}% "
                                          f"bands ({n_out} outliers)"), fontsize=9)
    _legend(ax)
    return fig


def exact_loss_figure(ds, unit: int, *, method: str = "polca"):
    """Mean exact loss of each cluster's tokens (clusters of ``unit``), onsets and τ.

    A hidden breakthrough shows as a cluster whose projected loss drops after τ while
    its exact loss barely moves. Lines: one per cluster (``gid="cluster_mean"``), the
    mean over all tokens (``gid="mean_loss"``), onsets (``gid="onset"``), τ (``gid="tau"``).
    """
    _check_results(ds, method)
    labels, n_c = cluster_members(ds, unit, method)
    n_snap = _n_snapshots(ds, method)
    loss = np.asarray(ds[LOSS].isel(snapshot=slice(0, n_snap)).transpose(SNAPSHOT, TOKEN).values,
                      dtype=np.float64)
    step = _steps(ds, n_snap)
    fig, axes = new_figure()
    ax = axes[0, 0]
    colors = _colors(n_c)
    ax.plot(step, np.nanmean(loss, axis=1), color="gray", linestyle="--", gid="mean_loss", label="all tokens")
    for c in range(n_c):
        ax.plot(step, np.nanmean(loss[:, labels == c], axis=1), color=colors[c], linewidth=2, gid="cluster_mean",
                label=f"cluster {c}")
    _onset_lines(ax, ds, unit, method, n_c, colors)
    ax.set_xlabel("step")
    ax.set_ylabel("exact loss")
    ax.set_title(_title(ds, unit, method, "mean exact loss by cluster"), fontsize=9)
    _legend(ax)
    return fig


def _label_names(ds, labels):
    if labels is not None:
        return list(labels)
    for name in ("cluster",):
        if name in ds.variables and "analysis_labels" in ds[name].attrs:
            return list(ds[name].attrs["analysis_labels"])
    return list(ds.attrs.get("token_labels", []))


def label_composition_figure(ds, unit: int, *, method: str = "polca", labels=None):
    """Label make-up of each cluster of ``unit``: one panel per label, one stacked bar per
    cluster (plus ``out`` for outliers when there are any), stacks = label values, heights
    = fractions of the cluster's tokens (the cluster's homogeneity for each value).

    Each panel holds one ``BarContainer`` per label value, of ``n_clusters (+1)`` bars.
    With no label, a single panel says so.
    """
    _check_results(ds, method)
    names = _label_names(ds, labels)
    cl, n_c = cluster_members(ds, unit, method)
    fig, axes = new_figure(1, max(len(names), 1), width=4.0, height=3.6)
    if not names:
        axes[0, 0].text(0.5, 0.5, "no token labels in this store", ha="center", va="center")
        axes[0, 0].set_axis_off()
        return fig
    columns = list(range(n_c)) + ([-1] if (cl == -1).any() else [])
    ticks = [f"c{c}" if c >= 0 else "out" for c in columns]
    for ax, name in zip(axes[0], names):
        values = np.asarray(ds[name].values)
        uniq = np.unique(values)
        colors = _colors(uniq.size)
        bottom = np.zeros(len(columns))
        for vi, v in enumerate(uniq):
            frac = np.array([np.mean(values[cl == c] == v) if (cl == c).any() else 0.0 for c in columns])
            ax.bar(np.arange(len(columns)), frac, bottom=bottom, color=colors[vi], label=f"{name}={v}")
            bottom += frac
        sizes = [int((cl == c).sum()) for c in columns]
        ax.set_xticks(np.arange(len(columns)), [f"{t}\nn={n}" for t, n in zip(ticks, sizes)], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel("fraction of tokens")
        ax.set_title(name, fontsize=9)
        _legend(ax, fontsize=6, loc="upper right")
    fig.suptitle(_title(ds, unit, method, "label composition"), fontsize=9)
    return fig


def cluster_targets_figure(ds, unit: int, *, method: str = "polca", top: int = 5, decode_target=None,
                           max_clusters: int = 12):
    """The most common target tokens of each cluster of ``unit``, to look at rather than read.

    One panel per cluster (the first ``max_clusters``: cluster ids go by decreasing
    size), one horizontal bar per target among its ``top`` most common
    (:func:`polca_lightning.report.cluster_targets_table`): the bar is the target's share
    of the cluster, the black tick (``gid="base_share"``) its share among all tokens, so a
    bar far right of its tick marks what the cluster is about. Each panel holds one
    ``BarContainer``. Without targets in the store, or without clusters, a single panel
    says so.

    Args:
        ds: store + results Dataset (module docstring).
        unit: basis vector (or the method's unit).
        method: analysis method whose clusters to draw.
        top: targets per cluster.
        decode_target: optional ``token_id -> str`` for the bar labels (default: the id).
        max_clusters: panels drawn at most (a note in the title says when more exist).

    Returns:
        ``matplotlib.figure.Figure``.
    """
    from polca_lightning.report.tables import cluster_targets_table

    _check_results(ds, method)
    table = cluster_targets_table(ds, method, top=top, units=[unit], decode_target=decode_target)
    rows = table.rows if table is not None else []
    col = {name: i for i, name in enumerate(table.columns)} if table is not None else {}
    clusters = sorted({r[col["cluster"]] for r in rows})
    shown = clusters[:max_clusters]
    if not shown:
        fig, axes = new_figure(width=4.0, height=2.0)
        axes[0, 0].text(0.5, 0.5, "no clusters" if table is not None else "no target tokens in this store",
                        ha="center", va="center")
        axes[0, 0].set_axis_off()
        return fig
    ncols = min(len(shown), 4)
    nrows = -(-len(shown) // ncols)
    fig, axes = new_figure(nrows, ncols, width=3.2, height=0.45 * top + 0.9)
    colors = _colors(len(clusters))
    for i, ax in enumerate(axes.flat):
        if i >= len(shown):
            ax.set_axis_off()
            continue
        c = shown[i]
        mine = [r for r in rows if r[col["cluster"]] == c]
        y = top - 1 - np.arange(len(mine))  # most common on top; one slot per rank in every panel
        labels = [r[col["text"]] if "text" in col else str(r[col["target"]]) for r in mine]
        ax.barh(y, [r[col["share"]] for r in mine], color=colors[c], height=0.7)
        ax.scatter([r[col["base_share"]] for r in mine], y, marker="|", s=120, color="black", zorder=3,
                   gid="base_share", label="share of all tokens")
        ax.set_yticks(y, [repr(t)[1:-1] if "text" in col else t for t in labels], fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(-0.5, top - 0.5)
        ax.set_xlabel("share of the cluster", fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title(f"c{c} (n={mine[0][col['cluster_size']]})", fontsize=8)
    _legend(axes.flat[0], fontsize=6, loc="lower right")
    more = f", first {len(shown)} of {len(clusters)} clusters" if len(clusters) > len(shown) else ""
    fig.suptitle(_title(ds, unit, method, f"most common targets per cluster{more}"), fontsize=9)
    return fig


def coverage_figure(coverage: dict):
    """How much of the real loss change the basis explains, per interval.

    Args:
        coverage: the dict of :func:`polca_lightning.report.store_coverage` (per-interval
            arrays ``step``, ``allocated``, ``real``, ``explained``, optional
            ``first_allocated``; ``summary``).

    Returns:
        Figure: left, the mean allocated change ``Σ_b POLCA`` (``gid="allocated"``) and the
        real change (``gid="real"``) per interval, titled with the run's ``ratio`` (the
        share of the real loss change that Σ_b POLCA allocates); right, the fraction
        explained.
    """
    fig, axes = new_figure(1, 2, width=5.0)
    ax, ax2 = axes[0]
    step = np.asarray(coverage["step"], dtype=np.float64)
    ax.plot(step, coverage["real"], color="black", gid="real", label="real Δ loss")
    ax.plot(step, coverage["allocated"], color="tab:blue", gid="allocated", label="Σ_b POLCA")
    if "first_allocated" in coverage:
        ax.plot(step, coverage["first_allocated"], color="tab:orange", linestyle="--", gid="allocated",
                label="Σ_b POLCA (first order)")
    ax.axhline(0, color="gray", linewidth=0.5)
    ax.set_xlabel("interval end step")
    ax.set_ylabel("mean change over tokens")
    ax.set_title(f"coverage: Σ_b POLCA allocates {coverage['summary']['ratio']:.3g} of the real loss change "
                 "over the run", fontsize=9)
    ax.legend(fontsize=7)
    ax2.plot(step, coverage["explained"], color="tab:blue", gid="explained")
    ax2.set_xlabel("interval end step")
    ax2.set_ylabel("1 - SSE / SS (per interval)")
    ax2.set_title("fraction of per-token change explained", fontsize=9)
    return fig


def ablation_figure(ds, unit: int, method: str = "polca"):
    """Per group of tokens of ``unit`` (its clusters, outliers, filtered tokens, all): the
    loss change when the vector's movement is undone, and the loss decrease POLCA
    allocated to it (minus its projected loss at the end), each on its own axis.

    If the direction carries what POLCA says it does, a cluster with a large allocated
    decrease gets a large loss increase when the movement is undone. The two can differ
    by orders of magnitude (undoing one direction of many moves the loss little), so
    they have separate panels with their own scales: the top panel (``axes[0]``) holds
    the loss-change bars (``gid="ablation"``), the bottom one the allocated decrease
    (``gid="allocated"``).

    Args:
        ds: an analysed store with ablation results.
        unit: an ablated basis vector.
        method: ``polca`` or ``polca_first``.

    Returns:
        ``matplotlib.figure.Figure``.

    Raises:
        ValueError: as :func:`polca_lightning.analysis.ablation.ablation_table`.
    """
    from polca_lightning.analysis.ablation import ablation_table

    table = ablation_table(ds, [unit], method)
    col = {c: i for i, c in enumerate(table.columns)}
    names = [row[col["tokens"]] + f"\n({row[col['size']]})" for row in table.rows]
    change = np.array([row[col["loss_change"]] for row in table.rows], dtype=float)  # [group]
    allocated = -np.array([row[col["polca_total"]] for row in table.rows], dtype=float)  # [group]
    fig, axes = new_figure(2, 1, width=max(6.4, 0.9 * len(names) + 2), height=2.6)
    x = np.arange(len(names))
    for ax, values, color, gid, ylabel in (
            (axes[0, 0], change, "tab:red", "ablation", "loss change\nwhen undone"),
            (axes[1, 0], allocated, "tab:blue", "allocated", "loss decrease\nPOLCA allocated")):
        ax.bar(x, values, 0.6, color=color, gid=gid)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel(f"{ylabel}\n(mean per token)", fontsize=8)
        ax.set_xticks(x, names, fontsize=8)
    axes[0, 0].tick_params(labelbottom=False)
    coefficient = float(ds["ablation_coefficient"].values[unit])
    axes[0, 0].set_title(f"{method} vector {unit}: undo the movement along it ({coefficient:+.3g})", fontsize=10)
    return fig
