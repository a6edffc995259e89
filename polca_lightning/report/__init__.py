"""Reports of an analysed POLCA store: figures, W&B and TensorBoard logging, a PNG folder.

- :func:`report_after_fit` (``pipeline``): what ``POLCACallback`` runs after ``fit`` when
  ``analyze=True``: the analysis, written into the store, then the report to every
  ``WandbLogger`` and ``TensorBoardLogger`` of the trainer, or, with neither, to the
  folder ``<store>.report``.
- :func:`analyze_store`: analyse a store and write the results into it; returns the
  store Dataset with them, which every figure and table below reads.
- ``content``: :func:`report_items`, the report's items (name, kind, caption, value),
  once for every sink, and :func:`send_report`, which sends them and closes each figure.
- ``figures``: matplotlib figures (returned, never logged); ``tau_figures``: the τ line
  they draw, labelled with τ's rule, and :func:`mean_loss_figure` (the mean exact loss
  with τ and the paper's τ on it).
- ``wandb_report``: :func:`log_report` to a Lightning ``WandbLogger`` (keys in its docstring).
- ``tensorboard_report``: :func:`log_report_tensorboard` to a ``TensorBoardLogger`` (tags
  in its docstring).
- ``folder``: :func:`write_report_folder` (layout in its docstring).
- Tables: :func:`summary_table`, :func:`medoid_contexts_table`,
  :func:`cluster_targets_table` (the target tokens most common in each cluster),
  :func:`appendix_g_table`, and :func:`store_coverage` (the coverage diagnostic from the
  store).

Example:
    >>> from polca_lightning.report import analyze_store, write_report_folder
    >>> ds = analyze_store("runs/polca.zarr", min_samples=5)
    >>> write_report_folder(ds, "runs/polca.zarr.report")
"""

from polca_lightning.report import figures as _figures
from polca_lightning.report.content import ReportItem, Series, report_items, send_report
from polca_lightning.report.figures import (  # noqa: F401 (exported: the figures of figures.__all__)
    ablation_figure,
    appendix_g_figure,
    cluster_targets_figure,
    coverage_figure,
    exact_loss_figure,
    label_composition_figure,
    mean_loss_figure,
    projected_loss_figure,
)
from polca_lightning.report.folder import write_report_folder
from polca_lightning.report.pipeline import (
    ReportError,
    analyze_store,
    default_report_dir,
    has_results,
    open_analysed_store,
    report_after_fit,
    result_variables,
)
from polca_lightning.report.tables import (
    Table,
    appendix_g_table,
    cluster_targets_table,
    has_targets,
    kept_units,
    medoid_contexts_table,
    store_coverage,
    summary_table,
)
from polca_lightning.report.tensorboard_report import log_report_tensorboard, tensorboard_loggers
from polca_lightning.report.wandb_report import log_report, wandb_loggers

__all__ = [
    "report_after_fit",
    "analyze_store",
    "open_analysed_store",
    "has_results",
    "result_variables",
    "default_report_dir",
    "ReportError",
    "Table",
    "summary_table",
    "medoid_contexts_table",
    "cluster_targets_table",
    "has_targets",
    "appendix_g_table",
    "store_coverage",
    "kept_units",
    *(name for name in _figures.__all__ if name.endswith("_figure")),
    "report_items",
    "send_report",
    "ReportItem",
    "Series",
    "log_report",
    "wandb_loggers",
    "log_report_tensorboard",
    "tensorboard_loggers",
    "write_report_folder",
]
