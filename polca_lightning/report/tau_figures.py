"""τ in the figures: the line every per-vector figure draws at τ, labelled with τ's rule,
and :func:`mean_loss_figure`, the mean exact loss with τ (and the paper's τ) on it.

Like every figure function, :func:`mean_loss_figure` returns a ``matplotlib`` Figure and
never logs or saves it. Artists carry a ``gid``: ``"mean_loss"``, ``"tau"``,
``"tau_paper"``.
"""

from __future__ import annotations

import numpy as np

from polca_lightning.analysis.onsets import tau_rule_label
from polca_lightning.analysis.recorded import analysis_attrs, analysis_scalar
from polca_lightning.store.schema import LOSS, SNAPSHOT, STEP, TOKEN

__all__ = ["mean_loss_figure", "tau_label", "tau_line"]

_TAU_STYLE = {"color": "black", "linestyle": ":", "linewidth": 1.2}
_TAU_PAPER_STYLE = {"color": "tab:gray", "linestyle": "-.", "linewidth": 1.0}


def tau_label(ds) -> str:
    """``"τ = 330 (plateau: mean loss flat)"``: τ and the rule that gave it (``analysis_tau_rule``).

    Example:
        >>> from polca_lightning.analysis import analyze, make_synthetic_store
        >>> tau_label(analyze(make_synthetic_store(50, 40, 4), methods=["loss"]))
        'τ = 180 (plateau: mean loss flat)'
    """
    rule = (analysis_attrs(ds) or {}).get("analysis_tau_rule")
    return f"τ = {analysis_scalar(ds, 'tau'):g}" + (f" ({tau_rule_label(rule)})" if rule is not None else "")


def tau_line(ax, ds) -> None:
    """A dotted vertical line at τ (``gid="tau"``) labelled by :func:`tau_label`; none without τ."""
    tau = analysis_scalar(ds, "tau")
    if np.isfinite(tau):
        ax.axvline(tau, gid="tau", label=tau_label(ds), **_TAU_STYLE)


def mean_loss_figure(ds):
    """The mean exact loss over the probe tokens during training, with τ on it.

    What τ's rule reads: a hidden breakthrough is a cluster whose onset is after τ,
    learning that this curve does not show. One line for the mean loss over the
    snapshots the analysis used (``gid="mean_loss"``), a dotted one at τ labelled with
    its rule (``gid="tau"``), and a dash-dotted one at the paper's τ, 10 % of the run
    (``gid="tau_paper"``; left out where it is τ itself).

    Args:
        ds: store + results Dataset (``open_analysed_store`` of an analysed store, or
            ``analyze_store``'s return value); ``mean_loss`` is the analysis' result
            variable, else it is computed from ``loss``.

    Returns:
        ``matplotlib.figure.Figure``.

    Raises:
        ValueError: ``ds`` holds no analysis (no ``tau``).
    """
    from matplotlib.figure import Figure  # not pyplot's: nothing leaks when a reporter drops it

    if "tau" not in ds.variables:
        raise ValueError("ds has no 'tau': no analysis results (open the store with open_analysed_store)")
    if "mean_loss" in ds.variables:
        mean = np.asarray(ds["mean_loss"].values, dtype=np.float64)  # [snapshot]; NaN past the analysed ones
    else:
        mean = np.nanmean(np.asarray(ds[LOSS].transpose(SNAPSHOT, TOKEN).values, dtype=np.float64), axis=1)
    finite = np.isfinite(mean)
    n = mean.size if finite.all() else int(np.argmin(finite))  # the leading analysed snapshots
    step = np.asarray(ds[STEP].values[:n], dtype=np.float64)
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    ax = fig.subplots()
    ax.plot(step, mean[:n], color="tab:blue", linewidth=1.5, gid="mean_loss",
            label=f"mean exact loss ({ds.sizes.get(TOKEN, '?')} probe tokens)")
    tau_line(ax, ds)
    tau, paper = analysis_scalar(ds, "tau"), analysis_scalar(ds, "tau_paper")
    if np.isfinite(paper) and paper != tau:
        ax.axvline(paper, gid="tau_paper", label=f"paper's τ = {paper:g} ({tau_rule_label('paper')})",
                   **_TAU_PAPER_STYLE)
    ax.set_xlabel("step")
    ax.set_ylabel("mean exact loss")
    ax.set_title(f"mean exact loss during training\na cluster whose onset comes after {tau_label(ds)} "
                 "is a hidden breakthrough", fontsize=8)
    ax.legend(fontsize=7, loc="best")
    return fig
