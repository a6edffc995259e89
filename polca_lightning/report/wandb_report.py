"""Log an analysed store to Weights & Biases through a Lightning ``WandbLogger``, or into an
open run (:class:`WandbRun`: the one Hugging Face's ``Trainer`` opened).

Keys (``prefix`` = ``"polca_report"``; ``NN`` = the vector index, two digits):

=======================================  ======  =============================================
key                                      kind    content
=======================================  ======  =============================================
``<prefix>/mean_loss``                  image   the mean exact loss over training, τ (its rule
                                                 in the legend) and the paper's τ
``<prefix>/vector_NN/projected_loss``    image   cluster mean projected loss, 25-75 % bands,
                                                 onsets, τ (kept vectors with clusters only)
``<prefix>/vector_NN/exact_loss``        image   cluster mean exact loss, onsets, τ
``<prefix>/vector_NN/labels``            image   label composition of each cluster
``<prefix>/vector_NN/targets``           image   most common targets per cluster against their
                                                 share of all tokens (stores with targets)
``<prefix>/vector_NN/ablation``          image   loss change per cluster when the vector's
                                                 movement is undone, and POLCA's allocation,
                                                 on their own axes (stores with an ablation)
``<prefix>/coverage_plot``               image   allocated vs real loss change per interval (its
                                                 caption says what coverage is)
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
``tau_paper``, ``hidden_breakthroughs``
``<prefix>/overview``                    text    in the run summary: method, kept vectors, τ,
                                                 vectors without clusters, coverage and what
                                                 coverage means
=======================================  ======  =============================================

The items are :func:`polca_lightning.report.content.report_items`; the key of an item
is ``<prefix>/<name>``, and of a series column ``<prefix>/<name>/<column>``
(:func:`wandb_keys`). A kept vector without clusters has no ``vector_NN`` images.

Lightning's ``WandbLogger.log_metrics`` sends its step as the ``trainer/global_step``
metric rather than as W&B's own step, so the per-interval coverage scalars may use
steps earlier than the last one; everything else is logged at ``step`` (the last step).
"""

from __future__ import annotations

import io
import logging
from typing import Callable

import numpy as np

from polca_lightning.report.content import ReportItem, logger_classes, loggers_of, report_items, send_report
from polca_lightning.store.schema import STEP

__all__ = ["wandb_logger_classes", "wandb_loggers", "wandb_keys", "WandbRun", "WandbSink", "log_report",
           "figure_to_image"]

log = logging.getLogger("polca_lightning")


def wandb_logger_classes() -> tuple[type, ...]:
    """``WandbLogger`` of ``lightning.pytorch`` and, when installed, of ``pytorch_lightning``."""
    return logger_classes("WandbLogger")


def wandb_loggers(trainer_or_loggers) -> list:
    """The W&B loggers of a trainer, or among a list of loggers (empty list when none)."""
    return loggers_of(trainer_or_loggers, wandb_logger_classes())


def figure_to_image(fig, dpi: int = 100):
    """A matplotlib Figure as a PIL image (what ``wandb.Image`` takes most reliably)."""
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    buffer.seek(0)
    image = Image.open(buffer)
    image.load()
    return image


def wandb_keys(item: ReportItem, prefix: str = "polca_report") -> list[str]:
    """The W&B keys of a report item: ``<prefix>/<name>``; a series has one key per
    column, ``<prefix>/<name>/<column>``, and none when it has no step."""
    if item.kind == "series":
        return [f"{prefix}/{item.name}/{n}" for n in item.value.values] if item.value.step.size else []
    return [f"{prefix}/{item.name}"]


