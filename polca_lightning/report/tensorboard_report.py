"""Log an analysed store to TensorBoard through a Lightning ``TensorBoardLogger``.

Lightning's default logger is a ``TensorBoardLogger`` when ``tensorboard`` is installed
(``pip install tensorboard``), so a run with the default logger gets the report in its
event file. Tags (``prefix`` = ``"polca_report"``), from the items of
:func:`polca_lightning.report.content.report_items`:

====================================  ===========  ==========================================
tag                                   TensorBoard  content
====================================  ===========  ==========================================
``<prefix>/<name>`` of a figure       image        ``add_figure`` (``mean_loss``, ``vector_NN/...``,
                                                   ``appendix_g_<label>``, ``coverage_plot``)
``<prefix>/<name>`` of a table        text         ``add_text``: the caption and the table as
                                                   markdown (first 200 rows); the whole table
                                                   as CSV in ``<log_dir>/polca_report/<name>.csv``
                                                   (the folder's file names)
``<prefix>/<name>/<column>``          scalar       a series (``coverage``): ``add_scalar`` at
                                                   each interval's end step (finite values);
                                                   also ``coverage.csv`` in the CSV folder
``<prefix>/<name>`` of a scalar       scalar       ``add_scalar`` at the report step
                                                   (``coverage_total/<name>``, ``kept_vectors``,
                                                   ``hidden_breakthroughs``, ``tau``,
                                                   ``tau_paper``)
``<prefix>/overview``                 text         what the numbers are, coverage explained
====================================  ===========  ==========================================

TensorBoard stores a text under the tag ``<tag>/text_summary`` (its text plugin).
Everything but the series is at ``step`` (the run's last step).

Example:
    >>> from lightning.pytorch.loggers import TensorBoardLogger
    >>> tags = log_report_tensorboard(TensorBoardLogger("runs"), open_analysed_store("runs/polca.zarr"))
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np

from polca_lightning.report.content import (
    ReportItem, logger_classes, loggers_of, markdown_table, report_items, send_report,
)
from polca_lightning.report.folder import folder_file
from polca_lightning.store.schema import STEP

__all__ = ["tensorboard_logger_classes", "tensorboard_loggers", "tensorboard_tags", "TensorBoardSink",
           "log_report_tensorboard"]

log = logging.getLogger("polca_lightning")

#: markdown rows of a table in TensorBoard's text tab (the CSV has them all)
MAX_TEXT_ROWS = 200


def tensorboard_logger_classes() -> tuple[type, ...]:
    """``TensorBoardLogger`` of ``lightning.pytorch`` and, when installed, of ``pytorch_lightning``."""
    return logger_classes("TensorBoardLogger")


def tensorboard_loggers(trainer_or_loggers) -> list:
    """The TensorBoard loggers of a trainer, or among a list of loggers (empty list when none)."""
    return loggers_of(trainer_or_loggers, tensorboard_logger_classes())


def tensorboard_tags(item: ReportItem, prefix: str = "polca_report") -> list[tuple[str, str]]:
    """``(kind, tag)`` pairs a report item is written under, ``kind`` as
    ``EventAccumulator.Tags()`` names it: ``images``, ``tensors`` (texts) or ``scalars``.
    A series with no step has none."""
    tag = f"{prefix}/{item.name}"
    if item.kind == "figure":
        return [("images", tag)]
    if item.kind in ("table", "text"):
        return [("tensors", tag + "/text_summary")]
    if item.kind == "scalar":
        return [("scalars", tag)]
    if item.kind == "series":
        return [("scalars", f"{tag}/{n}") for n in item.value.values] if item.value.step.size else []
    raise ValueError(f"item {item.name!r}: unknown kind {item.kind!r}")


class TensorBoardSink:
    """Sends report items to a ``SummaryWriter`` (a ``TensorBoardLogger``'s ``experiment``):
    figures with ``add_figure``, tables and texts with ``add_text``, scalars and series with
    ``add_scalar``; tables and series also as CSV files in ``csv_dir`` (when given).
    ``finish()`` flushes the writer and returns the tags written."""

    def __init__(self, writer, step: int, prefix: str = "polca_report", csv_dir=None):
        self.writer, self.step, self.prefix = writer, int(step), prefix
        self.csv_dir = None if csv_dir is None else Path(csv_dir)
        self.tags: list[str] = []

    @classmethod
    def of(cls, logger, step: int, prefix: str = "polca_report", csv: bool = True) -> "TensorBoardSink":
        """The sink of a Lightning ``TensorBoardLogger`` (its ``experiment``) or of a
        ``SummaryWriter``, with the tables as CSV in ``<log_dir>/polca_report`` where the log
        dir is local and ``csv`` is on."""
        writer = getattr(logger, "experiment", logger)
        return cls(writer, step, prefix, csv_dir=_csv_dir(logger, writer) if csv else None)

    def send(self, item: ReportItem) -> None:
        tags = [tag for _, tag in tensorboard_tags(item, self.prefix)]
        tag = f"{self.prefix}/{item.name}"
        if item.kind == "figure":
            self.writer.add_figure(tag, item.value, global_step=self.step, close=False)
        elif item.kind == "table":
            self.writer.add_text(tag, f"{item.caption}\n\n{markdown_table(item.value, MAX_TEXT_ROWS)}",
                                 global_step=self.step)
            self._csv(item, item.value)
        elif item.kind == "text":
            self.writer.add_text(tag, item.value, global_step=self.step)
        elif item.kind == "scalar":
            self.writer.add_scalar(tag, float(item.value), global_step=self.step)
        elif item.kind == "series":
            for name, values in item.value.values.items():
                for s, v in zip(item.value.step, values):
                    if np.isfinite(v):
                        self.writer.add_scalar(f"{tag}/{name}", float(v), global_step=int(s))
            self._csv(item, item.value.to_table())
        self.tags += tags

    def _csv(self, item: ReportItem, table) -> None:
        if self.csv_dir is None:
            return
        self.csv_dir.mkdir(parents=True, exist_ok=True)
        table.to_csv(self.csv_dir / folder_file(item))

    def finish(self) -> list[str]:
        self.writer.flush()
        if self.csv_dir is not None:
            log.info("POLCA report: %d TensorBoard tags; tables as CSV in %s", len(self.tags), self.csv_dir)
        return self.tags


def _csv_dir(logger, writer):
    """``<log_dir>/polca_report`` of a local log dir; ``None`` for a remote one (``s3://``)."""
    log_dir = getattr(logger, "log_dir", None) or getattr(writer, "log_dir", None)
    if log_dir is None or "://" in str(log_dir):
        return None
    return Path(os.fspath(log_dir)) / "polca_report"


def log_report_tensorboard(logger, ds, *, method: str = "polca", decode: Callable[[int, int], str] | None = None,
                           decode_target: Callable[[int], str] | None = None, step: int | None = None,
                           k_nearest: int = 5, top_targets: int = 5, prefix: str = "polca_report",
                           csv: bool = True, progress: bool = False) -> list[str]:
    """Log the figures, tables and scalars of an analysed store to TensorBoard.

    Args:
        logger: a Lightning ``TensorBoardLogger`` (either package's; its ``experiment``
            is the ``SummaryWriter``), or a ``SummaryWriter``.
        ds: store + results Dataset (``analyze_store``'s return value, or
            ``open_analysed_store`` of an analysed store).
        method: analysis method of the per-vector figures and tables.
        step: step of the report (the run's last step; default: the last snapshot's).
        decode, decode_target, k_nearest, top_targets, progress: as for
            :func:`~polca_lightning.report.content.report_items`.
        prefix: tag prefix.
        csv: also write the tables as CSV in ``<log_dir>/polca_report`` (local log dirs).

    Returns:
        The tags written (table at the module top).
    """
    step = int(ds[STEP].values[-1]) if step is None else int(step)
    items = report_items(ds, method=method, decode=decode, decode_target=decode_target, k_nearest=k_nearest,
                         top_targets=top_targets, progress=progress)
    sink = TensorBoardSink.of(logger, step, prefix, csv=csv)
    (tags,) = send_report(items, [sink])
    return tags
