"""The report's tables, from an analysed store (:class:`Table`: columns and rows of plain
Python values): :func:`summary_table`, :func:`medoid_contexts_table`,
:func:`cluster_targets_table`, :func:`appendix_g_table`, :func:`signal_table` (the signal
check of every binary label), and :func:`store_coverage`, the coverage diagnostic."""

from __future__ import annotations

import logging
from typing import Any, Callable

import numpy as np

from polca_lightning.analysis.methods import METHODS
from polca_lightning.analysis.tables import Table, cluster_members, kept_units, plain_value, unit_trajectories
from polca_lightning.report.appendix_g import appendix_g_table
from polca_lightning.report.conditioning import fixing_coordinates, restriction_text, restrictions, scored_labels
from polca_lightning.store.schema import (
    BASIS, BASIS_STEP, EIGENVALUE, INTERVAL, LOSS, POLCA, POLCA_FIRST, POSITION, SEQUENCE, SNAPSHOT, STEP, TARGET,
    TOKEN,
)

__all__ = [
    "Table",
    "kept_units",
    "store_coverage",
    "summary_table",
    "medoid_contexts_table",
    "has_targets",
    "cluster_targets_table",
    "appendix_g_table",
    "binary_labels",
    "signal_table",
]

_py = plain_value
_labels = scored_labels

log = logging.getLogger("polca_lightning")