class WandbRun:
    """An open W&B run with the logging methods of Lightning's ``WandbLogger`` that
    :class:`WandbSink` uses (``log_metrics``, ``log_image``, ``log_table``, ``experiment``),
    so that the report goes into a run some other code opened: the one Hugging Face's
    ``Trainer`` opens with ``report_to="wandb"`` (``wandb.run``).

    Each row is logged with its step as the ``step_metric`` value rather than as W&B's own
    step (the ``Trainer`` plots every key against ``train/global_step``; a W&B step older
    than the run's last is silently dropped).

    Args:
        run: a ``wandb`` run (``wandb.run``, or what ``wandb.init`` returned).
        step_metric: the key that holds the step.
    """

    def __init__(self, run, step_metric: str = "train/global_step"):
        if run is None:
            raise ValueError("run: expected an open W&B run (wandb.run), got None")
        self.experiment, self.step_metric = run, step_metric

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        row = dict(metrics) if step is None else {**metrics, self.step_metric: int(step)}
        self.experiment.log(row)

    def log_image(self, key: str, images: list, step: int | None = None, caption: list | None = None) -> None:
        import wandb

        captions = caption if caption is not None else [None] * len(images)
        self.log_metrics({key: [wandb.Image(img, caption=c) for img, c in zip(images, captions)]}, step)

    def log_table(self, key: str, columns: list, data: list, step: int | None = None) -> None:
        import wandb

        self.log_metrics({key: wandb.Table(columns=columns, data=data)}, step)


class WandbSink:
    """Sends report items to a Lightning ``WandbLogger`` (or a :class:`WandbRun`): figures with ``log_image``,
    tables with ``log_table`` (at ``step``), a series with ``log_metrics`` at each of its
    steps, the scalars in one ``log_metrics`` at ``step`` and in the run summary, texts
    in the run summary. ``finish()`` returns the keys sent."""

    def __init__(self, logger, step: int, prefix: str = "polca_report"):
        self.logger, self.step, self.prefix = logger, int(step), prefix
        self.keys: list[str] = []
        self._scalars: dict[str, float] = {}
        self._texts: dict[str, str] = {}

    def send(self, item: ReportItem) -> None:
        keys = wandb_keys(item, self.prefix)
        if item.kind == "figure":
            self.logger.log_image(key=keys[0], images=[figure_to_image(item.value)], step=self.step,
                                  caption=[item.caption])
        elif item.kind == "table":
            self.logger.log_table(key=keys[0], columns=item.value.columns, data=item.value.rows, step=self.step)
        elif item.kind == "series":
            for i, s in enumerate(item.value.step):
                row = {key: float(values[i]) for key, values in zip(keys, item.value.values.values())}
                self.logger.log_metrics({k: v for k, v in row.items() if np.isfinite(v)}, step=int(s))
        elif item.kind == "scalar":
            self._scalars[keys[0]] = item.value
        elif item.kind == "text":
            self._texts[keys[0]] = item.value
        else:
            raise ValueError(f"item {item.name!r}: unknown kind {item.kind!r}")
        if item.kind not in ("scalar", "text"):
            self.keys += keys

    def finish(self) -> list[str]:
        if self._scalars:
            self.logger.log_metrics(self._scalars, step=self.step)
        try:
            self.logger.experiment.summary.update({**self._scalars, **self._texts})
        except Exception:  # noqa: BLE001 - a summary is a convenience; the history has the values
            log.debug("POLCA report: could not update the W&B run summary", exc_info=True)
        self.keys += list(self._scalars) + list(self._texts)
        return self.keys


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
        step: step of the report (the run's last step; default: the last snapshot's).
        decode, decode_target, k_nearest, top_targets, progress: as for
            :func:`~polca_lightning.report.content.report_items`.
        prefix: key prefix.

    Returns:
        The keys logged (table at the module top).

    Example:
        >>> from lightning.pytorch.loggers import WandbLogger
        >>> keys = log_report(WandbLogger(project="polca", offline=True), open_analysed_store("runs/polca.zarr"))
    """
    step = int(ds[STEP].values[-1]) if step is None else int(step)
    items = report_items(ds, method=method, decode=decode, decode_target=decode_target, k_nearest=k_nearest,
                         top_targets=top_targets, progress=progress)
    (keys,) = send_report(items, [WandbSink(logger, step, prefix)])
    return keys
