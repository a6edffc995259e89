"""The App. G comparison (the paper's appendix G, table 8): :func:`appendix_g_table` and
:func:`appendix_g_figure`, the best clusters per label value and trajectory type, each
score beside what it is conditioned on (``conditioning.py``): the restriction in force
for the label (or "none"), the chance level and what it comes from, a warning where
another coordinate fixes the label within the cluster, and the hidden-breakthrough
flags and fractions under each τ of the analysis, named with τ and its rule."""

from __future__ import annotations

import numpy as np

from polca_lightning.analysis.tables import Table, plain_value
from polca_lightning.report.conditioning import (
    chance_basis, chance_text, fixing_coordinates, hidden_views, restriction_text, scored_labels, tau_text,
)

__all__ = ["appendix_g_table", "appendix_g_figure"]


def appendix_g_table(ds) -> Table | None:
    """App. G: for each label value and trajectory type, the top clusters by homogeneity
    (one per unit, among the eligible ones), each with what its score is conditioned on.

    Columns: ``label``, ``value``, ``trajectory_type``, ``rank``, ``unit``, ``cluster``,
    ``size``, ``homogeneity``, ``chance`` (the homogeneity the cluster's composition gives
    alone, ``L_chance``; empty for an analysis without it), ``recall``, ``f1``,
    ``onset``, ``restriction`` (the App. G restriction in force for the label, e.g.
    ``place in [1, 2], over 85%``, or ``none``), ``chance_from`` (what the chance level
    comes from: the restriction's coordinate, whose mix in the cluster it takes, or
    ``base rate``), ``fixed_by`` (the token labels or ``target`` that fix the label within
    the cluster, a warning that the homogeneity says nothing beyond them:
    :func:`polca_lightning.analysis.scores.fixed_by`; empty where none does), then the
    cluster's hidden flag and its trajectory type's hidden fraction under each τ, named
    with τ and its rule
    (``hidden (τ=330, plateau)``, ``hidden_fraction (τ=330, plateau)``, and
    ``hidden_paper (τ=60, paper)``, ``hidden_fraction_paper (τ=60, paper)`` where the
    analysis records the paper's τ).

    Returns:
        The :class:`Table`, or ``None`` without labels.
    """
    labels = [lab for lab in scored_labels(ds) if f"{lab}_best" in ds.variables]
    if not labels:
        return None
    views = hidden_views(ds)
    columns = (["label", "value", "trajectory_type", "rank", "unit", "cluster", "size", "homogeneity", "chance",
                "recall", "f1", "onset", "restriction", "chance_from", "fixed_by"]
               + [v.flag_column for v in views] + [v.fraction_column for v in views])
    types = [str(t) for t in np.asarray(ds["trajectory_type"].values)]
    eu, ec = np.asarray(ds["entry_unit"].values), np.asarray(ds["entry_cluster"].values)
    size, onset = np.asarray(ds["entry_size"].values), np.asarray(ds["entry_onset"].values)
    rows = []
    for lab in labels:
        best = np.asarray(ds[f"{lab}_best"].values)  # [type, value, rank]
        values = np.asarray(ds[f"{lab}_value"].values)
        scores = {k: np.asarray(ds[f"{lab}_{k}"].values) for k in ("homogeneity", "recall", "f1")}
        scores["chance"] = (np.asarray(ds[f"{lab}_chance"].values) if f"{lab}_chance" in ds.variables
                            else np.full_like(scores["homogeneity"], np.nan))
        shown = sorted({int(e) for e in best.ravel() if e >= 0})
        fixed = dict(zip(shown, fixing_coordinates(ds, lab, shown)))
        where, basis = restriction_text(ds, lab), chance_basis(ds, lab)
        for vi, v in enumerate(values):
            for ti, t in enumerate(types):
                for r, e in enumerate(best[ti, vi]):
                    if e < 0:
                        continue
                    row = [lab, v, t, r, eu[e], ec[e], size[e], scores["homogeneity"][e, vi],
                           scores["chance"][e, vi], scores["recall"][e, vi], scores["f1"][e, vi], onset[e],
                           where, basis, ", ".join(fixed[int(e)]) or None]
                    row += [None if view.entry is None else bool(view.entry[e]) for view in views]
                    row += [view.fraction.get(t) for view in views]
                    rows.append([plain_value(x) for x in row])
    return Table(columns, rows)


