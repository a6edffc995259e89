"""HDBSCAN on trajectories: planted groups, outliers, reduction, medoids."""

import numpy as np
import pytest

from polca_lightning.analysis import (
    FILTERED,
    OUTLIER,
    ClusterSettings,
    cluster_medoids,
    cluster_trajectories,
    reduce_trajectories,
)
from polca_lightning.analysis.clustering import normalize_tokens


def drops(t, onsets, amp=1.0, width=3.0):
    return -amp / (1 + np.exp(-(t[None, :] - np.asarray(onsets)[:, None]) / width))


def planted(rng, n_group=80, n_noise=40, n_time=120, onsets=(35, 75), noise=0.02):
    """Groups whose drops differ only in WHEN, plus scattered noise tokens."""
    t = np.arange(n_time, dtype=float)
    rows, truth = [], []
    for g, on in enumerate(onsets):
        rows.append(drops(t, np.full(n_group, on)))
        truth += [g] * n_group
    # noise tokens, scattered: half drop at random times by random amounts over random
    # widths, half are volatile random walks without a breakthrough
    k = n_noise // 2
    rows.append(drops(t, rng.uniform(0, n_time, k), rng.uniform(0.3, 3.0, (k, 1)),
                      rng.uniform(1, 20, (k, 1))))
    rows.append(rng.normal(0, 0.15, (n_noise - k, n_time)).cumsum(axis=1))
    truth += [-1] * n_noise
    x = np.concatenate(rows) + rng.normal(0, noise, (len(truth), n_time)).cumsum(axis=1) / 4
    return x, np.array(truth)


def adjusted_rand(a, b):
    """Adjusted Rand index from the contingency table (Hubert & Arabie)."""
    _, ai = np.unique(a, return_inverse=True)
    _, bi = np.unique(b, return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)
    comb = lambda n: n * (n - 1) / 2  # noqa: E731
    sum_ij = comb(table).sum()
    sum_a, sum_b = comb(table.sum(1)).sum(), comb(table.sum(0)).sum()
    expected = sum_a * sum_b / comb(len(a))
    return (sum_ij - expected) / (0.5 * (sum_a + sum_b) - expected)


def test_recovers_timing_groups_and_noise_is_outlier():
    x, truth = planted(np.random.default_rng(0))
    labels = cluster_trajectories(x)
    for g in (0, 1):
        members = labels[truth == g]
        top = np.bincount(members[members >= 0]).argmax()
        assert np.mean(members == top) >= 0.95  # recall of the planted group
        assert np.mean(truth[labels == top] == g) >= 0.9  # purity of its cluster
    early = np.bincount(labels[truth == 0][labels[truth == 0] >= 0]).argmax()
    late = np.bincount(labels[truth == 1][labels[truth == 1] >= 0]).argmax()
    assert early != late
    # EOM lets a few noise tokens that happen to look like a group join it (here 8 of 40)
    assert np.mean(labels[truth == -1] == OUTLIER) >= 0.65
    # ids ordered by decreasing size
    sizes = np.bincount(labels[labels >= 0])
    assert np.all(np.diff(sizes) <= 0)


def test_reduced_clusters_agree_with_full_dimension():
    x, truth = planted(np.random.default_rng(1), n_group=120, n_noise=30, n_time=300,
                       onsets=(60, 150, 240))
    full = cluster_trajectories(x, ClusterSettings(n_components=None, time_points=None))
    reduced = cluster_trajectories(x)  # defaults: 64 time blocks, 10 components
    assert adjusted_rand(full, reduced) >= 0.9
    assert adjusted_rand(np.where(truth >= 0, truth, -1), reduced) >= 0.9


def test_reduce_shapes_and_block_means():
    x = np.arange(2 * 10, dtype=float).reshape(2, 10)
    r = reduce_trajectories(x, time_points=5, n_components=None)
    np.testing.assert_allclose(r, x.reshape(2, 5, 2).mean(axis=2))
    assert reduce_trajectories(np.random.default_rng(0).normal(size=(50, 200))).shape == (50, 10)


