"""Log an analysed store to Weights & Biases through a Lightning ``WandbLogger``.

Keys (``prefix`` = ``"polca_report"``; ``NN`` = the vector index, two digits):

=======================================  ======  =============================================
key                                      kind    content
=======================================  ======  =============================================
``<prefix>/vector_NN/projected_loss``    image   cluster mean projected loss, 25-75 % bands,
                                                 onsets, τ (kept vectors only)
``<prefix>/vector_NN/exact_loss``        image   cluster mean exact loss, onsets, τ
``<prefix>/vector_NN/labels``            image   label composition of each cluster
``<prefix>/vector_NN/targets``           image   most common targets per cluster against their
                                                 share of all tokens (stores with targets)
``<prefix>/vector_NN/ablation``          image   loss change per cluster when the vector's
                                                 movement is undone, beside POLCA's allocation
                                                 (stores with an ablation)
``<prefix>/coverage_plot``               image   allocated vs real loss change per interval
``<prefix>/appendix_g_<label>``          image   best ``label`` homogeneity per trajectory type
``<prefix>/summary``                     table   one row per vector (``summary_table``)
``<prefix>/medoid_contexts``             table   tokens nearest each medoid
``<prefix>/cluster_targets``             table   per kept vector and cluster, the most common
                                                 target tokens: count, share of the cluster,
                                                 share of all tokens (``cluster_targets_table``;
                                                 stores with targets)
``<prefix>/ablation``                    table   per kept vector and cluster: the loss change
                                                 when the vector is undone (``ablation_table``)
``<prefix>/ablation_summary``            table   per kept vector (``ablation_summary``)
``<prefix>/appendix_g``                  table   App. G comparison (when the store has labels)
``<prefix>/signal_check``                table   per binary label: each vector's AUC and
                                                 cross-validated accuracy, all vectors, exact
                                                 loss, majority rate (``signal_table``; stores
                                                 with a binary label)
``<prefix>/coverage/<name>``             scalar  per interval, at the interval's end step:
                                                 allocated, real, ratio, correlation, explained
                                                 (and ``first_*`` for first-order POLCA)
``<prefix>/coverage_total/<name>``       scalar  over the whole run (also in the run summary)
``<prefix>/kept_vectors``, ``tau``,      scalar  at the report step (also in the run summary)
``hidden_breakthroughs``
=======================================  ======  =============================================

Lightning's ``WandbLogger.log_metrics`` sends its step as the ``trainer/global_step``
metric rather than as W&B's own step, so the per-interval coverage scalars may use
steps earlier than the last one; everything else is logged at ``step`` (the last step).
"""

from __future__ import annotations

import io
import logging
from typing import Any, Callable

import numpy as np

from polca_lightning.ablation import ablated_units, ablation_figure, ablation_summary, ablation_table
from polca_lightning.report import figures as F
from polca_lightning.report.pipeline import (
    _labels,
    appendix_g_table,
    cluster_targets_table,
    has_targets,
    kept_units,
    medoid_contexts_table,
    signal_table,
    store_coverage,
    summary_table,
)

__all__ = ["wandb_logger_classes", "wandb_loggers", "log_report", "figure_to_image"]

log = logging.getLogger("polca_lightning")


def wandb_logger_classes() -> tuple[type, ...]:
    """``WandbLogger`` of ``lightning.pytorch`` and, when installed, of ``pytorch_lightning``
    (two different classes when both packages are installed)."""
    classes = []
    for module in ("lightning.pytorch.loggers", "pytorch_lightning.loggers"):
        try:
            mod = __import__(module, fromlist=["WandbLogger"])
            classes.append(mod.WandbLogger)
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


def wandb_loggers(trainer) -> list:
    """The W&B loggers of a trainer (empty list when it has none)."""
    classes = wandb_logger_classes()
    if not classes:
        return []
    return [lg for lg in getattr(trainer, "loggers", []) if isinstance(lg, classes)]


