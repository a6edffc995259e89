"""HDBSCAN on trajectories: dimension reduction, clustering, medoids.

Labels: ``>= 0`` a cluster, ``OUTLIER = -1`` what HDBSCAN calls noise, ``FILTERED = -2``
tokens that were not clustered at all (filtered out by §4.1, or along a vector that was
not kept). Cluster ids are numbered ``0..n-1`` in order of decreasing size within each
clustering, so cluster 0 is the largest.

Why reduce first: HDBSCAN's density estimate degrades in high dimension (every point
becomes noise) and its cost grows with dimension (~75 s for 10k points x 500 dims). We
average the trajectory over ``time_points`` equal blocks of snapshots (a low-pass filter
that keeps *when* a drop happens at a resolution of ``1/time_points`` of the run), then
keep the top ``n_components`` principal components (no whitening: small components are
mostly noise and whitening would blow them up). Euclidean distances in that space
approximate those between the full trajectories (``test_analysis_clustering`` shows the
clusters agree, adjusted Rand >= 0.9).

Defaults and why (the paper's, min_cluster_size ≈ 3 % of the tokens and
``min_samples = tokens / 15``, label every POLCA trajectory noise at 1,200 tokens):

- ``min_cluster_size = 0.03``: a fraction (< 1) of the tokens in the clustering, at
  least 5 -- the paper's relative size (150 of 5000 tokens).
- ``min_samples = 10``: the neighbourhood for the core distance. ``tokens / 15``
  (80-330 points) smooths the density so much that groups whose drops differ only in
  timing merge or dissolve into noise: on planted data (``make_synthetic_store``, 5000
  tokens, 200 intervals, noisy) the best F1 of a planted group fell to 0.59-0.88 with
  ``1/15`` against 0.77-1.0 with 10 (5 and 25 behave like 10). A small fixed
  neighbourhood keeps the density local. Pass ``min_samples=1/15`` for the paper's.
- ``normalize=None``: trajectories keep their size, so a token whose loss moved a lot along
  a vector lies far from one that hardly moved, whatever their timing. ``"token"`` divides
  each token's trajectory by its root mean square over the snapshots first, so that tokens
  cluster by the *shape* of their curve alone (when they moved, not how much); tokens that
  never moved (root mean square 0) stay at 0. It is the clustering to try where a vector's
  projected losses are tiny for most tokens (a random direction in millions of dimensions
  sees about ``1/sqrt(d)`` of each token's change) and the magnitudes hide the timing.
- ``cluster_selection_method="eom"`` (HDBSCAN's default). "leaf" keeps more scattered
  tokens as outliers but cut planted timing groups into fragments (58 of 80 members
  called noise in ``test_analysis_clustering``'s data); EOM kept every group whole and
  let ~20 % of the scattered tokens join the nearest group.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np

__all__ = [
    "OUTLIER",
    "FILTERED",
    "NORMALIZE",
    "ClusterSettings",
    "normalize_tokens",
    "reduce_trajectories",
    "cluster_points",
    "cluster_trajectories",
    "cluster_medoids",
]

OUTLIER = -1
FILTERED = -2
#: the per-token normalisations of ``ClusterSettings.normalize``
NORMALIZE = (None, "token")


@dataclass(frozen=True)
class ClusterSettings:
    """Settings of one HDBSCAN clustering of trajectories.

    Attributes:
        min_cluster_size: int (tokens) or float in (0, 1) (fraction of the tokens in
            this clustering, rounded, at least 5).
        min_samples: int, float in (0, 1) (fraction of tokens; the paper's 1/15 is
            ``1/15``), or None (= the resolved min_cluster_size, HDBSCAN's default).
            Capped at the resolved min_cluster_size.
        n_components: principal components kept (None: no PCA).
        time_points: blocks of snapshots averaged before PCA (None: no downsampling).
        cluster_selection_method: ``"eom"`` or ``"leaf"``.
        n_jobs: threads for HDBSCAN's core distances.
        normalize: ``None`` (trajectories as they are) or ``"token"`` (each token's
            trajectory divided by its root mean square over the snapshots, before the
            reduction: clusters of shape, not size).
    """

    min_cluster_size: float = 0.03
    min_samples: float | None = 10
    n_components: int | None = 10
    time_points: int | None = 64
    cluster_selection_method: str = "eom"
    n_jobs: int = 2
    normalize: str | None = None

    def __post_init__(self):
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {list(NORMALIZE)}, got {self.normalize!r}")
        if not (self.min_cluster_size > 0):
            raise ValueError(f"min_cluster_size must be > 0, got {self.min_cluster_size}")
        if self.min_samples is not None and not (self.min_samples > 0):
            raise ValueError(f"min_samples must be > 0 or None, got {self.min_samples}")
        if self.n_components is not None and self.n_components < 1:
            raise ValueError(f"n_components must be >= 1 or None, got {self.n_components}")
        if self.time_points is not None and self.time_points < 2:
            raise ValueError(f"time_points must be >= 2 or None, got {self.time_points}")
        if self.cluster_selection_method not in ("eom", "leaf"):
            raise ValueError(
                f"cluster_selection_method must be 'eom' or 'leaf', got {self.cluster_selection_method!r}"
            )

    def resolve(self, n: int) -> tuple[int, int]:
        """``(min_cluster_size, min_samples)`` in tokens for a clustering of ``n`` tokens."""
        mcs = self.min_cluster_size
        mcs = int(round(mcs * n)) if mcs < 1 else int(mcs)
        mcs = max(5, mcs) if self.min_cluster_size < 1 else max(2, mcs)
        ms = self.min_samples
        if ms is None:
            ms = mcs
        elif ms < 1:
            ms = int(round(ms * n))
        ms = int(max(1, ms))
        return mcs, ms


def reduce_trajectories(
    traj: np.ndarray, *, time_points: int | None = 64, n_components: int | None = 10
) -> np.ndarray:
    """Block-average over time, then project on the top principal components.

    Args:
        traj: ``[token, snapshot]`` trajectories (one row per token).
        time_points: number of equal blocks of snapshots to average (None: keep all).
        n_components: principal components to keep (None: no PCA).

    Returns:
        ``[token, d]`` float64, ``d <= min(n_components, time_points, token)``.
    """
    x = np.asarray(traj, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"traj must be [token, snapshot], got shape {x.shape}")
    n, t = x.shape
    if time_points is not None and t > time_points:
        edges = np.linspace(0, t, time_points + 1).round().astype(int)  # block boundaries
        xt = x.T  # [snapshot, token]; contiguous when traj came in as a [snapshot, token].T view
        blocks = np.add.reduceat(xt, edges[:-1], axis=0) / np.diff(edges)[:, None]  # [blocks, token]
        x = np.ascontiguousarray(blocks.T)  # [token, time_points]
    if n_components is None or n < 2:
        return x
    x = x - x.mean(axis=0)
    k = min(n_components, x.shape[1], n)
    # principal axes from the small [time, time] covariance, not an SVD of [token, time]
    _, vecs = np.linalg.eigh(x.T @ x)  # ascending eigenvalues
    return x @ vecs[:, ::-1][:, :k]  # [token, k]


def normalize_tokens(traj: np.ndarray) -> np.ndarray:
    """Each row of ``traj [token, snapshot]`` divided by its root mean square (rows of
    zeros stay zeros): the trajectories' shapes, without their sizes.

    Example:
        >>> normalize_tokens(np.array([[0.0, -2.0, -4.0], [0.0, -0.001, -0.002], [0.0, 0.0, 0.0]])).round(3)
        array([[ 0.   , -0.775, -1.549],
               [ 0.   , -0.775, -1.549],
               [ 0.   ,  0.   ,  0.   ]])
    """
    x = np.asarray(traj, dtype=np.float64)
    rms = np.sqrt(np.mean(x * x, axis=1, keepdims=True))
    return np.divide(x, rms, out=np.zeros_like(x), where=rms > 0)


def single_threaded_blas():
    """Context limiting BLAS to one thread (via threadpoolctl when installed).

    Our matrices are small (``[time, time]`` covariances, cluster blocks); OpenBLAS
    threads on them cost more than they save, 10-40x more on a loaded 2-core machine.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it, BLAS keeps its own setting
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _relabel_by_size(labels: np.ndarray) -> np.ndarray:
    ids, counts = np.unique(labels[labels >= 0], return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")]
    out = np.full_like(labels, OUTLIER)
    for new, old in enumerate(order):
        out[labels == old] = new
    return out


def cluster_points(x: np.ndarray, settings: ClusterSettings = ClusterSettings()) -> np.ndarray:
    """HDBSCAN on already reduced points ``x [token, d]``; returns labels ``[token]``.

    Fewer points than ``min_cluster_size`` (or than 2) come back all outliers.
    """
    import hdbscan  # heavy import (numba-free but compiled); only when clustering

    n = x.shape[0]
    mcs, ms = settings.resolve(n)
    if n < max(mcs, 2):
        return np.full(n, OUTLIER, dtype=np.int64)
    if not np.all(np.isfinite(x)):
        raise ValueError("trajectories to cluster contain NaN or inf; filter them first")
    model = hdbscan.HDBSCAN(
        min_cluster_size=mcs,
        min_samples=ms,
        cluster_selection_method=settings.cluster_selection_method,
        core_dist_n_jobs=settings.n_jobs,
    )
    labels = model.fit_predict(x).astype(np.int64)
    return _relabel_by_size(labels)


def cluster_trajectories(
    traj: np.ndarray,
    settings: ClusterSettings = ClusterSettings(),
    *,
    mask: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    return_reduced: bool = False,
    timings: dict | None = None,
):
    """Cluster token trajectories with HDBSCAN after dimension reduction.

    Args:
        traj: ``[token, snapshot]`` trajectories.
        settings: ``ClusterSettings``.
        mask: ``[token]`` bool, tokens to cluster (others get ``FILTERED``).
        groups: ``[token]`` ints: cluster each group separately (e.g. the target token,
            as the v1 paper did); ids stay unique across groups (group by group, each
            group's clusters by decreasing size). ``min_cluster_size`` fractions then
            refer to each group's size.
        return_reduced: also return the reduced points (``[token, d]``, NaN rows for
            unclustered tokens), e.g. for ``cluster_medoids``.
        timings: if a dict, seconds spent are added to its ``"reduce"`` and
            ``"hdbscan"`` keys.

    Returns:
        labels ``[token]`` int64, or ``(labels, reduced)``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> t = np.arange(100)
        >>> early = -1 / (1 + np.exp(-(t - 30) / 3)); late = -1 / (1 + np.exp(-(t - 70) / 3))
        >>> traj = np.concatenate([early + 0.02 * rng.normal(size=(60, 100)),
        ...                        late + 0.02 * rng.normal(size=(60, 100))])
        >>> labels = cluster_trajectories(traj)
        >>> len(set(labels[:60])), len(set(labels[60:])), bool(labels[0] != labels[-1])
        (1, 1, True)
    """
    traj = np.asarray(traj)
    if traj.ndim != 2:
        raise ValueError(f"traj must be [token, snapshot], got shape {traj.shape}")
    n = traj.shape[0]
    mask = np.ones(n, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"mask must have shape ({n},), got {mask.shape}")
    if groups is None:
        groups = np.zeros(n, dtype=np.int64)
    groups = np.asarray(groups)
    if groups.shape != (n,):
        raise ValueError(f"groups must have shape ({n},), got {groups.shape}")
    labels = np.full(n, FILTERED, dtype=np.int64)
    reduced = None
    offset = 0
    with single_threaded_blas():
        for g in np.unique(groups[mask]):
            reduced, offset = _cluster_group(
                traj, mask & (groups == g), settings, labels, reduced, offset, return_reduced, timings
            )
    if return_reduced:
        if reduced is None:
            reduced = np.full((n, 0), np.nan)
        return labels, reduced
    return labels


def _cluster_group(traj, sel, settings, labels, reduced, offset, return_reduced, timings):
    """Cluster the tokens ``sel`` of one group, writing ``labels`` in place.

    Returns the (possibly widened) ``reduced`` array and the next free cluster id.
    """
    n = traj.shape[0]
    idx = np.flatnonzero(sel)
    t0 = time.perf_counter()
    # gather along the contiguous axis: a [snapshot, token] array passed as .T stays fast
    sub = traj.T[:, idx].T if traj.T.flags.c_contiguous else traj[idx]  # [k, snapshot]
    if settings.normalize == "token":
        sub = normalize_tokens(sub)
    x = reduce_trajectories(sub, time_points=settings.time_points, n_components=settings.n_components)
    t1 = time.perf_counter()
    lab = cluster_points(x, settings)
    if timings is not None:
        timings["reduce"] = timings.get("reduce", 0.0) + t1 - t0
        timings["hdbscan"] = timings.get("hdbscan", 0.0) + time.perf_counter() - t1
    labels[idx] = np.where(lab >= 0, lab + offset, OUTLIER)
    offset += int(lab.max(initial=-1)) + 1
    if return_reduced:
        if reduced is None or reduced.shape[1] < x.shape[1]:  # groups may differ in d
            old = reduced
            reduced = np.full((n, x.shape[1]), np.nan)
            if old is not None:
                reduced[:, : old.shape[1]] = old
        reduced[idx, : x.shape[1]] = x
    return reduced, offset


def cluster_medoids(x: np.ndarray, labels: np.ndarray, *, chunk: int = 1024) -> np.ndarray:
    """Medoid of each cluster: the member minimising its summed distance to the others.

    Args:
        x: ``[token, d]`` points (e.g. the reduced trajectories; NaN in columns past a
            group's dimension count as 0).
        labels: ``[token]`` cluster labels (negative = not in a cluster).
        chunk: rows per block of the pairwise-distance computation (memory bound
            ``chunk * cluster size`` floats).

    Returns:
        ``[n_clusters]`` token indices, ``n_clusters = labels.max() + 1``; -1 for ids with
        no member.
    """
    x = np.nan_to_num(np.asarray(x, dtype=np.float64))
    labels = np.asarray(labels)
    n_clusters = int(labels.max(initial=-1)) + 1
    out = np.full(n_clusters, -1, dtype=np.int64)
    with single_threaded_blas():
        for c in range(n_clusters):
            out[c] = _medoid(x, np.flatnonzero(labels == c), chunk)
    return out


def _medoid(x: np.ndarray, idx: np.ndarray, chunk: int) -> int:
    if idx.size == 0:
        return -1
    pts = x[idx].astype(np.float32)  # [m, d]; float32 halves the cost of the m x m block
    pts -= pts.mean(axis=0)  # centring keeps float32 distances accurate
    sq = (pts * pts).sum(axis=1)
    total = np.empty(idx.size)
    for start in range(0, idx.size, chunk):
        blk = pts[start : start + chunk]  # [b, d]
        d2 = sq[start : start + chunk, None] + sq[None, :] - 2 * blk @ pts.T  # [b, m]
        total[start : start + chunk] = np.sqrt(np.maximum(d2, 0)).sum(axis=1)
    return int(idx[np.argmin(total)])
