"""The causal check's numbers: what undoing a basis vector's movement did to each cluster.

:func:`polca_lightning.ablate_directions` (torch, in ``polca_lightning.ablation``) writes
into the store, per ablated basis vector ``b``, every probe token's loss change
``ℓ_x(θ_end - α_b b) - ℓ_x(θ_end)`` (``ablation_loss_change [basis, token]``, NaN rows
for vectors not ablated), the coefficient ``α_b = <θ_end - θ_0, b>``
(``ablation_coefficient [basis]``) and the end loss (``ablation_end_loss [token]``).
This module reads those variables and the analysis' clusters (numpy on the Dataset):

- :func:`ablated_units`: the kept vectors that have ablation results;
- :func:`ablation_table`: per vector and group of tokens (each cluster, outliers,
  filtered tokens, all), the mean loss change beside the loss change POLCA allocated;
- :func:`ablation_summary`: per vector, whether undoing it hurts its own clusters most.

The figure is :func:`polca_lightning.report.figures.ablation_figure`.

Example:
    >>> from polca_lightning.analysis.ablation import ablation_summary
    >>> from polca_lightning.report import open_analysed_store
    >>> ablation_summary(open_analysed_store("runs/polca.zarr")).columns[:3]
    ['vector', 'coefficient', 'mean_loss_change']
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from polca_lightning.analysis.methods import METHODS
from polca_lightning.analysis.tables import Table, kept_units, plain_value as _py
from polca_lightning.store.schema import BASIS, INTERVAL, TOKEN

__all__ = ["ablated_units", "ablation_table", "ablation_summary"]



def ablated_units(ds, method: str = "polca") -> list[int]:
    """The vectors the analysis kept that have ablation results (none without them)."""
    if "ablation_loss_change" not in ds.variables or "cluster" not in ds.variables or \
            method not in ("polca", "polca_first"):
        return []
    done = np.isfinite(np.asarray(ds["ablation_loss_change"].values)).any(axis=1)  # [basis]
    return [u for u in kept_units(ds, method) if done[u]]


def _check_ablated(ds) -> None:
    if "ablation_loss_change" not in ds.variables:
        raise ValueError(
            "the store holds no ablation: run POLCACallback(ablate=True) (the default) or "
            "polca_lightning.ablate_directions(store, model, token_loss, probe_batches)")
    if "cluster" not in ds.variables:
        raise ValueError("the store holds no analysis: run `polca analyze STORE` first")


def _ablation_inputs(ds, units, method):
    """Checked ``units``, the loss changes ``[K, T]``, POLCA's allocation ``[K, T]`` (Σ over
    intervals) and ``clusters(u) -> [T]`` of ``method``."""
    _check_ablated(ds)
    if method not in ("polca", "polca_first"):
        raise ValueError(f"method: expected 'polca' or 'polca_first' (the basis-vector methods), got {method!r}")
    change = np.asarray(ds["ablation_loss_change"].values, dtype=np.float64)  # [K, T]
    ablated = np.isfinite(change).any(axis=1)
    units = ablated_units(ds, method) if units is None else [int(u) for u in units]
    for u in units:
        if not 0 <= u < change.shape[0] or not ablated[u]:
            raise ValueError(f"units: vector {u} was not ablated")
    total = np.asarray(ds[METHODS[method].variable].sum(INTERVAL, skipna=False)
                       .transpose(BASIS, TOKEN).values, dtype=np.float64)  # [K, T]
    cluster = ds[METHODS[method].prefix + "cluster"]
    return units, change, total, lambda u: np.asarray(cluster.isel(basis=u).values)


def _most_affected(change: np.ndarray, cl: np.ndarray) -> int:
    """The cluster (label >= 0) whose tokens' mean loss change is largest; -1 without clusters."""
    n_c = int(cl.max(initial=-1)) + 1
    means = [float(np.mean(change[cl == c])) if (cl == c).any() else np.nan for c in range(n_c)]
    return int(np.nanargmax(means)) if n_c and np.isfinite(means).any() else -1


