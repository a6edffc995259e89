"""The report as a folder of PNG figures and CSV tables (when there is no W&B logger).

Layout of ``out_dir`` (default ``<store>.report`` beside the store)::

    index.md                          what is where, the summary table, coverage totals
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
    appendix_g_<label>.png            best homogeneity per trajectory type, per label
    vector_NN_projected_loss.png      per kept vector: cluster means, bands, onsets, τ
    vector_NN_exact_loss.png          cluster mean exact loss
    vector_NN_labels.png              label composition per cluster
    vector_NN_targets.png             most common targets per cluster (stores with targets)
    vector_NN_ablation.png            loss change per cluster when the vector is undone, beside
                                      POLCA's allocation (stores with an ablation)

Files of an earlier report with these names are replaced; other files are left alone.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

from polca_lightning.ablation import ablated_units, ablation_figure, ablation_summary, ablation_table
from polca_lightning.report import figures as F
from polca_lightning.report.pipeline import (
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

__all__ = ["write_report_folder"]

log = logging.getLogger("polca_lightning")


def _save(fig, path: Path, dpi: int) -> Path:
    fig.savefig(path, dpi=dpi)
    return path


def _markdown(table: Table, max_rows: int = 50) -> str:
    fmt = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in table.rows[:max_rows]]
    if len(table.rows) > max_rows:
        lines.append(f"\n({len(table.rows) - max_rows} more rows in the CSV)")
    return "\n".join(lines)


def write_report_folder(ds, out_dir, *, method: str = "polca", decode: Callable[[int, int], str] | None = None,
                        decode_target: Callable[[int], str] | None = None, k_nearest: int = 5,
                        top_targets: int = 5, dpi: int = 100, progress: bool = False) -> Path:
    """Write the report of an analysed store as PNG figures and CSV tables.

    Args:
        ds: store + results Dataset (``analyze_store``'s return value, or ``open_store`` of
            an analysed store).
        out_dir: folder to write (created if needed).
        method: analysis method of the per-vector figures and tables.
        decode: ``decode(sequence, position) -> str`` for the medoid contexts' text column.
        decode_target: ``decode_target(token_id) -> str`` for the text of the clusters'
            most common targets (table and figures).
        k_nearest: tokens per cluster in the medoid-contexts table.
        top_targets: targets per cluster in the cluster-targets table and figures.
        dpi: resolution of the PNGs.
        progress: progress bar over vectors.

    Returns:
        ``out_dir`` as a Path (layout in the module docstring).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    units = kept_units(ds, method)
    ablated = ablated_units(ds, method)
    files: list[str] = []
    bar = None
    if progress and units:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(units), desc="report figures", unit="vector")
    try:
        for u in units:
            for name, fn in (("projected_loss", F.projected_loss_figure), ("exact_loss", F.exact_loss_figure),
                             ("labels", F.label_composition_figure)):
                files.append(_save(fn(ds, u, method=method), out / f"vector_{u:02d}_{name}.png", dpi).name)
            if has_targets(ds):
                fig = F.cluster_targets_figure(ds, u, method=method, top=top_targets, decode_target=decode_target)
                files.append(_save(fig, out / f"vector_{u:02d}_targets.png", dpi).name)
            if u in ablated:
                files.append(_save(ablation_figure(ds, u, method), out / f"vector_{u:02d}_ablation.png", dpi).name)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    summary = summary_table(ds, method)
    summary.to_csv(out / "summary.csv")
    contexts = medoid_contexts_table(ds, method, k=k_nearest, decode=decode)
    contexts.to_csv(out / "medoid_contexts.csv")
    tables = ["summary.csv", "medoid_contexts.csv"]
    targets = cluster_targets_table(ds, method, top=top_targets, decode_target=decode_target)
    if targets is not None:
        targets.to_csv(out / "cluster_targets.csv")
        tables.append("cluster_targets.csv")
    if ablated:
        ablation_table(ds, method=method, labels=_labels(ds)).to_csv(out / "ablation.csv")
        ablation_summary(ds, method=method).to_csv(out / "ablation_summary.csv")
        tables += ["ablation.csv", "ablation_summary.csv"]
    app_g = appendix_g_table(ds)
    if app_g is not None:
        app_g.to_csv(out / "appendix_g.csv")
        tables.append("appendix_g.csv")
        for label in sorted({row[0] for row in app_g.rows}):
            files.append(_save(F.appendix_g_figure(ds, label), out / f"appendix_g_{label}.png", dpi).name)
    signal = signal_table(ds, method if method in ("polca", "polca_first") else "polca")
    if signal is not None:
        signal.to_csv(out / "signal_check.csv")
        tables.append("signal_check.csv")
    cov = store_coverage(ds)
    names = [k for k in cov if k not in ("interval", "summary")]
    Table(names, [[v.item() for v in values] for values in zip(*(cov[n] for n in names))]).to_csv(out / "coverage.csv")
    tables.append("coverage.csv")
    if cov["step"].size:
        files.append(_save(F.coverage_figure(cov), out / "coverage.png", dpi).name)

    tau = float(ds["tau"].values) if "tau" in ds.variables else float("nan")
    hidden = np.asarray(ds[F._prefix(method) + "hidden"].values, dtype=bool)
    text = [
        "# POLCA report",
        "",
        f"Method `{method}`; {len(units)} kept vector(s) of {len(summary.rows)}; "
        f"τ = {tau:g}; hidden breakthroughs among kept vectors: {int(hidden[units].sum()) if units else 0}.",
        "",
        "Coverage over the run: " + ", ".join(f"{k} = {v:.4g}" for k, v in cov["summary"].items()),
        "",
        "## Summary",
        "",
        _markdown(summary),
        "",
        *(["## Signal check", "",
           "How well each vector's projected-loss trajectory predicts each binary label: AUC of its "
           "final value (0.5: none), cross-validated linear accuracy of its trajectory, against all "
           "vectors together, the exact loss and the majority rate.", "",
           _markdown(signal, max_rows=100), ""] if signal is not None else []),
        "## Files",
        "",
        *[f"- [{name}]({name})" for name in files + tables],
        "",
    ]
    (out / "index.md").write_text("\n".join(text))
    log.info("POLCA report: %d figures and %d tables in %s", len(files), len(tables), out)
    return out
