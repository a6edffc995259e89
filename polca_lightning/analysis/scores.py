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
mask. The camera-ready paper's protocol: "only clusters for which over 85% of the
tokens with the carry skill are in the 10s or 100s place are counted" (``place`` 1 or 2
here), because carrying into the 1000s place just means "the first digit is a 1",
which every trajectory type recovers. ``restrict_fraction`` is therefore 0.85 by
default; 0.5 (a majority, the default of earlier versions, when our copy of the paper
had lost the number) lets in a cluster of carries at every place (2/3 of them at
10s/100s), which 0.85 turns away. A 1000s-place cluster fails both.

Chance level. A cluster that knows nothing of the label but knows the restriction's
coordinate (the place, for carries) scores the label's rate in its mix of places: with
uniform operands the carry rate is 0 in the 1s place, 0.45 in the 10s, 0.495 in the
100s. ``chance_homogeneity`` is that expected homogeneity, ``Σ_g share_g(C) ×
rate_g(v)``: ``share_g(C)`` the fraction of the cluster's tokens in group ``g``,
``rate_g(v)`` the fraction of *all* tokens of group ``g`` (clustered or not) with label
``v``. Without a group coordinate it is the label's rate among all tokens. A
homogeneity means something only against it: a cluster of 10s-place tokens has carry
homogeneity 0.45 by knowing the place alone.

A label fixed by other coordinates (``fixed_by``). A cluster's label can be what other
token coordinates give everywhere: at the 1000s place of 3-digit addition the carry *is*
the digit (the sum's leading digit is 1 exactly when the 100s column carries), so a
cluster of 1000s digits scores carry homogeneity near 1 by holding those targets,
whatever its trajectories say. The rule reads the coordinates over the whole store:

- a token's label is *determined* by coordinates ``K`` (one, or a pair such as place and
  target) when at least ``min_count`` tokens of the store share its values of ``K`` (its
  stratum) and at least ``fraction`` of them share its label value (``determined``);
- ``K`` *fixes* label ``L`` within a cluster when ``K`` determines ``L`` for at least
  ``fraction`` of the cluster's tokens, and does not determine it for ``fraction`` of all
  the store's tokens (strata of any size: a label that is a function of ``K`` by
  construction, as a word's kind is of the word, would flag every cluster; so would a
  label that never varies).

The 1000s cluster is fixed by place and target together (neither alone: target 1 at the
10s place carries or not, and half the 1000s digits carry); a cluster of 1s-place
tokens is fixed by place alone (nothing carries into the 1s); a cluster of 10s-place
carries is fixed by nothing (the 10s digit does not say whether it received a carry).
``fraction`` is 0.9 and ``min_count`` 5 by default (``FIXED_FRACTION``,
``FIXED_MIN_COUNT``).

``clustering_scores`` adds torchmetrics' homogeneity, completeness and V-measure
(entropy based, over the whole clustering) on the clustered tokens only: torchmetrics
treats -1 as an ordinary cluster, so outliers and filtered tokens are dropped first.
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["label_scores", "chance_homogeneity", "best_clusters", "clustering_scores", "determined", "fixing",
           "fixed_by", "FIXED_FRACTION", "FIXED_MIN_COUNT"]

#: App. G eligibility threshold (camera-ready: "over 85%")
APPENDIX_G_FRACTION = 0.85

#: ``fixed_by``: the share of a cluster's tokens (and of a stratum) that must agree
FIXED_FRACTION = 0.9
#: ``fixed_by``: tokens a stratum needs to determine its tokens' label
FIXED_MIN_COUNT = 5


