"""The analysis written back to the store, and the after-fit entry.

- :func:`analyze_store` runs :func:`polca_lightning.analysis.analyze` on a store, writes
  the results beside the training data (:func:`polca_lightning.store.write_analysis`) and
  returns the store reopened with them: the Dataset every figure and table reads.
- The tables (``report/tables.py``) are importable from here too.
- :func:`report_after_fit` is what both callbacks call at the end of training: the
  analysis, then the report's items (``content``) to the W&B and TensorBoard loggers or
  sinks it is given, or the folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np

from polca_lightning.analysis.tables import Table, kept_units
from polca_lightning.report.tables import (  # noqa: F401  (the tables stay importable from here)
    appendix_g_table,
    binary_labels,
    cluster_targets_table,
    has_targets,
    medoid_contexts_table,
    signal_table,
    store_coverage,
    summary_table,
)
from polca_lightning.store.schema import SNAPSHOT, STEP

__all__ = [  # the tables are importable from here too (report/tables.py)
    "ReportError",
    "analyze_store",
    "starting_settings",
    "settings_with",
    "open_analysed_store",
    "has_results",
    "result_variables",
    "default_report_dir",
    "report_after_fit",
]

log = logging.getLogger("polca_lightning")

#: attribute that marks a store variable as written by :func:`analyze_store`
RESULT_MARK = "analysis_timings"


class ReportError(RuntimeError):
    """The analysis or the report after ``fit`` failed; the store itself is complete."""


# ------------------------------------------------------------------ analysis -> store
def result_variables(res, store) -> dict[str, tuple[tuple[str, ...], np.ndarray, dict]]:
    """The variables of an ``analyze`` result as ``write_analysis`` takes them.

    Data variables and the result's own coordinates (``cluster_id``, ``entry_method``,
    ``trajectory_type``, ``carry_value``, ...) are kept; the store's coordinates
    (``snapshot``, ``token``, ``basis``, labels) are dropped. Variables along ``snapshot``
    computed on fewer snapshots than the store holds (an incomplete store) are padded
    with NaN. Every variable carries the analysis settings (``res.attrs``). Scalars
    (``tau``, ``tau_paper``, ``onset_delta``) are left out: the store keeps only arrays
    with named dimensions; they are in the settings (``analysis_tau``,
    ``analysis_tau_paper``, ``analysis_onset_delta``) and :func:`open_analysed_store`
    puts them back.
    """
    from polca_lightning.store import RESERVED_NAMES

    skip = set(RESERVED_NAMES) | set(store.attrs.get("token_labels", [])) | {"coordinates"}
    n_snap = int(store.sizes.get(SNAPSHOT, 0))
    out = {}
    for name in list(res.data_vars) + list(res.coords):
        if name in skip:
            continue
        var = res[name].variable
        if var.ndim == 0:
            continue
        values = np.asarray(var.values)
        if SNAPSHOT in var.dims and var.sizes[SNAPSHOT] < n_snap:
            axis = var.dims.index(SNAPSHOT)
            pad = [(0, 0)] * values.ndim
            pad[axis] = (0, n_snap - var.sizes[SNAPSHOT])
            values = np.pad(values.astype(np.float64), pad, constant_values=np.nan)
        out[name] = (tuple(var.dims), values, {**res.attrs, **var.attrs})
    return out


def _drop_stale_results(path, keep) -> None:
    """Delete results of an earlier ``analyze_store`` that the new one does not replace
    (e.g. a baseline left out this time), so that their sizes cannot clash."""
    from polca_lightning.store.writer import drop_marked_variables

    drop_marked_variables(path, set(keep), RESULT_MARK)


def analyze_store(path, *, write: bool = True, progress: bool = False, storage_options: dict | None = None,
                  settings=None, defaults: bool = False, **analysis_kwargs):
    """Analyse a store and (by default) write the results into it.

    The analysis starts from the settings of the analysis the store already holds
    (:meth:`~polca_lightning.analysis.AnalysisSettings.from_store`: its restriction, τ and
    Δ rules, HDBSCAN settings, ...) and changes only what ``analysis_kwargs`` give, so
    that a re-analysis with ``min_samples=5`` keeps everything else as the run had it.
    A store without an analysis starts from the defaults, and so does
    ``defaults=True``.

    Args:
        path: the store.
        write: write the results into the store (replacing an earlier analysis);
            with ``False`` the store is left untouched and the Dataset returned holds the
            new results in place of the earlier analysis', as writing would give it.
        progress: progress bar over clusterings.
        storage_options: options of a URL store's filesystem (see :func:`polca_lightning.open_store`).
        settings: an :class:`~polca_lightning.analysis.AnalysisSettings` to start from
            instead of the store's (``analysis_kwargs`` still change it).
        defaults: start from ``AnalysisSettings()``, not from the store's settings.
        **analysis_kwargs: settings by name (``min_cluster_size``, ``min_samples``, ``tau``,
            ``restrict``, ``group_by``, ...; see :func:`polca_lightning.analysis.analyze`).

    Returns:
        The store Dataset with the result variables (reopened from disk when written).

    Raises:
        FileNotFoundError, StoreError: no store at ``path``.
        ValueError: from ``analyze`` (bad settings, fewer than 3 complete snapshots), or
            settings the store recorded that do not make valid settings (pass
            ``defaults=True``).
        TypeError: ``settings`` together with ``defaults=True``, a ``settings`` that is
            not an ``AnalysisSettings``, or a keyword that is not a setting.

    Example:
        >>> ds = analyze_store("runs/polca.zarr", min_samples=5)   # the run's other settings kept
        >>> AnalysisSettings.from_store(ds).restrict
        {'carry': ('place', (1, 2))}
    """
    import xarray as xr

    from polca_lightning.analysis import analyze
    from polca_lightning.store.location import resolve_store
    from polca_lightning.store import open_store, write_analysis

    path = resolve_store(path, storage_options)
    store = open_store(path)
    base = starting_settings(store, settings=settings, defaults=defaults)
    res = analyze(store, settings_with(base, analysis_kwargs), progress=progress)
    variables = result_variables(res, store)
    if not write:  # what writing gives: the previous analysis' results all replaced or dropped
        previous = [name for name, var in store.variables.items() if RESULT_MARK in var.attrs]
        fresh = store.drop_vars(previous).assign({k: xr.Variable(d, v, a) for k, (d, v, a) in variables.items()})
        return _with_scalars(fresh)
    _drop_stale_results(path, set(variables))
    write_analysis(path, variables)
    log.info("POLCA: analysis written to %s (%d variables)", path, len(variables))
    return open_analysed_store(path)


def starting_settings(store, *, settings=None, defaults: bool = False):
    """What :func:`analyze_store` starts from: ``settings`` when given, the defaults with
    ``defaults=True`` or when ``store`` holds no analysis, else the settings of the
    analysis it holds (:meth:`AnalysisSettings.from_store`).

    Raises:
        TypeError: ``settings`` with ``defaults=True``, or not an ``AnalysisSettings``.
        ValueError: the store's recorded settings are not valid settings.
    """
    from polca_lightning.analysis import AnalysisSettings

    if settings is not None:
        if defaults:
            raise TypeError("analyze_store: give settings or defaults=True, not both")
        if not isinstance(settings, AnalysisSettings):
            raise TypeError(f"settings: expected an AnalysisSettings, got {type(settings).__name__}")
        return settings
    if defaults:
        return AnalysisSettings()
    try:
        recorded = AnalysisSettings.from_store(store)
    except (TypeError, ValueError) as error:
        raise ValueError(f"the store's recorded analysis settings are not valid ({error}); "
                         "start from the defaults instead (defaults=True, `polca analyze --defaults`)") from None
    return AnalysisSettings() if recorded is None else recorded


def settings_with(base, changes: dict):
    """``base`` (an ``AnalysisSettings``) with the settings in ``changes`` replaced, checked.

    Raises:
        TypeError: a name in ``changes`` that is not a setting.
        ValueError: a value out of its range.
    """
    if not changes:
        return base
    return type(base).from_dict({**base.to_dict(), **changes})


def _with_scalars(ds):
    """Restore the scalar results (``tau``, ``tau_paper``, ``onset_delta``) from the settings attributes."""
    from polca_lightning.analysis.recorded import analysis_scalar

    if "cluster" not in ds.variables:
        return ds
    scalars = {name: analysis_scalar(ds, name) for name in ("tau", "tau_paper", "onset_delta")
               if name not in ds.variables}
    scalars = {name: value for name, value in scalars.items() if not np.isnan(value)}
    return ds.assign(scalars) if scalars else ds


def has_results(ds) -> bool:
    """Whether a store Dataset holds results of :func:`analyze_store`."""
    return "cluster" in ds.variables and RESULT_MARK in ds["cluster"].attrs


def open_analysed_store(path, *, storage_options: dict | None = None):
    """``open_store(path)`` plus the scalar results (``tau``, ``tau_paper``, ``onset_delta``) of an
    analysis written by :func:`analyze_store` (without one: ``open_store(path)``)."""
    from polca_lightning.store import open_store

    return _with_scalars(open_store(path, storage_options=storage_options))


def default_report_dir(store_path) -> Path:
    """``<store>.report`` beside a local store: ``runs/polca.zarr`` -> ``runs/polca.zarr.report``.

    A URL store (``s3://bucket/runs/polca.zarr``) gets a local folder named after its last
    component in the working directory: ``./polca.zarr.report``.
    """
    from polca_lightning.store.location import resolve_store

    location = resolve_store(store_path)
    if location.remote:
        return Path(location.name + ".report")
    store_path = location.target
    return store_path.with_name(store_path.name + ".report")


# -------------------------------------------------------------------------- tables
# ---------------------------------------------------------------------- after fit
def report_after_fit(store_path, trainer=None, *, loggers=None, sinks=None, step: int | None = None,
                     decode: Callable[[int, int], str] | None = None,
                     decode_target: Callable[[int], str] | None = None,
                     analysis_kwargs: dict | None = None, progress: bool = True, report_dir=None,
                     storage_options: dict | None = None) -> Path | None:
    """Analyse the store of a finished run and report it (called by both callbacks).

    Runs :func:`analyze_store` (results written into the store), then sends the report
    (:func:`~polca_lightning.report.content.report_items`, each figure drawn once) to
    every ``WandbLogger`` (:class:`~polca_lightning.report.wandb_report.WandbSink`) and
    every ``TensorBoardLogger`` (:class:`~polca_lightning.report.tensorboard_report.TensorBoardSink`)
    among ``loggers`` (Lightning's or ``pytorch_lightning``'s), and to the ``sinks`` given
    (e.g. a ``WandbSink`` on an open W&B run, a ``TensorBoardSink`` on a ``SummaryWriter``:
    what the Hugging Face callback passes); with none of them, or when
    ``report_dir`` is given, writes the PNG/CSV folder
    (:class:`~polca_lightning.report.folder.FolderSink`) at ``report_dir`` (default
    :func:`default_report_dir`: ``<store>.report`` beside a local store, ``./<name>.report``
    in the working directory for a URL store). A folder written for want of a logger is
    logged at INFO and warned about once (``UserWarning``), with its location.

    Args:
        store_path: the finished store.
        trainer: the trainer; its ``loggers`` and ``global_step`` when ``loggers`` and
            ``step`` are not given.
        loggers: the loggers to report to (default: ``trainer.loggers``, none without a
            trainer).
        sinks: more report sinks (objects with ``send(item)`` and ``finish()``, made for
            the report's step), sent the same items after the loggers' sinks.
        step: step of the report (default: ``trainer.global_step``, else the store's last).
        decode: ``(sequence, position) -> str``, the medoid contexts' text.
        decode_target: ``token_id -> str``, the text of the clusters' most common targets.
        analysis_kwargs: settings of :func:`analyze_store`, on the defaults (an analysis
            the store held before is replaced, its settings not reused).
        progress: progress bars.
        report_dir: write the folder here (as well as to the loggers).
        storage_options: options of a URL store's filesystem.

    Returns:
        The report folder when one was written, else ``None``.

    Raises:
        ReportError: the analysis or the report failed. The store is already complete
            and closed; ``polca analyze STORE`` re-runs the analysis.
    """
    import warnings

    from polca_lightning.report.content import report_items, send_report
    from polca_lightning.report.folder import FolderSink
    from polca_lightning.report.tensorboard_report import TensorBoardSink, tensorboard_loggers
    from polca_lightning.report.wandb_report import WandbSink, wandb_loggers

    if loggers is None:
        loggers = list(getattr(trainer, "loggers", None) or [])
    if step is None and trainer is not None:
        step = int(trainer.global_step)
    analysis_kwargs = dict(analysis_kwargs or {})
    try:
        ds = analyze_store(store_path, progress=progress, storage_options=storage_options, defaults=True,
                           **analysis_kwargs)
    except Exception as error:
        raise ReportError(
            f"POLCA: the analysis after fit failed ({type(error).__name__}: {error}). The store "
            f"{str(store_path)!r} is complete; re-run it with `polca analyze {store_path}`"
        ) from error
    out = None
    try:
        step = int(ds[STEP].values[-1]) if step is None else int(step)
        given = list(sinks or [])
        sinks = [WandbSink(lg, step) for lg in wandb_loggers(loggers)]
        sinks += [TensorBoardSink.of(lg, step) for lg in tensorboard_loggers(loggers)]
        sinks += given
        fallback = not sinks
        if fallback or report_dir is not None:
            out = Path(report_dir or default_report_dir(store_path))
            sinks.append(FolderSink(out))
        send_report(report_items(ds, decode=decode, decode_target=decode_target, progress=progress), sinks)
    except Exception as error:
        raise ReportError(
            f"POLCA: the report after fit failed ({type(error).__name__}: {error}). The store "
            f"{str(store_path)!r} is complete and holds the analysis; `polca report {store_path}` draws it again"
        ) from error
    if out is not None:
        log.info("POLCA: report written to %s", out)
    if fallback:
        warnings.warn(f"POLCA: the run has no W&B or TensorBoard logger; the report is in {out} "
                      "(index.md lists its files)", UserWarning, stacklevel=2)
    return out
