"""Eq. 9 onsets, the plateau step τ and Eq. 10 flags on curves with known answers."""

import numpy as np
import pytest

from polca_lightning.analysis import (
    acceleration,
    breakthrough_onset,
    default_delta,
    hidden_breakthrough,
    plateau_step,
)

SIGMOID_ONSET_OFFSET = 1.3170  # sigma''' = 0 at x = ln(2 - sqrt 3): start of a sigmoid drop


def sigmoid_drop(step, onset, width, amp=1.0):
    centre = onset + SIGMOID_ONSET_OFFSET * width
    return -amp / (1 + np.exp(-(step[:, None] - centre) / width))


def test_hinge_onset_is_exact():
    s = np.arange(0, 1000.0, 10)
    onsets = np.array([200.0, 430.0, 700.0])
    f = -np.clip(s[:, None] - onsets, 0, 150)  # flat, then a linear drop of 150 steps
    np.testing.assert_array_equal(breakthrough_onset(f, s, delta=50), onsets)


def test_second_difference_against_direct_formula():
    s = np.arange(0, 200.0, 10)
    f = np.sin(s / 30.0)
    a, t = acceleration(f, s, delta=20)
    i = np.searchsorted(s, t)
    np.testing.assert_allclose(a, f[i + 2] - 2 * f[i] + f[i - 2])
    assert t[0] == 20 and t[-1] == 170


def test_sigmoid_onsets_with_noise():
    rng = np.random.default_rng(0)
    s = np.arange(0, 5000.0, 10)  # 500 snapshots
    onsets = rng.uniform(500, 4000, 40)
    f = sigmoid_drop(s, onsets, width=60.0) + rng.normal(0, 0.003, (s.size, onsets.size))
    est = breakthrough_onset(f, s, delta=50)
    # discrete Δ shifts the extremum a little; noise a little more: within 2 Δ-ish
    assert np.max(np.abs(est - onsets)) <= 60
    assert np.median(np.abs(est - onsets)) <= 30
    # the paper's argmax (most positive a) would land at the END of the drop instead
    late = breakthrough_onset(f, s, delta=50, direction="rising")
    assert np.all(late > onsets + 2 * 60)


def test_rising_curves_and_nonuniform_steps():
    # non-uniform steps: dense early, sparse late; onset of a rising hinge at 3000
    s = np.concatenate([np.arange(0, 2000.0, 10), np.arange(2000, 6001.0, 50)])
    f = np.clip(s - 3000, 0, 800)
    assert float(breakthrough_onset(f, s, delta=100, direction="rising")) == 3000
    assert float(breakthrough_onset(-f, s, delta=100)) == 3000


def test_onset_errors_and_default_delta():
    s = np.arange(0, 100.0, 10)
    assert default_delta(s) == 10.0  # 1 % of 90 < spacing 10
    assert default_delta(np.arange(0, 10001.0, 20)) == 100.0  # the paper's Δ = 100 of 10,000 steps
    assert default_delta(np.arange(0, 10001.0, 20), fraction=0.02) == 200.0  # the earlier rule
    assert default_delta(np.array([0.0, 10, 20, 500, 10000])) == 9500.0  # the largest spacing wins
    with pytest.raises(ValueError, match="too long"):
        acceleration(np.zeros(10), s, delta=60)
    with pytest.raises(ValueError, match="increasing"):
        acceleration(np.zeros(3), np.array([0.0, 2.0, 1.0]), delta=1)
    with pytest.raises(ValueError, match="direction"):
        breakthrough_onset(np.zeros(10), s, 10, direction="up")
    f = np.zeros((10, 2))
    f[5, 1] = np.nan
    assert np.isnan(breakthrough_onset(f, s, 10)[1])


def test_plateau_step_on_synthetic_plateau():
    rng = np.random.default_rng(1)
    s = np.arange(0, 10000.0, 20)
    # drop from 2.3 to 0.3 done by ~1000 steps, then flat with noise and a tiny slope
    mean = 0.3 + 2.0 * np.exp(-s / 250) - 1e-6 * s + rng.normal(0, 0.002, s.size)
    tau = plateau_step(mean, s)
    # 5 % of the total decrease is left at 250 ln 20 ≈ 750 steps
    assert 650 <= tau <= 900
    # a stricter fraction gives a later τ
    assert plateau_step(mean, s, fraction=0.01) > tau
    # a loss with a late second drop plateaus only after it
    two = mean - 0.5 / (1 + np.exp(-(s - 6000) / 100))
    assert plateau_step(two, s) > 6000
    with pytest.warns(UserWarning, match="never decreases"):
        assert plateau_step(np.linspace(1, 2, s.size), s) == 0


def test_hidden_flag():
    np.testing.assert_array_equal(
        hidden_breakthrough(np.array([100.0, 1000.0, 1001.0, np.nan]), 1000.0),
        [False, False, True, False],
    )


def test_curve_that_never_bends_has_no_onset():
    # exp(-t/30) only decelerates (a(t) > 0 everywhere): no onset, not the window's edge;
    # a hinge beside it in the same batch keeps its exact onset, a rising exp has none either
    s = np.arange(0, 301.0)
    decaying, hinge = np.exp(-s / 30), -np.clip(s - 120, 0, 50)
    onset = breakthrough_onset(np.stack([decaying, hinge], axis=1), s, delta=20)
    assert np.isnan(onset[0]) and onset[1] == 120.0
    assert np.isnan(breakthrough_onset(1 - np.exp(-s / 30), s, delta=20, direction="rising"))
    assert not hidden_breakthrough(onset[:1], tau=0.0)[0]