def store_coverage(ds) -> dict:
    """Coverage: ``Σ_b POLCA`` summed over the basis against the real loss change.

    Per interval ``i`` (complete intervals only): ``allocated`` and ``real`` are the token
    means of ``Σ_b POLCA_i(x,b)`` and of ``ℓ_x(θ_{i+1}) - ℓ_x(θ_i)``; ``ratio`` their
    quotient; ``correlation`` the Pearson correlation over tokens; ``explained``
    ``1 - Σ_x (real - allocated)² / Σ_x real²``. ``first_*``: the same for first-order
    POLCA. ``summary``: over the whole run (sums over intervals), with the same names.

    Returns:
        dict of ``[interval]`` arrays (``interval``, ``step`` = end step of the interval)
        and ``summary`` (dict of floats).
    """
    loss = np.asarray(ds[LOSS].transpose(SNAPSHOT, TOKEN).values, dtype=np.float64)  # [S, T]
    real = np.diff(loss, axis=0)  # [I, T]
    out: dict[str, Any] = {}
    parts = [("", POLCA)] + ([("first_", POLCA_FIRST)] if POLCA_FIRST in ds.variables else [])
    ok = np.isfinite(real).all(axis=1)
    alloc_by = {}
    for prefix, name in parts:
        var = ds[name].transpose(INTERVAL, BASIS, TOKEN)
        alloc = np.empty_like(real)  # [I, T]; one interval at a time keeps memory at one [K, T] slab
        for i in range(real.shape[0]):
            alloc[i] = np.asarray(var[i].values, dtype=np.float64).sum(0)
        alloc_by[prefix] = alloc
        ok &= np.isfinite(alloc).all(axis=1)
    idx = np.flatnonzero(ok)
    out["interval"] = idx
    out["step"] = np.asarray(ds[STEP].values, dtype=np.int64)[idx + 1]
    r = real[idx]
    out["real"] = r.mean(axis=1)
    summary = {"real": float(r.sum(0).mean()) if idx.size else float("nan"), "n_intervals": int(idx.size)}
    for prefix, alloc in alloc_by.items():
        a = alloc[idx]
        ac, rc = a - a.mean(1, keepdims=True), r - r.mean(1, keepdims=True)
        denom = np.linalg.norm(ac, axis=1) * np.linalg.norm(rc, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out[prefix + "allocated"] = a.mean(axis=1)
            out[prefix + "ratio"] = a.sum(1) / r.sum(1)
            out[prefix + "correlation"] = np.where(denom > 0, (ac * rc).sum(1) / denom, np.nan)
            out[prefix + "explained"] = 1 - ((r - a) ** 2).sum(1) / np.maximum((r**2).sum(1), 1e-300)
            total_a, total_r = a.sum(0), r.sum(0)  # [T]: change over the whole run
            summary[prefix + "allocated"] = float(total_a.mean()) if idx.size else float("nan")
            summary[prefix + "ratio"] = float(total_a.sum() / total_r.sum()) if idx.size else float("nan")
            sse, ss = ((total_r - total_a) ** 2).sum(), max((total_r**2).sum(), 1e-300)
            summary[prefix + "explained"] = float(1 - sse / ss)
            corr = out[prefix + "correlation"]
            summary[prefix + "mean_correlation"] = float(np.nanmean(corr)) if np.isfinite(corr).any() else float("nan")
    out["summary"] = summary
    return out


def summary_table(ds, method: str = "polca") -> Table:
    """One row per unit (basis vector): eigenvalue, basis step, kept, clusters, outliers,
    hidden breakthroughs, onsets, and per label what its best cluster scores.

    Per label ``L``: ``restriction L`` (the App. G restriction in force, or ``none``:
    what ``eligible`` means below), then per value ``v``: ``best L=v`` (the highest
    homogeneity among this vector's clusters eligible for the value), ``chance L=v`` (that
    cluster's chance level: from its mix of the restriction's coordinate, or the base
    rate without one) and ``fixed_by L=v`` (the token labels or ``target`` that fix the
    label within that cluster, a warning; empty where none does).
    """
    spec, p = METHODS[method], METHODS[method].prefix
    labels = _labels(ds)
    em = np.asarray(ds["entry_method"].values).astype(str)
    eu = np.asarray(ds["entry_unit"].values)
    values = {lab: np.asarray(ds[f"{lab}_value"].values).tolist() for lab in labels}
    label_cols = []
    for lab in labels:
        label_cols.append(f"restriction {lab}")
        for v in values[lab]:
            label_cols += [f"best {lab}={v}", f"chance {lab}={v}", f"fixed_by {lab}={v}"]
    columns = ["vector", "eigenvalue", "basis_step", "kept", "tokens_kept", "clusters", "outliers",
               "hidden_breakthroughs", "onsets"] + label_cols
    n_units = spec.n_units(ds)
    label_cells = {}  # label -> per unit, the row's cells of the label
    for lab in labels:
        hom = np.asarray(ds[f"{lab}_homogeneity"].values)  # [entry, value]
        eligible = np.asarray(ds[f"{lab}_eligible"].values, dtype=bool) & np.isfinite(hom)
        chance = np.asarray(ds[f"{lab}_chance"].values) if f"{lab}_chance" in ds.variables else None
        best = np.full((n_units, len(values[lab])), -1)  # [unit, value] the best eligible cluster's entry
        for u in range(n_units):
            mine = (em == method) & (eu == u)
            for vi in range(len(values[lab])):
                idx = np.flatnonzero(mine & eligible[:, vi])
                if idx.size:
                    best[u, vi] = idx[np.argmax(hom[idx, vi])]
        shown = sorted({int(e) for e in best.ravel() if e >= 0})
        fixed = dict(zip(shown, fixing_coordinates(ds, lab, shown)))  # what fixes the label in each cluster
        where = restriction_text(ds, lab)
        label_cells[lab] = []
        for u in range(n_units):
            cells = [where]
            for vi, e in enumerate(best[u]):
                cells += ([None, None, None] if e < 0 else
                          [round(float(hom[e, vi]), 4), None if chance is None else round(float(chance[e, vi]), 4),
                           ", ".join(fixed[int(e)]) or None])
            label_cells[lab].append(cells)
    rows = []
    kept = set(kept_units(ds, method))
    for u in range(n_units):
        cl = np.asarray(ds[p + "cluster"].isel({spec.unit_dim: u}).values)
        n_c = int((np.asarray(ds[p + "cluster_size"].isel({spec.unit_dim: u}).values) > 0).sum())
        hidden = np.asarray(ds[p + "hidden"].isel({spec.unit_dim: u}).values, dtype=bool)[:n_c]
        onset = np.asarray(ds[p + "cluster_onset"].isel({spec.unit_dim: u}).values)[:n_c]
        row = [u, _py(ds[EIGENVALUE].values[u]) if EIGENVALUE in ds.variables else None,
               _py(ds[BASIS_STEP].values[u]) if BASIS_STEP in ds.variables else None,
               u in kept, int((cl != -2).sum()), n_c, int((cl == -1).sum()), int(hidden.sum()),
               " ".join(f"{o:g}" for o in onset)]
        for lab in labels:
            row += label_cells[lab][u]
        rows.append([_py(v) for v in row])
    return Table(columns, rows)


def medoid_contexts_table(ds, method: str = "polca", *, k: int = 5, units=None,
                          decode: Callable[[int, int], str] | None = None) -> Table:
    """The ``k`` member tokens nearest each cluster's medoid, per kept unit.

    Nearness is the Euclidean distance between full trajectories (``[snapshot]``) of the
    cluster's members and of its medoid (rank 0 is the medoid itself).

    Args:
        ds: store + results Dataset.
        method: analysis method.
        k: tokens per cluster.
        units: units to list (default: the kept ones).
        decode: optional ``decode(sequence, position) -> str``, the text around the
            token (the store keeps token coordinates, not the inputs, so the caller who
            has the probe data decodes). Adds a ``text`` column.

    Returns:
        Table with columns vector, cluster, rank, token, sequence, position, target,
        distance, one column per label, and ``text`` when ``decode`` is given.
    """
    labels = _labels(ds)
    columns = ["vector", "cluster", "rank", "token", "sequence", "position", "target", "distance"] + labels
    if decode is not None:
        columns.append("text")
    p = METHODS[method].prefix
    coords = {name: np.asarray(ds[name].values) for name in [SEQUENCE, POSITION] + labels}
    n_tokens = coords[SEQUENCE].shape[0]
    coords[TARGET] = np.asarray(ds[TARGET].values) if TARGET in ds.variables else np.full(n_tokens, -1)
    rows = []
    for u in kept_units(ds, method) if units is None else units:
        cl, n_c = cluster_members(ds, u, method)
        if not n_c:
            continue
        traj = unit_trajectories(ds, u, method)  # [snapshot, token]
        medoids = np.asarray(ds[p + "medoid"].isel({METHODS[method].unit_dim: u}).values)
        for c in range(n_c):
            members = np.flatnonzero(cl == c)
            m = int(medoids[c]) if medoids[c] >= 0 else int(members[0])
            dist = np.linalg.norm(traj[:, members] - traj[:, [m]], axis=0)  # [members]
            order = np.argsort(dist, kind="stable")[:k]
            for rank, j in enumerate(order):
                t = int(members[j])
                row = [u, c, rank, t] + [int(coords[n][t]) for n in (SEQUENCE, POSITION, TARGET)]
                row.append(float(dist[j]))
                row += [int(coords[n][t]) for n in labels]
                if decode is not None:
                    row.append(str(decode(int(coords[SEQUENCE][t]), int(coords[POSITION][t]))))
                rows.append(row)
    return Table(columns, rows)


def has_targets(ds) -> bool:
    """Whether a store Dataset records target token ids (a ``target`` coordinate with at
    least one token whose target is known, i.e. ``>= 0``)."""
    if TARGET not in ds.variables:
        return False
    return bool((np.asarray(ds[TARGET].values) >= 0).any())


def cluster_targets_table(ds, method: str = "polca", *, top: int = 5, units=None,
                          decode_target: Callable[[int], str] | None = None) -> Table | None:
    """The target tokens most common in each cluster, per kept unit.

    For every cluster of every listed unit: its ``top`` most frequent target token ids
    (ties broken by the smaller id), how many of the cluster's tokens predict each
    (``count``), their share of the cluster (``share`` = count / cluster size; tokens
    without a target, ``-1``, count in the size but are never listed) and, to compare,
    the target's share among all the store's tokens (``base_share``): a share well above
    the base share is what the cluster is about; the most common word of the probe
    tops many clusters without meaning anything. Outliers (-1) and tokens the filter
    dropped (-2) are not clusters and are not listed.

    Args:
        ds: store + results Dataset.
        method: analysis method (a key of ``polca_lightning.analysis.METHODS``).
        top: targets listed per cluster (fewer when a cluster has fewer distinct ones).
        units: units to list (default: the kept ones).
        decode_target: optional ``decode_target(token_id) -> str``, the text of a token
            id (e.g. a tokenizer's ``decode``). Adds a ``text`` column.

    Returns:
        Table with columns vector, cluster, cluster_size, rank, target, count, share,
        base_share, and ``text`` when ``decode_target`` is given; ``None`` when the store
        has no ``target`` coordinate or no token with a target (``token_loss`` returned
        no target).

    Raises:
        ValueError: ``top`` is not a positive int, or ``method`` is unknown.
        TypeError: ``decode_target`` is not callable.

    Example:
        >>> table = cluster_targets_table(ds, top=3, decode_target=tokenizer.decode)
        >>> table.columns
        ['vector', 'cluster', 'cluster_size', 'rank', 'target', 'count', 'share', 'base_share', 'text']
    """
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ValueError(f"top: expected a positive int, got {top!r}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    if decode_target is not None and not callable(decode_target):
        raise TypeError(f"decode_target: expected a callable token_id -> str, got {decode_target!r}")
    if not has_targets(ds):
        return None
    target = np.asarray(ds[TARGET].values).astype(np.int64)  # [token]
    ids, counts = np.unique(target[target >= 0], return_counts=True)
    base = dict(zip(ids.tolist(), (counts / target.size).tolist()))
    columns = ["vector", "cluster", "cluster_size", "rank", "target", "count", "share", "base_share"]
    if decode_target is not None:
        columns.append("text")
    rows = []
    for u in kept_units(ds, method) if units is None else units:
        cl, n_c = cluster_members(ds, int(u), method)
        for c in range(n_c):
            members = target[cl == c]
            size = int(members.size)
            if not size:
                continue
            ids, counts = np.unique(members[members >= 0], return_counts=True)
            order = np.lexsort((ids, -counts))[:top]  # most common first, then the smaller id
            for rank, j in enumerate(order):
                t, n = int(ids[j]), int(counts[j])
                row = [int(u), c, size, rank, t, n, n / size, base[t]]
                if decode_target is not None:
                    row.append(str(decode_target(t)))
                rows.append(row)
    return Table(columns, rows)


def binary_labels(ds) -> list[str]:
    """The store's label coordinates that are binary: values 0 and 1 (both present)
    once negative values ("not applicable", e.g. ``-1``) are left out."""
    out = []
    for lab in _labels(ds):
        if lab not in ds.coords or ds[lab].dims != (TOKEN,) or ds[lab].dtype.kind not in "biuf":
            continue
        values = np.unique(np.asarray(ds[lab].values))
        values = values[np.isfinite(values) & (values >= 0)]
        if values.tolist() == [0, 1]:
            out.append(lab)
    return out


def signal_table(ds, method: str = "polca", *, folds: int = 5, seed: int = 0) -> Table | None:
    """The signal check of every binary label of the store, as one table.

    For each label of :func:`binary_labels`, :func:`polca_lightning.analysis.signal_check`
    on the tokens of the App. G restriction the analysis recorded for that label
    (``analysis_restrict``, e.g. carry among the 10s and 100s places), or on all tokens
    when there is none. A label the check cannot score (too few tokens of a class, a
    restriction naming a coordinate the store lacks) is left out with a log message.

    Args:
        ds: store Dataset, analysed or not.
        method: the POLCA variable (``"polca"`` or ``"polca_first"``).
        folds: cross-validation folds.
        seed: seed of the folds.

    Returns:
        Table with columns label, where, basis (text: a vector index, or ``all vectors``,
        ``exact loss``, ``majority``), auc, accuracy, n_tokens, n_positive; ``None``
        when the store has no binary label (or none could be scored) or no ``method``.

    Example:
        >>> table = signal_table(analyze_store("runs/polca.zarr"))
        >>> table.rows[0][:3]
        ['carry', 'place in [1, 2]', '0']
    """
    from polca_lightning.analysis.signal import signal_check, signal_check_table

    if method not in ds.variables:
        return None
    restrict = restrictions(ds)
    rows = []
    for lab in binary_labels(ds):
        spec = restrict.get(lab)
        where = {spec[0]: list(spec[1])} if isinstance(spec, (list, tuple)) and len(spec) == 2 else None
        try:
            res = signal_check(ds, lab, where=where, folds=folds, seed=seed, method=method)
        except ValueError as error:
            log.info("POLCA report: no signal check for label %r: %s", lab, error)
            continue
        n, n_pos = int(res["n_tokens"]), int(res["n_positive"])
        for basis, auc, acc in signal_check_table(res).itertuples(index=False):
            rows.append([lab, res.attrs["where"], str(basis), _py(float(auc)), _py(float(acc)), n, n_pos])
    if not rows:
        return None
    return Table(["label", "where", "basis", "auc", "accuracy", "n_tokens", "n_positive"], rows)
