"""Scoring clusters against known token labels (paper App. G).

Per cluster ``C`` and label value ``v`` (``L_v`` = tokens whose label is ``v``):

- homogeneity ``h = |C ∩ L_v| / |C|`` (the fraction of the cluster with the label);
- recall ``r = |C ∩ L_v| / |L_v ∩ U|`` where ``U`` is, by default (``recall_over=
  "clustered"``), the tokens in *some* cluster of the same clustering: App. G excludes
  HDBSCAN outliers (and we also exclude tokens filtered out before clustering) from
  recall and F1. ``recall_over="all"`` divides by every token with the label instead;
- F1 ``2 h r / (h + r)`` (0 when both are 0).

Optional restriction (App. G, carries): a cluster is *eligible* for value ``v`` only if
more than ``restrict_fraction`` of its tokens with label ``v`` are in the restriction
mask. The paper keeps carry clusters whose carry tokens are mostly in the 10s or 100s
place (``place`` 1 or 2 here), because carrying into the 1000s place just means "the
first digit is a 1", which every trajectory type recovers. The threshold itself did not
survive in our copy of the paper; we use 0.5 (a majority) by default: a cluster of
carries at every place (2/3 of them at 10s/100s) passes, a 1000s-place cluster fails.

``clustering_scores`` adds torchmetrics' homogeneity, completeness and V-measure
(entropy based, over the whole clustering) on the clustered tokens only: torchmetrics
treats -1 as an ordinary cluster, so outliers and filtered tokens are dropped first.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["label_scores", "best_clusters", "clustering_scores"]


def label_scores(
    cluster: np.ndarray,
    label: np.ndarray,
    values: np.ndarray | None = None,
    *,
    restrict: np.ndarray | None = None,
    restrict_fraction: float = 0.5,
    recall_over: str = "clustered",
    n_clusters: int | None = None,
) -> dict[str, np.ndarray]:
    """Homogeneity, recall, F1 (and eligibility) of every cluster for every label value.

    Args:
        cluster: ``[token]`` cluster labels (``< 0``: outlier or not clustered).
        label: ``[token]`` integer label of each token.
        values: label values to score (default: the sorted unique values of ``label``).
        restrict: ``[token]`` bool restriction mask (App. G), or None (all eligible).
        restrict_fraction: eligibility threshold, see the module docstring.
        recall_over: ``"clustered"`` (default, App. G) or ``"all"``.
        n_clusters: number of cluster ids (default ``cluster.max() + 1``).

    Returns:
        dict with ``values [V]``, ``size [C]`` and ``homogeneity``, ``recall``, ``f1``
        (float, ``[C, V]``, NaN for empty clusters) and ``eligible`` (bool ``[C, V]``).

    Example:
        >>> s = label_scores(np.array([0, 0, 0, 1, -1]), np.array([1, 1, 0, 1, 1]), [1])
        >>> s["homogeneity"][:, 0].round(3).tolist(), s["recall"][:, 0].round(3).tolist()
        ([0.667, 1.0], [0.667, 0.333])
    """
    cluster = np.asarray(cluster)
    label = np.asarray(label)
    if cluster.shape != label.shape or cluster.ndim != 1:
        raise ValueError(
            f"cluster and label must be 1-d of the same length, got {cluster.shape} and {label.shape}"
        )
    if recall_over not in ("clustered", "all"):
        raise ValueError(f"recall_over must be 'clustered' or 'all', got {recall_over!r}")
    values = np.unique(label) if values is None else np.asarray(values)
    if n_clusters is None:
        n_clusters = int(cluster.max(initial=-1)) + 1
    in_c = cluster >= 0
    # one-hot [token, C] and [token, V] via bincount on a joint index
    onehot_v = label[:, None] == values[None, :]  # [token, V]
    size = np.bincount(cluster[in_c], minlength=n_clusters)[:n_clusters]  # [C]
    both = np.zeros((n_clusters, values.size))
    np.add.at(both, cluster[in_c], onehot_v[in_c].astype(np.float64))  # [C, V]
    denom = onehot_v[in_c].sum(axis=0) if recall_over == "clustered" else onehot_v.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        h = np.where(size[:, None] > 0, both / size[:, None], np.nan)
        r = np.where(denom[None, :] > 0, both / denom[None, :], np.nan)
        r = np.where(size[:, None] > 0, r, np.nan)
        f1 = np.where(h + r > 0, 2 * h * r / (h + r), 0.0)
        f1 = np.where(np.isnan(h) | np.isnan(r), np.nan, f1)
    if restrict is None:
        eligible = np.broadcast_to(size[:, None] > 0, (n_clusters, values.size)).copy()
    else:
        restrict = np.asarray(restrict, dtype=bool)
        if restrict.shape != cluster.shape:
            raise ValueError(f"restrict must have shape {cluster.shape}, got {restrict.shape}")
        inside = np.zeros((n_clusters, values.size))
        sel = in_c & restrict
        np.add.at(inside, cluster[sel], onehot_v[sel].astype(np.float64))  # [C, V]
        with np.errstate(invalid="ignore", divide="ignore"):
            eligible = (both > 0) & (inside / np.where(both > 0, both, 1) > restrict_fraction)
    return {
        "values": values,
        "size": size,
        "homogeneity": h,
        "recall": r,
        "f1": f1,
        "eligible": np.asarray(eligible, dtype=bool),
    }


def best_clusters(
    homogeneity: np.ndarray,
    unit: np.ndarray,
    eligible: np.ndarray | None = None,
    top_k: int = 3,
) -> np.ndarray:
    """Indices of the ``top_k`` most homogeneous clusters, at most one per unit (App. G).

    App. G takes, per basis vector, the cluster with the highest fraction of the label
    and reports the top three vectors. ``unit`` identifies the clustering each entry
    comes from (the basis vector).

    Args:
        homogeneity: ``[entry]`` scores (NaN = not a candidate).
        unit: ``[entry]`` clustering id of each entry.
        eligible: ``[entry]`` bool, or None (all).
        top_k: how many to return.

    Returns:
        ``[top_k]`` entry indices, best first, padded with -1.
    """
    homogeneity = np.asarray(homogeneity, dtype=np.float64)
    unit = np.asarray(unit)
    ok = np.isfinite(homogeneity)
    if eligible is not None:
        ok &= np.asarray(eligible, dtype=bool)
    idx = np.flatnonzero(ok)
    idx = idx[np.argsort(-homogeneity[idx], kind="stable")]  # best first
    _, first = np.unique(unit[idx], return_index=True)  # best entry of each unit
    best = idx[np.sort(first)][:top_k]
    return np.concatenate([best, np.full(top_k - best.size, -1, dtype=np.int64)]).astype(np.int64)


def clustering_scores(cluster: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """torchmetrics' homogeneity, completeness and V-measure on the clustered tokens.

    Args:
        cluster: ``[token]`` cluster labels; tokens with ``cluster < 0`` are dropped.
        label: ``[token]`` integer labels (the "true classes").

    Returns:
        ``{"homogeneity": h, "completeness": c, "v_measure": v}``; NaN when no token is
        clustered.

    Raises:
        ImportError: torchmetrics (and torch) not installed.
    """
    try:
        import torch
        from torchmetrics.functional.clustering import (
            completeness_score,
            homogeneity_score,
            v_measure_score,
        )
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "clustering_scores needs torchmetrics: pip install 'torchmetrics>=1.4'"
        ) from err
    cluster = np.asarray(cluster)
    label = np.asarray(label)
    keep = cluster >= 0
    if not keep.any():
        return {"homogeneity": np.nan, "completeness": np.nan, "v_measure": np.nan}
    preds = torch.as_tensor(cluster[keep].astype(np.int64))
    target = torch.as_tensor(label[keep].astype(np.int64))
    with warnings.catch_warnings():  # torch's note on sparse invariant checks, per call
        warnings.filterwarnings("ignore", message="Sparse invariant checks")
        return {
            "homogeneity": float(homogeneity_score(preds, target)),
            "completeness": float(completeness_score(preds, target)),
            "v_measure": float(v_measure_score(preds, target)),
        }
