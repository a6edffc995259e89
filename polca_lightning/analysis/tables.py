"""Reading analysis results: :class:`Table` (what the report sends and the CLI prints),
:func:`plain_value`, :func:`kept_units` (the vectors the filter kept), and one unit's
:func:`cluster_members` and :func:`unit_trajectories` as the analysis clustered them."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from polca_lightning.store.schema import SNAPSHOT

from .methods import METHODS

__all__ = ["Table", "plain_value", "kept_units", "cluster_members", "unit_trajectories"]


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
