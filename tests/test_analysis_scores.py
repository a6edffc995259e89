"""Homogeneity, recall, F1 by hand; torchmetrics' scores against their definitions."""

import numpy as np
import pytest

from polca_lightning.analysis import best_clusters, clustering_scores, label_scores

# 12 tokens: clusters 0 (5 tokens), 1 (3 tokens), outliers (-1, 3 tokens), filtered (-2, 1)
CLUSTER = np.array([0, 0, 0, 0, 0, 1, 1, 1, -1, -1, -1, -2])
CARRY = np.array([1, 1, 1, 1, 0, 1, 0, 0, 1, 1, 0, 1])
PLACE = np.array([1, 2, 0, 0, 1, 2, 1, 3, 1, 2, 3, 1])


def test_hand_computed_scores():
    s = label_scores(CLUSTER, CARRY, [0, 1])
    # carry=1: cluster 0 has 4 of 5; cluster 1 has 1 of 3. Clustered carries: 5 (the
    # 2 outlier carries and the filtered one are excluded from recall, App. G)
    np.testing.assert_allclose(s["homogeneity"][:, 1], [4 / 5, 1 / 3])
    np.testing.assert_allclose(s["recall"][:, 1], [4 / 5, 1 / 5])
    f1_0 = 2 * 0.8 * 0.8 / 1.6
    f1_1 = 2 * (1 / 3) * (1 / 5) / (1 / 3 + 1 / 5)
    np.testing.assert_allclose(s["f1"][:, 1], [f1_0, f1_1])
    # carry=0: cluster 0 has 1 of 5, cluster 1 has 2 of 3; clustered non-carries: 3
    np.testing.assert_allclose(s["homogeneity"][:, 0], [1 / 5, 2 / 3])
    np.testing.assert_allclose(s["recall"][:, 0], [1 / 3, 2 / 3])
    assert s["size"].tolist() == [5, 3]
    # recall over every token with the label: 8 carries in all
    s_all = label_scores(CLUSTER, CARRY, [1], recall_over="all")
    np.testing.assert_allclose(s_all["recall"][:, 0], [4 / 8, 1 / 8])


def test_restriction_app_g():
    # carry tokens of cluster 0 are at places 1, 2, 0, 0: half at 10s/100s -> not over
    # 0.85 (the default) nor over 0.5; carry token of cluster 1 is at place 2 -> 1.0 -> eligible
    for kwargs in ({}, {"restrict_fraction": 0.5}):
        s = label_scores(CLUSTER, CARRY, [0, 1], restrict=np.isin(PLACE, [1, 2]), **kwargs)
        assert s["eligible"][:, 1].tolist() == [False, True]
    s = label_scores(CLUSTER, CARRY, [1], restrict=np.isin(PLACE, [1, 2]), restrict_fraction=0.4)
    assert s["eligible"][:, 0].tolist() == [True, True]
    with pytest.raises(ValueError, match="recall_over"):
        label_scores(CLUSTER, CARRY, recall_over="some")


def test_best_clusters_one_per_unit():
    h = np.array([0.9, 0.95, 0.5, np.nan, 0.7, 0.8])
    unit = np.array([0, 0, 1, 1, 2, 3])
    assert best_clusters(h, unit, top_k=3).tolist() == [1, 5, 4]
    elig = np.array([True, False, True, True, True, False])
    assert best_clusters(h, unit, elig, top_k=4).tolist() == [0, 4, 2, -1]


def _entropy(x):
    p = np.unique(x, return_counts=True)[1] / len(x)
    return -(p * np.log(p)).sum()


def _cond_entropy(x, given):
    return sum(np.mean(given == g) * _entropy(x[given == g]) for g in np.unique(given))


@pytest.mark.parametrize("seed", [0, 1])
def test_torchmetrics_scores_match_definitions(seed):
    rng = np.random.default_rng(seed)
    cluster = rng.integers(-2, 5, 300)
    label = (cluster + rng.integers(0, 3, 300)) % 4  # related to the clusters
    got = clustering_scores(cluster, label)
    keep = cluster >= 0  # outliers and filtered tokens dropped first
    c, y = cluster[keep], label[keep]
    h = 1 - _cond_entropy(y, c) / _entropy(y)  # Rosenberg & Hirschberg 2007
    comp = 1 - _cond_entropy(c, y) / _entropy(c)
    assert got["homogeneity"] == pytest.approx(h, abs=1e-5)
    assert got["completeness"] == pytest.approx(comp, abs=1e-5)
    assert got["v_measure"] == pytest.approx(2 * h * comp / (h + comp), abs=1e-5)


def test_torchmetrics_scores_drop_outliers():
    # perfect on clustered tokens; the outliers, if kept as a cluster, would spoil it
    cluster = np.array([0, 0, 1, 1, -1, -1])
    label = np.array([5, 5, 7, 7, 5, 7])
    got = clustering_scores(cluster, label)
    assert got["homogeneity"] == pytest.approx(1.0) and got["v_measure"] == pytest.approx(1.0)
    assert np.isnan(clustering_scores(np.full(4, -1), np.zeros(4))["v_measure"])