def appendix_g_figure(ds, label: str, value=None, *, reference: dict | None = None,
                      reference_name: str = "paper"):
    """App. G comparison: best homogeneity for ``label == value`` per trajectory type,
    each bar beside what it is conditioned on.

    One ``BarContainer`` per rank (the top clusters, one per unit), one bar per
    trajectory type. Beside each bar a grey stick (``gid="chance"``) rises to the
    cluster's chance level (its mix of the restriction's coordinate, or the label's base
    rate without a restriction); a bar whose label another coordinate fixes within the
    cluster (:func:`polca_lightning.analysis.scores.fixed_by`, e.g. carries at the 1000s
    place, fixed by place and target digit) is hatched, and a note says by what
    (``gid="fixed"``).
    ``reference`` figures (a paper's) are drawn as black marks over the bars
    (``gid="reference"``). The title names the restriction in force for the label (or
    "none") and τ with its rule; each trajectory type's hidden-breakthrough fraction is
    under its name, under every τ the analysis has (its own, and the paper's 10 % of
    the run where it records it).

    Args:
        ds: store + results Dataset (module docstring).
        label: a scored token label (``carry``).
        value: the label value (default: its largest, ``carry=1``).
        reference: ``{trajectory type: homogeneity}`` or ``{trajectory type: [homogeneity
            per rank]}`` to draw beside the bars (e.g. the paper's table 8; see
            ``examples/arithmetic.py``); types the analysis lacks are left out.
        reference_name: the reference's name in the legend.

    Returns:
        ``matplotlib.figure.Figure``.

    Raises:
        ValueError: no scores for ``label``, or a ``value`` it does not take.
    """
    from matplotlib.figure import Figure  # not pyplot's: nothing leaks when a reporter drops it

    best_name = f"{label}_best"
    if best_name not in ds.variables:
        raise ValueError(f"ds has no {best_name!r}: no analysis scores for label {label!r}")
    vdim = f"{label}_value"
    values = np.asarray(ds[vdim].values)
    value = values.max() if value is None else value
    vi = int(np.flatnonzero(values == value)[0]) if (values == value).any() else None
    if vi is None:
        raise ValueError(f"{label!r} has values {values.tolist()}, not {value!r}")
    types = [str(t) for t in np.asarray(ds["trajectory_type"].values)]
    best = np.asarray(ds[best_name].values)[:, vi, :]  # [type, rank]
    hom = np.asarray(ds[f"{label}_homogeneity"].values)[:, vi]  # [entry]
    chance_name = f"{label}_chance"
    chance = np.asarray(ds[chance_name].values)[:, vi] if chance_name in ds.variables else None  # [entry]
    shown = sorted({int(e) for e in best.ravel() if e >= 0})
    fixed = dict(zip(shown, fixing_coordinates(ds, label, shown)))
    fig = Figure(figsize=(max(7.0, 1.3 * len(types)), 4.6), layout="constrained")
    ax = fig.subplots()
    n_rank = best.shape[1]
    width = 0.8 / max(n_rank, 1)
    x = np.arange(len(types))
    for r in range(n_rank):
        h = np.array([hom[e] if e >= 0 else 0.0 for e in best[:, r]])
        xs = x + (r - (n_rank - 1) / 2) * width
        bars = ax.bar(xs - 0.1 * width, h, 0.7 * width, label=f"rank {r}")
        for i, e in enumerate(best[:, r]):
            if e < 0:
                continue
            if chance is not None and np.isfinite(chance[e]):
                ax.vlines(xs[i] + 0.35 * width, 0, chance[e], color="0.45", linewidth=2.5, gid="chance",
                          label="chance level" if r == 0 and i == int(np.flatnonzero(best[:, r] >= 0)[0]) else None)
            if fixed[int(e)]:
                bars[i].set_hatch("//")
    by = sorted({name for e in best.ravel() if e >= 0 for name in fixed[int(e)]})
    if by:
        ax.text(0.01, 0.985, f"hatched: {label} is fixed within the cluster by {' or '.join(by)}; "
                "its homogeneity says nothing beyond that", transform=ax.transAxes, ha="left", va="top",
                fontsize=7, color="tab:red", gid="fixed")
    if reference:
        _reference_marks(ax, reference, types, x, n_rank, width, reference_name)
    views = hidden_views(ds)
    ticks = [t + "\nhidden\n" + " | ".join("-" if not np.isfinite(v.fraction.get(t, np.nan)) else
                                           f"{v.fraction[t]:.2f}" for v in views) for t in types]
    ax.set_xticks(x, ticks, fontsize=7)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel(f"homogeneity for {label}={value}")
    hidden_text = " | ".join(f"τ = {v.tau:g} ({v.rule})" for v in views)
    ax.set_title(f"App. G: best {label}={value} clusters per trajectory type\n"
                 f"restriction: {restriction_text(ds, label)}; chance level (grey): {chance_text(ds, label)}\n"
                 f"{tau_text(ds)}; hidden fractions under {hidden_text}", fontsize=8)
    handles, names = ax.get_legend_handles_labels()
    from matplotlib.patches import Patch  # the rank's colour without the hatch its first bar may carry

    handles = [Patch(facecolor=h.patches[0].get_facecolor()) if hasattr(h, "patches") else h for h in handles]
    ax.legend(handles, names, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return fig


def _reference_marks(ax, reference, types, x, n_rank, width, name):
    """Black marks at the reference homogeneity over each trajectory type's rank bars."""
    drawn = False
    for i, t in enumerate(types):
        ref = reference.get(t)
        if ref is None:
            continue
        ref = [ref] if np.isscalar(ref) else list(ref)
        for r, h in enumerate(ref[:n_rank]):
            if h is None:
                continue
            xr = x[i] + (r - (n_rank - 1) / 2) * width - 0.1 * width
            ax.plot([xr - 0.35 * width, xr + 0.35 * width], [h, h], color="black", linewidth=2, gid="reference",
                    label=name if not drawn else None)
            drawn = True