def figure_to_image(fig, dpi: int = 100):
    """A matplotlib Figure as a PIL image (what ``wandb.Image`` takes most reliably)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    image = Image.open(buffer)
    image.load()
    return image


def _vector_figures(ds, unit: int, method: str, decode_target=None, top_targets: int = 5,
                    ablated: bool = False) -> dict[str, Any]:
    figures = {
        "projected_loss": F.projected_loss_figure(ds, unit, method=method),
        "exact_loss": F.exact_loss_figure(ds, unit, method=method),
        "labels": F.label_composition_figure(ds, unit, method=method),
    }
    if has_targets(ds):
        figures["targets"] = F.cluster_targets_figure(ds, unit, method=method, top=top_targets,
                                                      decode_target=decode_target)
    if ablated:
        figures["ablation"] = ablation_figure(ds, unit, method)
    return figures


def log_report(logger, ds, *, method: str = "polca", decode: Callable[[int, int], str] | None = None,
               decode_target: Callable[[int], str] | None = None, step: int | None = None,
               k_nearest: int = 5, top_targets: int = 5, prefix: str = "polca_report",
               progress: bool = False) -> list[str]:
    """Log the figures, tables and scalars of an analysed store to a ``WandbLogger``.

    Args:
        logger: a Lightning ``WandbLogger`` (either package's): uses ``log_image``,
            ``log_table``, ``log_metrics`` and ``experiment.summary``.
        ds: store + results Dataset (``analyze_store``'s return value, or ``open_store``
            of an analysed store).
        method: analysis method of the per-vector figures and tables.
        decode: ``decode(sequence, position) -> str`` for the medoid contexts' text column.
        decode_target: ``decode_target(token_id) -> str`` for the text of the clusters'
            most common targets (table and figure).
        step: step of the report (the run's last step; default: the last snapshot's).
        k_nearest: tokens per cluster in the medoid-contexts table.
        top_targets: targets per cluster in the cluster-targets table and figure.
        prefix: key prefix.
        progress: progress bar over vectors.

    Returns:
        The keys logged (table at the module top).
    """
    step = int(ds["step"].values[-1]) if step is None else int(step)
    keys: list[str] = []

    def image(key, fig, caption):
        logger.log_image(key=key, images=[figure_to_image(fig)], step=step, caption=[caption])
        keys.append(key)

    def table(key, tab):
        logger.log_table(key=key, columns=tab.columns, data=tab.rows, step=step)
        keys.append(key)

    units = kept_units(ds, method)
    ablated = ablated_units(ds, method)
    if not units:
        log.warning("POLCA report: the filter kept no %s vector; no per-vector figures", method)
    bar = None
    if progress and units:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(units), desc="report figures", unit="vector")
    try:
        for u in units:
            for name, fig in _vector_figures(ds, u, method, decode_target, top_targets, u in ablated).items():
                image(f"{prefix}/vector_{u:02d}/{name}", fig, f"{method} vector {u}: {name}")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    table(f"{prefix}/summary", summary_table(ds, method))
    table(f"{prefix}/medoid_contexts", medoid_contexts_table(ds, method, k=k_nearest, decode=decode))
    targets = cluster_targets_table(ds, method, top=top_targets, decode_target=decode_target)
    if targets is not None:
        table(f"{prefix}/cluster_targets", targets)
    if ablated:
        table(f"{prefix}/ablation", ablation_table(ds, method=method, labels=_labels(ds)))
        table(f"{prefix}/ablation_summary", ablation_summary(ds, method=method))
    app_g = appendix_g_table(ds)
    if app_g is not None:
        table(f"{prefix}/appendix_g", app_g)
        for label in sorted({row[0] for row in app_g.rows}):
            image(f"{prefix}/appendix_g_{label}", F.appendix_g_figure(ds, label), f"App. G: {label}")
    signal = signal_table(ds, method if method in ("polca", "polca_first") else "polca")
    if signal is not None:
        table(f"{prefix}/signal_check", signal)

    cov = store_coverage(ds)
    if cov["step"].size:
        image(f"{prefix}/coverage_plot", F.coverage_figure(cov), "coverage")
        names = [k for k in cov if k not in ("interval", "step", "summary")]
        for i, s in enumerate(cov["step"]):
            row = {f"{prefix}/coverage/{n}": float(cov[n][i]) for n in names}
            logger.log_metrics({k: v for k, v in row.items() if np.isfinite(v)}, step=int(s))
        keys += [f"{prefix}/coverage/{n}" for n in names]
    scalars = {f"{prefix}/coverage_total/{k}": float(v) for k, v in cov["summary"].items() if np.isfinite(v)}
    hidden = np.asarray(ds[F._prefix(method) + "hidden"].values, dtype=bool)
    scalars[f"{prefix}/kept_vectors"] = len(units)
    scalars[f"{prefix}/hidden_breakthroughs"] = int(hidden[units].sum()) if units else 0
    if "tau" in ds.variables:
        scalars[f"{prefix}/tau"] = float(ds["tau"].values)
    logger.log_metrics(scalars, step=step)
    keys += list(scalars)
    try:
        logger.experiment.summary.update(scalars)
    except Exception:  # noqa: BLE001 - a summary is a convenience; the history has the values
        log.debug("POLCA report: could not update the W&B run summary", exc_info=True)
    return keys