def test_mask_groups_and_small_inputs():
    x, truth = planted(np.random.default_rng(2))
    mask = np.ones(len(truth), dtype=bool)
    mask[:5] = False
    groups = (np.arange(len(truth)) % 2)  # two arbitrary halves, clustered separately
    labels = cluster_trajectories(x, mask=mask, groups=groups)
    assert np.all(labels[:5] == FILTERED)
    # cluster ids are unique across groups
    for c in np.unique(labels[labels >= 0]):
        assert len(np.unique(groups[labels == c])) == 1
    # fewer tokens than min_cluster_size -> all outliers
    assert np.all(cluster_trajectories(x[:3], ClusterSettings(min_cluster_size=5)) == OUTLIER)
    with pytest.raises(ValueError, match="mask"):
        cluster_trajectories(x, mask=np.ones(3, bool))


def test_settings_resolution_and_validation():
    assert ClusterSettings().resolve(1000) == (30, 10)
    assert ClusterSettings(min_cluster_size=0.03, min_samples=1 / 15).resolve(1200) == (36, 80)
    assert ClusterSettings(min_cluster_size=0.03, min_samples=None).resolve(100) == (5, 5)
    assert ClusterSettings(min_cluster_size=150).resolve(5000) == (150, 10)
    with pytest.raises(ValueError, match="cluster_selection_method"):
        ClusterSettings(cluster_selection_method="kmeans")
    with pytest.raises(ValueError, match="min_cluster_size"):
        ClusterSettings(min_cluster_size=0)


def test_per_token_normalisation_clusters_by_timing_whatever_the_sizes():
    """Two groups that differ only in when they drop, each token's change of a size drawn
    over three decades (the size of a projected loss along a random direction varies with
    each token's gradient): as they are, the sizes decide the distances and HDBSCAN finds
    fragments of small and large tokens; divided by each token's root mean square, the two
    timing groups come back whole."""
    rng = np.random.default_rng(0)
    t = np.arange(100, dtype=float)
    truth = np.repeat([0, 1], 150)
    shapes = drops(t, np.where(truth == 0, 30, 70)) + rng.normal(0, 0.03, (300, 100))
    traj = 10 ** rng.uniform(-3, 0, (300, 1)) * shapes
    raw = cluster_trajectories(traj)
    shaped = cluster_trajectories(traj, ClusterSettings(normalize="token"))
    assert adjusted_rand(truth, raw) < 0.2
    assert adjusted_rand(truth, shaped) > 0.95 and (shaped >= 0).all()
    # the shape only: a token scaled by any positive factor lands where it was
    again = cluster_trajectories(traj * np.where(truth == 0, 1e3, 1e-3)[:, None], ClusterSettings(normalize="token"))
    assert adjusted_rand(shaped, again) == 1.0
    # a token that never moved stays at 0 rather than dividing by 0
    flat = normalize_tokens(np.vstack([traj[:2], np.zeros((1, 100))]))
    assert np.isfinite(flat).all() and (flat[2] == 0).all() and np.allclose(np.sqrt((flat[:2] ** 2).mean(1)), 1)
    with pytest.raises(ValueError, match=r"normalize must be one of \[None, 'token'\]"):
        ClusterSettings(normalize="zscore")


def test_medoids_match_brute_force():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(60, 3))
    labels = rng.integers(-1, 3, 60)
    med = cluster_medoids(x, labels, chunk=7)  # small chunks exercise the blocking
    for c in range(3):
        idx = np.flatnonzero(labels == c)
        d = np.linalg.norm(x[idx, None] - x[None, idx], axis=-1).sum(axis=1)
        assert med[c] == idx[np.argmin(d)]
    assert cluster_medoids(x, np.full(60, -1)).shape == (0,)
