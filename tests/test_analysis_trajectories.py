"""Projected loss, baseline trajectories and the §4.1 filter on known answers."""

import numpy as np
import pytest

from polca_lightning.analysis import (
    cumulative_fisher,
    filter_trajectories,
    loss_change,
    projected_loss,
)


def test_projected_loss_is_prefix_sum_starting_at_zero():
    rng = np.random.default_rng(0)
    polca = rng.normal(size=(7, 3, 5)).astype(np.float32)  # [interval, basis, token]
    P = projected_loss(polca)
    assert P.shape == (8, 3, 5) and P.dtype == np.float64
    assert np.all(P[0] == 0)
    for j in range(8):  # L_b(x, s_j) = sum_{i<j} POLCA_i(x, b), summed independently
        expect = sum((polca[i].astype(np.float64) for i in range(j)), np.zeros((3, 5)))
        np.testing.assert_allclose(P[j], expect, atol=1e-12)


def test_loss_change_and_cumulative_fisher():
    loss = np.array([[2.0, 1.0], [1.5, 1.2], [0.5, 0.9]])
    np.testing.assert_allclose(loss_change(loss), [[0, 0], [-0.5, 0.2], [-1.5, -0.1]])
    g = np.array([[[1.0, -2.0]], [[3.0, 0.5]], [[9.0, 9.0]]])  # [snapshot, basis, token]
    F = cumulative_fisher(g)
    # intervals 0 and 1 use g_0 and g_1; g at the last snapshot starts no interval
    np.testing.assert_allclose(F[:, 0], [[0, 0], [1, 4], [10, 4.25]])
    with pytest.raises(ValueError, match="n_intervals"):
        cumulative_fisher(g, n_intervals=5)


def test_filter_constructed_case():
    # finals per vector: v0 mean < 0 (kept), v1 mean > 0 (dropped), v2 all zero (dropped)
    final = np.array(
        [
            [-1.0, 0.5, -0.2, 0.0],  # mean -0.175 -> keep tokens 0, 2 (not the 0.0 one)
            [-1.0, 2.0, 0.0, 0.0],  # mean 0.25 -> not kept
            [0.0, 0.0, 0.0, 0.0],  # no decrease -> not kept
        ]
    )
    P = np.stack([np.zeros_like(final), 0.5 * final, final])  # [snapshot, basis, token]
    kept, tok = filter_trajectories(P)
    assert kept.tolist() == [True, False, False]
    assert tok.tolist() == [[True, False, True, False], [False] * 4, [False] * 4]
    # without the vector rule: the token rule along every vector, the vectors the rule keeps still said
    kept, tok = filter_trajectories(P, vectors=False)
    assert kept.tolist() == [True, False, False]
    assert tok.tolist() == [[True, False, True, False], [True, False, False, False], [False] * 4]
    # a NaN anywhere drops the token but not the vector
    P[1, 0, 0] = np.nan
    kept, tok = filter_trajectories(P)
    assert kept.tolist()[0] and tok[0].tolist() == [False, False, True, False]
    # 2-d input = one vector
    k, t = filter_trajectories(P[:, 0, :])
    assert bool(k) and t.tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="projected"):
        filter_trajectories(np.zeros(3))


def test_filter_drops_round_off_decreases():
    """Tokens that do not depend on a vector get a projected loss of float round-off along it
    (here ~1e-9 of either sign, beside real decreases of order 1): none of them is kept,
    whichever its sign, while every real decrease is; with rtol=0 the negative round-off stays."""
    rng = np.random.default_rng(0)
    real = -rng.uniform(0.2, 1.0, 50)
    noise = rng.normal(0.0, 1e-9, 200)
    final = np.concatenate([real, noise])[None, :]  # [1 vector, token]
    P = np.stack([np.zeros_like(final), 0.5 * final, final])  # [snapshot, basis, token]
    kept, tok = filter_trajectories(P)
    assert kept.tolist() == [True]
    assert tok[0, :50].all() and not tok[0, 50:].any()
    _, tok0 = filter_trajectories(P, rtol=0.0)
    assert tok0[0, 50:].sum() == (noise < 0).sum() > 0
    with pytest.raises(ValueError, match="rtol"):
        filter_trajectories(P, rtol=1.5)