def label_scores(
    cluster: np.ndarray,
    label: np.ndarray,
    values: np.ndarray | None = None,
    *,
    restrict: np.ndarray | None = None,
    restrict_fraction: float = APPENDIX_G_FRACTION,
    group: np.ndarray | None = None,
    recall_over: str = "clustered",
    n_clusters: int | None = None,
) -> dict[str, np.ndarray]:
    """Homogeneity, recall, F1, chance level and eligibility of every cluster and label value.

    Args:
        cluster: ``[token]`` cluster labels (``< 0``: outlier or not clustered).
        label: ``[token]`` integer label of each token.
        values: label values to score (default: the sorted unique values of ``label``).
        restrict: ``[token]`` bool restriction mask (App. G), or None (all eligible).
        restrict_fraction: eligibility threshold: a cluster is eligible for ``v`` when
            strictly more than this fraction of its tokens with ``v`` are in
            ``restrict`` (0.85, the camera-ready App. G; see the module docstring).
        group: ``[token]`` coordinate the chance level conditions on (for carries:
            ``place``), or None (chance = the label's rate among all tokens).
        recall_over: ``"clustered"`` (default, App. G) or ``"all"``.
        n_clusters: number of cluster ids (default ``cluster.max() + 1``).

    Returns:
        dict with ``values [V]``, ``size [C]`` and ``homogeneity``, ``recall``, ``f1``,
        ``chance`` (float, ``[C, V]``, NaN for empty clusters; ``chance`` from
        ``chance_homogeneity``) and ``eligible`` (bool ``[C, V]``).

    Raises:
        ValueError: arrays of different shapes, a ``restrict_fraction`` outside [0, 1),
            an unknown ``recall_over``.

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
    if not 0 <= restrict_fraction < 1:
        raise ValueError(f"restrict_fraction must be in [0, 1), got {restrict_fraction!r}")
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
        "chance": chance_homogeneity(cluster, label, values, group=group, n_clusters=n_clusters),
        "eligible": np.asarray(eligible, dtype=bool),
    }


def chance_homogeneity(
    cluster: np.ndarray,
    label: np.ndarray,
    values: np.ndarray | None = None,
    *,
    group: np.ndarray | None = None,
    n_clusters: int | None = None,
) -> np.ndarray:
    """The homogeneity each cluster would have from its composition over ``group`` alone.

    ``chance[C, v] = Σ_g share_g(C) rate_g(v)``: ``share_g(C)`` the fraction of cluster
    ``C``'s tokens in group ``g``, ``rate_g(v)`` the fraction of all tokens of group ``g``
    (every token given, clustered or not) whose label is ``v``.

    Args:
        cluster: ``[token]`` cluster labels (``< 0``: outlier or not clustered).
        label: ``[token]`` integer label of each token.
        values: label values (default: the sorted unique values of ``label``).
        group: ``[token]`` group of each token (e.g. ``place``), or None: one group, so
            every cluster's chance is the label's rate among all tokens.
        n_clusters: number of cluster ids (default ``cluster.max() + 1``).

    Returns:
        ``[C, V]`` float, NaN for empty clusters.

    Example:
        >>> place = np.array([2] * 4 + [1] * 2)     # 10s place: 2 carries of 4; 100s: 2 of 2
        >>> carry = np.array([1, 1, 0, 0, 1, 1])
        >>> chance_homogeneity(np.array([0, 0, 0, 1, 1, -1]), carry, [1], group=place).round(4).tolist()
        [[0.5], [0.75]]
    """
    cluster = np.asarray(cluster)
    label = np.asarray(label)
    values = np.unique(label) if values is None else np.asarray(values)
    if group is None:
        group = np.zeros(label.shape, dtype=np.int64)
    group = np.asarray(group)
    if not (cluster.shape == label.shape == group.shape) or cluster.ndim != 1:
        raise ValueError(f"cluster, label and group must be 1-d of the same length, got "
                         f"{cluster.shape}, {label.shape} and {group.shape}")
    if n_clusters is None:
        n_clusters = int(cluster.max(initial=-1)) + 1
    _, gi = np.unique(group, return_inverse=True)  # [token] group index
    n_g = int(gi.max(initial=-1)) + 1
    onehot_v = (label[:, None] == values[None, :]).astype(np.float64)  # [token, V]
    per_group = np.zeros((n_g, values.size))
    np.add.at(per_group, gi, onehot_v)
    rate = per_group / np.bincount(gi, minlength=n_g)[:, None]  # [G, V]
    in_c = cluster >= 0
    counts = np.zeros((n_clusters, n_g))  # [C, G] tokens of each cluster in each group
    np.add.at(counts, (cluster[in_c], gi[in_c]), 1.0)
    size = counts.sum(axis=1, keepdims=True)  # [C, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(size > 0, (counts / size) @ rate, np.nan)


def determined(label: np.ndarray, coordinates, *, fraction: float = FIXED_FRACTION,
               min_count: int = FIXED_MIN_COUNT) -> np.ndarray:
    """``[token]`` bool: whether each token's label is what its values of ``coordinates``
    give over all the tokens (module docstring): at least ``min_count`` tokens share its
    stratum (its values of every coordinate) and at least ``fraction`` of those share its
    label value.

    Args:
        label: ``[token]`` label of every token.
        coordinates: one ``[token]`` array, or a sequence of them (their values jointly).
        fraction: share of the stratum that must share the token's label.
        min_count: tokens a stratum needs to determine anything.

    Raises:
        ValueError: arrays of different shapes, ``fraction`` outside (0, 1].

    Example:
        >>> place = np.array([0, 0, 0, 0, 3, 3])
        >>> digit = np.array([1, 1, 0, 0, 1, 0])
        >>> carry = np.array([1, 1, 0, 0, 0, 0])      # at place 0 the carry is the digit
        >>> determined(carry, [place, digit], min_count=2).tolist()
        [True, True, True, True, False, False]
        >>> determined(carry, place, min_count=2).tolist()
        [False, False, False, False, True, True]
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    label = np.asarray(label)
    coords = [np.asarray(coordinates)] if isinstance(coordinates, np.ndarray) else [np.asarray(c) for c in coordinates]
    if label.ndim != 1 or any(c.shape != label.shape for c in coords):
        raise ValueError(f"label and coordinates must be 1-d of one length, got {label.shape} and "
                         f"{[c.shape for c in coords]}")
    if not label.size:
        return np.zeros(0, dtype=bool)
    # [token] stratum index: the joint values of the coordinates
    _, stratum = np.unique(np.stack(coords, axis=1), axis=0, return_inverse=True)
    stratum = stratum.reshape(-1)
    _, li = np.unique(label, return_inverse=True)
    li = li.reshape(-1)
    joint = np.zeros((int(stratum.max()) + 1, int(li.max()) + 1))  # [stratum, label value] counts
    np.add.at(joint, (stratum, li), 1.0)
    size = joint.sum(axis=1)  # [stratum]
    share = joint[stratum, li] / size[stratum]  # [token] the stratum's share of the token's label
    return (size[stratum] >= min_count) & (share >= fraction)


