"""The report as a folder of PNG figures and CSV tables (when there is no W&B or
TensorBoard logger).

Layout of ``out_dir`` (default ``<store>.report`` beside the store)::

    index.md                          the overview (method, kept vectors, τ, vectors without
                                      clusters, coverage and what coverage means), the
                                      summary table, the signal check, the scalars, the files
    summary.csv                       one row per vector (summary_table)
    medoid_contexts.csv               tokens nearest each cluster medoid
    cluster_targets.csv               most common targets per cluster (stores with targets)
    ablation.csv                      per kept vector and cluster: loss change when the vector's
                                      movement is undone (stores with an ablation)
    ablation_summary.csv              per kept vector: does undoing it hurt its clusters most
    appendix_g.csv                    App. G comparison (when the store has labels)
    signal_check.csv                  per binary label: each vector's AUC and cross-validated
                                      accuracy, all vectors, exact loss, majority rate
                                      (signal_table; stores with a binary label)
    coverage.csv                      per-interval coverage (store_coverage)
    coverage.png                      allocated vs real loss change
    mean_loss.png                     the mean exact loss over training, τ (its rule in the
                                      legend) and the paper's τ
    appendix_g_<label>.png            best homogeneity per trajectory type, per label
    vector_NN_projected_loss.png      per kept vector with clusters: cluster means, bands,
                                      onsets, τ
    vector_NN_exact_loss.png          cluster mean exact loss
    vector_NN_labels.png              label composition per cluster
    vector_NN_targets.png             most common targets per cluster (stores with targets)
    vector_NN_ablation.png            loss change per cluster when the vector is undone, and
                                      POLCA's allocation (stores with an ablation)

The items are :func:`polca_lightning.report.content.report_items`; an item's file is
its name with ``/`` as ``_`` (``coverage_plot`` keeps the name ``coverage``), ``.png``
for a figure, ``.csv`` for a table or a series (:func:`folder_file`). Scalars and the
overview text go into ``index.md``.

Files of an earlier report with these names are replaced; other files are left alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from polca_lightning.report.content import ReportItem, markdown_table, report_items, send_report

__all__ = ["folder_file", "FolderSink", "write_report_folder"]

log = logging.getLogger("polca_lightning")

#: items whose file stem is not their name (the names of earlier reports)
_STEMS = {"coverage_plot": "coverage"}


def folder_file(item: ReportItem) -> str | None:
    """The file name of a report item in the folder; ``None`` for the items that go into
    ``index.md`` (scalars, texts)."""
    if item.kind in ("scalar", "text"):
        return None
    stem = _STEMS.get(item.name, item.name).replace("/", "_")
    return stem + (".png" if item.kind == "figure" else ".csv")


class FolderSink:
    """Writes report items into a folder: figures as PNG, tables and series as CSV;
    ``finish()`` writes ``index.md`` and returns the folder."""

    def __init__(self, out_dir, dpi: int = 100):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.dpi = dpi
        self.figures: list[tuple[str, str]] = []  # (file, caption)
        self.tables: list[tuple[str, str]] = []
        self.scalars: list[tuple[str, float]] = []
        self.texts: list[str] = []
        self._kept: dict = {}  # tables index.md shows: summary, signal_check

    def send(self, item: ReportItem) -> None:
        name = folder_file(item)
        if item.kind == "figure":
            item.value.savefig(self.out / name, dpi=self.dpi)
            self.figures.append((name, item.caption))
        elif item.kind in ("table", "series"):
            table = item.value if item.kind == "table" else item.value.to_table()
            table.to_csv(self.out / name)
            self.tables.append((name, item.caption))
            if item.name in ("summary", "signal_check"):
                self._kept[item.name] = table
        elif item.kind == "scalar":
            self.scalars.append((item.name, item.value))
        elif item.kind == "text":
            self.texts.append(item.value)
        else:
            raise ValueError(f"item {item.name!r}: unknown kind {item.kind!r}")

    def finish(self) -> Path:
        summary, signal = self._kept.get("summary"), self._kept.get("signal_check")
        text = ["# POLCA report", ""]
        for block in self.texts:
            text += [block, ""]
        if summary is not None:
            text += ["## Summary", "", markdown_table(summary), ""]
        if signal is not None:
            text += ["## Signal check", "",
                     "How well each vector's projected-loss trajectory predicts each binary label: AUC of its "
                     "final value (0.5: none), cross-validated linear accuracy of its trajectory, against all "
                     "vectors together, the exact loss and the majority rate.", "",
                     markdown_table(signal, max_rows=100), ""]
        if self.scalars:
            text += ["## Scalars", "", *[f"- `{name}` = {value:.6g}" for name, value in self.scalars], ""]
        text += ["## Files", "", *[f"- [{name}]({name}): {caption}" for name, caption in self.figures + self.tables],
                 ""]
        (self.out / "index.md").write_text("\n".join(text))
        log.info("POLCA report: %d figures and %d tables in %s", len(self.figures), len(self.tables), self.out)
        return self.out


def write_report_folder(ds, out_dir, *, method: str = "polca", decode: Callable[[int, int], str] | None = None,
                        decode_target: Callable[[int], str] | None = None, k_nearest: int = 5,
                        top_targets: int = 5, dpi: int = 100, progress: bool = False) -> Path:
    """Write the report of an analysed store as PNG figures and CSV tables.

    Args:
        ds: store + results Dataset (``analyze_store``'s return value, or ``open_store`` of
            an analysed store).
        out_dir: folder to write (created if needed).
        method: analysis method of the per-vector figures and tables.
        decode, decode_target, k_nearest, top_targets, progress: as for
            :func:`~polca_lightning.report.content.report_items`.
        dpi: resolution of the PNGs.

    Returns:
        ``out_dir`` as a Path (layout in the module docstring).

    Example:
        >>> write_report_folder(open_analysed_store("runs/polca.zarr"), "runs/polca.zarr.report")
        PosixPath('runs/polca.zarr.report')
    """
    items = report_items(ds, method=method, decode=decode, decode_target=decode_target, k_nearest=k_nearest,
                         top_targets=top_targets, progress=progress)
    (out,) = send_report(items, [FolderSink(out_dir, dpi=dpi)])
    return out
