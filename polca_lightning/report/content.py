"""What the report holds, once: the items every sink (W&B, TensorBoard, folder) sends.

:func:`report_items` yields the report of an analysed store as :class:`ReportItem`\\ s,
lazily: a figure is drawn when its item is reached, and :func:`send_report` closes it
once every sink has taken it, so one figure is open at a time however many vectors
there are. A sink only turns an item's ``name`` into its own key or file name (each
sink module has one naming rule) and sends the value.

Items, in order (``NN`` = the vector index, two digits; ``<label>`` = a token label):

==================================  =======  ==============================================
name                                kind     content
==================================  =======  ==============================================
``mean_loss``                       figure   the mean exact loss over training with τ (its
                                             rule in the legend) and the paper's τ
``vector_NN/projected_loss``        figure   cluster mean projected loss, 25-75 % bands,
                                             onsets, τ (kept vectors with clusters only)
``vector_NN/exact_loss``            figure   cluster mean exact loss, onsets, τ
``vector_NN/labels``                figure   label composition of each cluster
``vector_NN/targets``               figure   most common targets per cluster against their
                                             share of all tokens (stores with targets)
``vector_NN/ablation``              figure   loss change per cluster when the vector's
                                             movement is undone, and POLCA's allocation, on
                                             their own axes (stores with an ablation)
``summary``                         table    one row per vector (``summary_table``)
``medoid_contexts``                 table    tokens nearest each medoid
``cluster_targets``                 table    most common targets per cluster (stores with
                                             targets)
``ablation``                        table    per kept vector and group of tokens: the loss
                                             change when the vector is undone
                                             (``ablation_table``; stores with an ablation)
``ablation_summary``                table    per kept vector (``ablation_summary``)
``appendix_g``                      table    App. G comparison (stores with labels)
``appendix_g_<label>``              figure   best ``label`` homogeneity per trajectory type
``signal_check``                    table    per binary label: each vector's AUC and
                                             accuracy (``signal_table``; stores with one)
``coverage``                        series   per interval, at its end step: ``real``,
                                             ``allocated``, ``ratio``, ``correlation``,
                                             ``explained`` (``first_*`` for first-order
                                             POLCA; ``store_coverage``)
``coverage_plot``                   figure   allocated vs real loss change per interval
                                             (when the store has a complete interval)
``coverage_total/<name>``           scalar   coverage over the whole run (finite values)
``kept_vectors``                    scalar   vectors the §4.1 filter kept
``hidden_breakthroughs``            scalar   hidden breakthroughs among the kept vectors
``tau``                             scalar   τ (analysed stores with one)
``tau_paper``                       scalar   the paper's τ, 10 % of the run (analysed
                                             stores with one)
``overview``                        text     what the numbers are: method, kept vectors, τ,
                                             the vectors without clusters, coverage and
                                             what coverage means (markdown)
==================================  =======  ==============================================

A kept vector the clustering found no cluster on gets no per-vector figures (they
would be blank); the overview names it, and its row in ``summary`` has 0 clusters.

Example:
    >>> from polca_lightning.report import analyze_store
    >>> from polca_lightning.report.content import report_items
    >>> ds = analyze_store("runs/polca.zarr")
    >>> [item.name for item in report_items(ds) if item.kind == "table"]
    ['summary', 'medoid_contexts', 'cluster_targets', 'appendix_g', 'signal_check']
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

import numpy as np

from polca_lightning.analysis.ablation import ablated_units, ablation_summary, ablation_table
from polca_lightning.analysis.methods import METHODS
from polca_lightning.report import figures as F
from polca_lightning.report.tau_figures import tau_label
from polca_lightning.report.tables import (
    Table,
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
from polca_lightning.store.schema import POLCA

__all__ = [
    "KINDS",
    "COVERAGE_NOTE",
    "ReportItem",
    "Series",
    "ReportSink",
    "report_items",
    "send_report",
    "close_figure",
    "markdown_table",
    "vectors_without_clusters",
    "logger_classes",
    "loggers_of",
]

log = logging.getLogger("polca_lightning")

#: the kinds of :class:`ReportItem`
KINDS = ("figure", "table", "scalar", "series", "text")

#: what coverage is, said wherever the report prints it (see :func:`store_coverage`)
COVERAGE_NOTE = (
    "Coverage: `ratio` is the share of the real loss change that the basis's POLCA allocates "
    "(Σ over tokens and intervals of Σ_b POLCA, over Σ of ℓ_x(θ_end) - ℓ_x(θ_0); 1 = all of it, 0.05 = 5 %); "
    "`allocated` and `real` are those changes as means over tokens; `explained` is "
    "1 - Σ_x (real_x - allocated_x)² / Σ_x real_x² over tokens x; `first_*` are the same for first-order POLCA."
)


@dataclass(frozen=True)
class Series:
    """Per-step values of several names: ``values[name][i]`` belongs to ``step[i]``."""

    step: np.ndarray  # [n] int
    values: dict[str, np.ndarray]  # name -> [n] float

    def to_table(self) -> Table:
        """A table with a ``step`` column, then one column per name."""
        names = list(self.values)
        columns = [self.step] + [self.values[n] for n in names]
        return Table(["step"] + names, [[v.item() for v in row] for row in zip(*columns)])


@dataclass(frozen=True)
class ReportItem:
    """One thing of the report.

    Attributes:
        name: the key stem, ``/``-separated (``vector_03/projected_loss``, ``summary``);
            each sink derives its key or file name from it by one rule.
        kind: one of :data:`KINDS`: ``figure`` (a matplotlib ``Figure``), ``table``
            (:class:`~polca_lightning.report.Table`), ``scalar`` (float), ``series``
            (:class:`Series`), ``text`` (markdown ``str``).
        caption: one line on what it shows.
        value: the object.
    """

    name: str
    kind: str
    caption: str
    value: Any


class ReportSink(Protocol):
    """Where report items go: ``send`` each item, then ``finish`` once."""

    def send(self, item: ReportItem) -> None: ...

    def finish(self) -> Any: ...


def close_figure(fig) -> None:
    """Release a figure: closed in pyplot if pyplot manages it, its artists cleared."""
    plt = sys.modules.get("matplotlib.pyplot")  # not imported: no figure of ours is pyplot's
    if plt is not None:
        plt.close(fig)
    fig.clear()


def logger_classes(name: str) -> tuple[type, ...]:
    """The logger class ``name`` (``"WandbLogger"``, ``"TensorBoardLogger"``) of
    ``lightning.pytorch`` and, when installed, of ``pytorch_lightning`` (two different
    classes when both packages are installed)."""
    classes = []
    for module in ("lightning.pytorch.loggers", "pytorch_lightning.loggers"):
        try:
            classes.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


def loggers_of(trainer_or_loggers, classes: tuple[type, ...]) -> list:
    """The loggers of a trainer, or among a list of loggers, that are ``classes`` (Lightning's
    ``LearningRateMonitor`` picks its loggers the same way); an empty list when none."""
    loggers = getattr(trainer_or_loggers, "loggers", trainer_or_loggers) or []
    return [lg for lg in loggers if classes and isinstance(lg, classes)]


def send_report(items: Iterable[ReportItem], sinks: Iterable[ReportSink]) -> list:
    """Send every item to every sink, closing each figure once all sinks have it.

    Returns:
        Each sink's ``finish()`` value, in order.
    """
    sinks = list(sinks)
    for item in items:
        try:
            for sink in sinks:
                sink.send(item)
        finally:
            if item.kind == "figure":
                close_figure(item.value)
    return [sink.finish() for sink in sinks]


def markdown_table(table: Table, max_rows: int = 50) -> str:
    """A table as markdown, the first ``max_rows`` rows (a line says how many more)."""
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.rows[:max_rows]]
    if len(table.rows) > max_rows:
        lines.append(f"\n({len(table.rows) - max_rows} more rows in the CSV)")
    return "\n".join(lines)


def vectors_without_clusters(ds, method: str = "polca") -> list[int]:
    """The kept vectors on which the clustering found no cluster."""
    return [u for u in kept_units(ds, method) if F.cluster_members(ds, u, method)[1] == 0]


def _signal_method(method: str) -> str:
    return method if method in ("polca", "polca_first") else POLCA


def _vector_items(ds, u: int, method: str, decode_target, top_targets: int, ablated: bool) -> Iterator[ReportItem]:
    caption = lambda name: f"{method} vector {u}: {name}"  # noqa: E731 - the W&B captions of earlier reports
    yield ReportItem(f"vector_{u:02d}/projected_loss", "figure", caption("projected_loss"),
                     F.projected_loss_figure(ds, u, method=method))
    yield ReportItem(f"vector_{u:02d}/exact_loss", "figure", caption("exact_loss"),
                     F.exact_loss_figure(ds, u, method=method))
    yield ReportItem(f"vector_{u:02d}/labels", "figure", caption("labels"),
                     F.label_composition_figure(ds, u, method=method))
    if has_targets(ds):
        yield ReportItem(f"vector_{u:02d}/targets", "figure", caption("targets"),
                         F.cluster_targets_figure(ds, u, method=method, top=top_targets, decode_target=decode_target))
    if ablated:
        yield ReportItem(f"vector_{u:02d}/ablation", "figure", caption("ablation"), F.ablation_figure(ds, u, method))


def _overview(ds, method: str, units: list[int], empty: list[int], hidden: int, cov: dict) -> str:
    paper = (f"; the paper's τ (10% of the run) = {float(ds['tau_paper'].values):g}"
             if "tau_paper" in ds.variables else "")
    lines = [f"Method `{method}`; {len(units)} kept vector(s) of {METHODS[method].n_units(ds)}; "
             f"{tau_label(ds)}{paper}; hidden breakthroughs (a cluster onset after τ) among kept vectors: "
             f"{hidden}."]
    if empty:
        lines += ["", f"Kept vectors without clusters (no per-vector figures): {', '.join(map(str, empty))}."]
    lines += ["", "Coverage over the run: " + ", ".join(f"{k} = {v:.4g}" for k, v in cov["summary"].items()),
              "", COVERAGE_NOTE]
    return "\n".join(lines)


def report_items(ds, *, method: str = "polca", decode: Callable[[int, int], str] | None = None,
                 decode_target: Callable[[int], str] | None = None, k_nearest: int = 5, top_targets: int = 5,
                 progress: bool = False) -> Iterator[ReportItem]:
    """The items of the report of an analysed store, one at a time (table at the module top).

    Args:
        ds: store + results Dataset (``analyze_store``'s return value, or
            ``open_analysed_store`` of an analysed store).
        method: analysis method of the per-vector figures and tables.
        decode: ``decode(sequence, position) -> str`` for the medoid contexts' text column.
        decode_target: ``decode_target(token_id) -> str`` for the text of the clusters'
            most common targets (table and figures).
        k_nearest: tokens per cluster in the medoid-contexts table.
        top_targets: targets per cluster in the cluster-targets table and figures.
        progress: progress bar over vectors.

    Yields:
        :class:`ReportItem`. Figures are new and open; the caller closes them
        (:func:`send_report` does).

    Raises:
        ValueError: ``ds`` holds no analysis for ``method``.
    """
    units = kept_units(ds, method)
    ablated = set(ablated_units(ds, method))
    empty = vectors_without_clusters(ds, method)
    if not units:
        log.warning("POLCA report: the filter kept no %s vector; no per-vector figures", method)
    elif empty:
        log.info("POLCA report: no clusters on kept vector(s) %s; no per-vector figures for them", empty)
    drawn = [u for u in units if u not in empty]
    if "tau" in ds.variables:
        yield ReportItem("mean_loss", "figure", f"mean exact loss over training: {tau_label(ds)}, and the paper's "
                         "τ (10% of the run); a cluster whose onset is after τ is a hidden breakthrough",
                         F.mean_loss_figure(ds))
    bar = None
    if progress and drawn:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(drawn), desc="report figures", unit="vector")
    try:
        for u in drawn:
            yield from _vector_items(ds, u, method, decode_target, top_targets, u in ablated)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    yield ReportItem("summary", "table", "one row per vector: eigenvalue, kept, clusters, hidden "
                     "breakthroughs, onsets, best homogeneity per label value", summary_table(ds, method))
    yield ReportItem("medoid_contexts", "table", f"the {k_nearest} tokens nearest each cluster's medoid",
                     medoid_contexts_table(ds, method, k=k_nearest, decode=decode))
    targets = cluster_targets_table(ds, method, top=top_targets, decode_target=decode_target)
    if targets is not None:
        yield ReportItem("cluster_targets", "table", f"the {top_targets} most common targets per cluster: count, "
                         "share of the cluster, share of all tokens", targets)
    if ablated:
        yield ReportItem("ablation", "table", "per kept vector and group of tokens: mean loss change when the "
                         "vector's movement is undone, beside POLCA's allocation",
                         ablation_table(ds, method=method, labels=_labels(ds)))
        yield ReportItem("ablation_summary", "table", "per kept vector: does undoing it hurt its own clusters most",
                         ablation_summary(ds, method=method))
    app_g = appendix_g_table(ds)
    if app_g is not None:
        yield ReportItem("appendix_g", "table", "App. G: top clusters per label value and trajectory type", app_g)
        for label in sorted({row[0] for row in app_g.rows}):
            yield ReportItem(f"appendix_g_{label}", "figure", f"App. G: {label}", F.appendix_g_figure(ds, label))
    signal = signal_table(ds, _signal_method(method))
    if signal is not None:
        yield ReportItem("signal_check", "table", "per binary label: each vector's AUC (0.5: none) and "
                         "cross-validated accuracy, all vectors, the exact loss, the majority rate", signal)

    cov = store_coverage(ds)
    names = [k for k in cov if k not in ("interval", "step", "summary")]
    yield ReportItem("coverage", "series", "coverage per interval, at the interval's end step. " + COVERAGE_NOTE,
                     Series(np.asarray(cov["step"]), {n: np.asarray(cov[n]) for n in names}))
    if cov["step"].size:
        yield ReportItem("coverage_plot", "figure", "coverage: allocated vs real loss change per interval. "
                         + COVERAGE_NOTE, F.coverage_figure(cov))
    for k, v in cov["summary"].items():
        if np.isfinite(v):
            yield ReportItem(f"coverage_total/{k}", "scalar", f"coverage over the run: {k}", float(v))
    hidden_all = np.asarray(ds[F._prefix(method) + "hidden"].values, dtype=bool)
    hidden = int(hidden_all[units].sum()) if units else 0
    yield ReportItem("kept_vectors", "scalar", "vectors the filter kept", len(units))
    yield ReportItem("hidden_breakthroughs", "scalar", "hidden breakthroughs among the kept vectors", hidden)
    if "tau" in ds.variables:
        yield ReportItem("tau", "scalar", f"τ, the step after which a breakthrough counts as hidden ({tau_label(ds)})",
                         float(ds["tau"].values))
    if "tau_paper" in ds.variables:
        yield ReportItem("tau_paper", "scalar", "the paper's τ, 10% of the run (the appendix G comparison's)",
                         float(ds["tau_paper"].values))
    yield ReportItem("overview", "text", "what the report's numbers are", _overview(ds, method, units, empty, hidden,
                                                                                  cov))