def fixing(label: np.ndarray, coordinates, *, fraction: float = FIXED_FRACTION,
           min_count: int = FIXED_MIN_COUNT) -> np.ndarray | None:
    """The tokens whose label ``coordinates`` determine (:func:`determined`), or None where
    the coordinates determine it for ``fraction`` of all tokens (strata of any size): then
    they fix the label by construction, everywhere, and no cluster is flagged for it.
    :func:`fixed_by` of a cluster is this mask's share among its members; computed once, it
    serves every cluster of the store.

    Example:
        >>> place = np.repeat([0, 2], 10)
        >>> carry = np.where(place == 0, 1, np.tile([0, 1], 10))
        >>> fixing(carry, place).tolist() == [True] * 10 + [False] * 10
        True
    """
    if determined(label, coordinates, fraction=fraction, min_count=1).mean() >= fraction:
        return None
    return determined(label, coordinates, fraction=fraction, min_count=min_count)


def fixed_by(members: np.ndarray, label: np.ndarray, coordinates, *, fraction: float = FIXED_FRACTION,
             min_count: int = FIXED_MIN_COUNT) -> bool:
    """Whether ``coordinates`` fix ``label`` within the cluster ``members`` (module docstring).

    Args:
        members: ``[token]`` bool, the cluster's tokens.
        label: ``[token]`` label of every token of the store.
        coordinates: one ``[token]`` array or a sequence of them (jointly, e.g. place and target).
        fraction: share of the cluster that must be determined (and of each stratum that
            must share a token's label).
        min_count: tokens a stratum needs to determine anything.

    Returns:
        True when the coordinates determine the label for ``fraction`` of the members but
        not for ``fraction`` of all tokens (:func:`fixing`).

    Raises:
        ValueError: as :func:`determined`, or ``members`` of another shape.

    Example:
        >>> place = np.repeat([0, 2], 10)            # ten 1000s digits, ten 10s digits
        >>> digit = np.tile([0, 1], 10)
        >>> carry = np.where(place == 0, digit, np.tile([0, 0, 1, 1], 5))   # the 1000s digit is the carry
        >>> fixed_by(place == 0, carry, [place, digit]), fixed_by(place == 2, carry, [place, digit])
        (True, False)
    """
    members = np.asarray(members, dtype=bool)
    if members.shape != np.shape(label):
        raise ValueError(f"members must have the shape of label {np.shape(label)}, got {members.shape}")
    if not members.any():
        return False
    mask = fixing(label, coordinates, fraction=fraction, min_count=min_count)
    return mask is not None and bool(mask[members].mean() >= fraction)


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