def ablation_table(ds, units: Sequence[int] | None = None, method: str = "polca",
                   labels: str | Sequence[str] | None = None):
    """Each cluster's mean loss change when its vector is undone, beside what POLCA allocated.

    One row per (vector, group of tokens), where the groups of a vector are its clusters,
    its HDBSCAN outliers, the tokens the §4.1 filter dropped, and all tokens (column
    ``tokens``: ``"cluster 0"``, ..., ``"outliers"``, ``"filtered"``, ``"all"``). Columns:

    - ``loss_change``: mean ``ℓ(θ_ablated) - ℓ(θ_end)`` over the group's tokens;
    - ``polca_total``: mean projected loss at the end of training (Σ over intervals of
      the vector's POLCA): the loss change POLCA allocated to the vector;
    - ``rest``: mean loss change of the tokens outside the group;
    - ``most_affected``: the cluster with the largest mean loss change of this vector;
    - per name in ``labels``: ``<label>`` and ``<label>_share``, the group's most common
      value of that token coordinate and the fraction of the group's tokens that have it.

    Args:
        ds: an analysed store with ablation results (:func:`~polca_lightning.report.open_analysed_store`).
        units: vectors (default: the vectors the analysis kept that were ablated).
        method: ``polca`` or ``polca_first`` (whose clusters and allocation to use).
        labels: token coordinates (e.g. ``carry``) to describe each group by.

    Returns:
        A :class:`polca_lightning.report.Table`.

    Raises:
        ValueError: a store without ablation or analysis, a vector that was not ablated,
            another ``method``, or a label that is not a token coordinate.
    """
    units, change_all, total, clusters = _ablation_inputs(ds, units, method)
    coefficient = np.asarray(ds["ablation_coefficient"].values)
    columns = ["vector", "coefficient", "tokens", "cluster", "size", "loss_change", "rest", "polca_total",
               "most_affected"]
    labels = [labels] if isinstance(labels, str) else list(labels or [])
    values = []
    for label in labels:
        if label not in ds.coords or ds[label].dims != (TOKEN,):
            options = [c for c in ds.coords if ds[c].dims == (TOKEN,)]
            raise ValueError(f"labels: expected token coordinates (of {options}), got {label!r}")
        values.append(np.asarray(ds[label].values))
        columns += [label, f"{label}_share"]
    rows = []
    for u in units:
        change, cl = change_all[u], clusters(u)  # [T], [T]
        n_c = int(cl.max(initial=-1)) + 1
        top = _most_affected(change, cl)
        groups = [(f"cluster {c}", c, cl == c) for c in range(n_c)]
        groups += [("outliers", -1, cl == -1), ("filtered", -2, cl == -2), ("all", None, np.ones_like(cl, bool))]
        for name, c, sel in groups:
            if not sel.any():
                continue
            rest = change[~sel]
            row = [u, coefficient[u], name, c, int(sel.sum()), float(change[sel].mean()),
                   float(rest.mean()) if rest.size else None, float(np.mean(total[u, sel])), top >= 0 and c == top]
            for v in values:
                kinds, counts = np.unique(v[sel], return_counts=True)
                row += [kinds[np.argmax(counts)], counts.max() / sel.sum()]
            rows.append([_py(v) for v in row])
    return Table(columns, rows)


def ablation_summary(ds, units: Sequence[int] | None = None, method: str = "polca"):
    """Per vector: does undoing it hurt its own clusters most?

    Columns: ``vector``, ``coefficient``, ``mean_loss_change`` (all tokens),
    ``clustered_loss_change`` (tokens in a cluster), ``unclustered_loss_change`` (the
    others), ``correlation`` (Pearson, over tokens, between the loss change and minus the
    POLCA allocated to the vector: positive when tokens whose loss fell along the vector
    get it back), and ``most_affected_cluster``.

    Raises:
        ValueError: as :func:`ablation_table`.
    """
    units, change_all, total, clusters = _ablation_inputs(ds, units, method)
    rows = []
    for u in units:
        change, cl = change_all[u], clusters(u)  # [T], [T]
        top = _most_affected(change, cl)
        ok = np.isfinite(change) & np.isfinite(total[u])
        corr = np.corrcoef(change[ok], -total[u, ok])[0, 1] if ok.sum() > 2 and change[ok].std() > 0 else np.nan
        inside = cl >= 0
        rows.append([_py(v) for v in (
            u, float(ds["ablation_coefficient"].values[u]), float(change.mean()),
            float(change[inside].mean()) if inside.any() else np.nan,
            float(change[~inside].mean()) if (~inside).any() else np.nan, corr, top if top >= 0 else None)])
    return Table(["vector", "coefficient", "mean_loss_change", "clustered_loss_change", "unclustered_loss_change",
                  "correlation", "most_affected_cluster"], rows)
