"""Reading analysis results: :class:`Table` (what the report sends and the CLI prints),
:func:`plain_value`, :func:`kept_units` (the vectors the filter kept), one unit's
:func:`cluster_members` and :func:`unit_trajectories` as the analysis clustered them, and
:func:`check_hidden_flags` (every hidden flag is its cluster's drawn onset against τ)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from polca_lightning.store.schema import SNAPSHOT

from .methods import METHODS
from .recorded import analysis_scalar

__all__ = ["Table", "plain_value", "kept_units", "cluster_members", "unit_trajectories", "check_hidden_flags"]


@dataclass
class Table:
    """A table as ``columns`` and ``rows`` of plain Python values (``None`` for missing)."""

    columns: list[str]
    rows: list[list[Any]]

    def to_csv(self, path: str | os.PathLike) -> None:
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(self.columns)
            writer.writerows([["" if v is None else v for v in row] for row in self.rows])


def plain_value(value: Any) -> Any:
    """A numpy scalar as a plain Python value; NaN as None (W&B tables and CSV)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def kept_units(ds, method: str = "polca") -> list[int]:
    """Units (basis vectors) the §4.1 filter kept, in order."""
    kept = METHODS[method].prefix + "kept"
    if kept not in ds.variables:
        return list(range(METHODS[method].n_units(ds)))
    return np.flatnonzero(np.asarray(ds[kept].values, dtype=bool)).tolist()


def _prefix(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    return METHODS[method].prefix


def _n_snapshots(ds, method: str) -> int:
    """Snapshots the analysis used (the complete prefix; results are NaN-padded past it)."""
    var = ds[_prefix(method) + "cluster_trajectory"]
    return int(var.attrs.get("analysis_n_snapshots_used", var.sizes[SNAPSHOT]))


def _check_results(ds, method: str) -> str:
    p = _prefix(method)
    if p + "cluster" not in ds.variables:
        raise ValueError(f"ds has no analysis results for method {method!r} (variable {p + 'cluster'!r}); "
                         "run polca_lightning.report.analyze_store or `polca analyze` first")
    return p


def unit_trajectories(ds, unit: int, method: str = "polca") -> np.ndarray:
    """``[snapshot, token]`` trajectories of one unit, as the analysis clustered them."""
    return METHODS[method].trajectory(ds, unit, _n_snapshots(ds, method))


def cluster_members(ds, unit: int, method: str = "polca") -> tuple[np.ndarray, int]:
    """``(labels [token], n_clusters)`` of one unit (``-1`` outliers, ``-2`` filtered out)."""
    p = _check_results(ds, method)
    sel = {} if METHODS[method].unit_dim is None else {METHODS[method].unit_dim: unit}
    labels = np.asarray(ds[p + "cluster"].isel(sel).values)
    sizes = np.asarray(ds[p + "cluster_size"].isel(sel).values)
    return labels, int((sizes > 0).sum())


def _hidden_mismatches(onset, flags, tau: float) -> int:
    onset = np.asarray(onset, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        expected = np.isfinite(onset) & (onset > tau)
    return int((np.asarray(flags, dtype=bool) != expected).sum())


def check_hidden_flags(ds) -> int:
    """Check that every hidden flag of an analysed store is ``cluster_onset > tau``.

    For every trajectory type in ``trajectory_type``: ``<prefix>hidden`` against
    ``<prefix>cluster_onset`` (the onset of the cluster's mean curve, the one the figures
    draw), ``entry_hidden`` against ``entry_onset`` and ``hidden_fraction`` against the
    mean of ``entry_hidden``; with ``tau_paper`` the same for ``entry_hidden_paper`` and
    ``hidden_fraction_paper``. A cluster without an onset (NaN) is never hidden.

    Args:
        ds: an analysed store (``open_store``, ``open_analysed_store``, ``analyze_store``)
            or an ``analyze`` result: τ comes from its ``tau`` (and ``tau_paper``), or from
            the ``analysis_tau`` attributes the analysis records on ``cluster``.

    Returns:
        The number of clusters checked (entries of the cluster table).

    Raises:
        ValueError: ``ds`` has no analysis results or no τ, or a flag disagrees
            (the message names the variable, the trajectory type and how many disagree).

    Example:
        >>> from polca_lightning.analysis import analyze, make_synthetic_store
        >>> check_hidden_flags(analyze(make_synthetic_store(50, 40, 4), methods=["polca", "loss"])) > 0
        True
    """
    for name in ("trajectory_type", "entry_onset", "entry_hidden"):
        if name not in ds.variables:
            raise ValueError(f"ds has no {name!r}: not an analysed store (run analyze_store or polca analyze)")
    tau, tau_paper = analysis_scalar(ds, "tau"), analysis_scalar(ds, "tau_paper")  # open_store: the attributes
    if np.isnan(tau):
        raise ValueError("ds has no 'tau': neither the variable nor the analysis_tau attribute")
    bad = []
    em = np.asarray(ds["entry_method"].values).astype(str)
    onset = np.asarray(ds["entry_onset"].values, dtype=np.float64)
    taus = [("", tau)]
    if not np.isnan(tau_paper) and "entry_hidden_paper" in ds.variables:
        taus.append(("_paper", tau_paper))
    for suffix, t in taus:
        flags = np.asarray(ds["entry_hidden" + suffix].values, dtype=bool)
        fraction = np.asarray(ds["hidden_fraction" + suffix].values, dtype=np.float64)
        for i, m in enumerate(np.asarray(ds["trajectory_type"].values).astype(str)):
            mine = em == m
            n = _hidden_mismatches(onset[mine], flags[mine], t)
            if n:
                bad.append(f"entry_hidden{suffix} ({m}): {n} of {int(mine.sum())}")
            if mine.any() and not np.isclose(fraction[i], flags[mine].mean()):
                bad.append(f"hidden_fraction{suffix} ({m}): {fraction[i]:.4g}, not {flags[mine].mean():.4g}")
    for m in np.asarray(ds["trajectory_type"].values).astype(str):
        p = _check_results(ds, m)
        n = _hidden_mismatches(ds[p + "cluster_onset"].values, ds[p + "hidden"].values, tau)
        if n:
            bad.append(f"{p}hidden ({m}): {n} clusters")
    if bad:
        raise ValueError("hidden flags that are not cluster_onset > tau: " + "; ".join(bad))
    return int(onset.size)
