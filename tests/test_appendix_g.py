"""The paper's appendix G protocol, by hand: the 85 % rule, the top three per trajectory
type, the chance level of a homogeneity, the default τ (where the mean loss flattens) beside
the paper's (10 % of the run, always computed), and the default Δ (1 % of the run)."""

import numpy as np
import pytest
import xarray as xr

from polca_lightning.analysis import (
    analyze,
    best_clusters,
    chance_homogeneity,
    default_tau,
    label_scores,
    make_synthetic_store,
    plateau_step,
)
from polca_lightning.analysis import pipeline as analysis_pipeline
from polca_lightning.report.pipeline import appendix_g_table, result_variables

CARRY_RESTRICT = {"carry": ("place", (1, 2))}

# 80 tokens. place: 0 = 1000s, 1 = 100s, 2 = 10s, 3 = 1s (the synthetic store's coding).
#   tokens  0..39  10s place,  carries at 0..17   (18 of 40: rate 0.45)
#   tokens 40..59  100s place, carries at 40..49  (10 of 20: rate 0.5)
#   tokens 60..67  1000s place, carries at 60..63 (4 of 8: rate 0.5)
#   tokens 68..79  1s place, no carries           (rate 0)
# 32 carries of 80 tokens (0.4); 28 of the 60 tokens at 10s/100s (0.4667).
PLACE = np.array([2] * 40 + [1] * 20 + [0] * 8 + [3] * 12)
CARRY = np.zeros(80, dtype=np.int64)
CARRY[np.r_[0:18, 40:50, 60:64]] = 1


def _clusters(members: list) -> np.ndarray:
    """``[token]`` labels from lists of member tokens (cluster ids in order; the rest -1)."""
    lab = np.full(80, -1, dtype=np.int64)
    for c, tokens in enumerate(members):
        lab[np.asarray(tokens)] = c
    return lab


# One clustering per basis vector, chosen by hand. Per cluster: carries, size, share of
# its carries at 10s/100s, homogeneity h (carry = 1) and chance (Σ place share x rate):
UNITS = [
    _clusters([
        # 10 carries: 6 at 10s, 2 at 100s, 2 at 1000s -> 80 % at 10s/100s: passes 0.5,
        # not 0.85. h = 1.0; chance = 0.6*0.45 + 0.2*0.5 + 0.2*0.5 = 0.47
        np.r_[0:6, 40:42, 60:62],
        # 4 carries + 4 non-carries, all 10s -> 100 %: eligible. h = 0.5; chance = 0.45
        np.r_[6:10, 18:22],
    ]),
    _clusters([
        # 8 10s carries, 1 100s carry, 1 100s non-carry -> 100 %. h = 0.9;
        # chance = 0.8*0.45 + 0.2*0.5 = 0.46
        np.r_[10:18, 42, 50],
        # 1000s place: 4 carries of 5 -> 0 % at 10s/100s: never eligible. h = 0.8; chance 0.5
        np.r_[60:65],
    ]),
    _clusters([
        # 30 10s tokens (18 carries) and 10 100s non-carries -> 100 %. h = 18/40 = 0.45;
        # chance = 0.75*0.45 + 0.25*0.5 = 0.4625
        np.r_[0:30, 50:60],
        # 1s place only: no carry, so no carry-eligibility. h = 0; chance = 0
        np.r_[68:80],
    ]),
]
HOMOGENEITY = [1.0, 0.5, 0.9, 0.8, 0.45, 0.0]  # entries: (unit, cluster) in order
CHANCE = [0.47, 0.45, 0.46, 0.5, 0.4625, 0.0]
ELIGIBLE_085 = [False, True, True, False, True, False]
ELIGIBLE_050 = [True, True, True, False, True, False]


def test_85_percent_rule_by_hand():
    restrict = np.isin(PLACE, [1, 2])
    lab = UNITS[0]
    s = label_scores(lab, CARRY, [1], restrict=restrict)  # default: App. G's 0.85
    np.testing.assert_allclose(s["homogeneity"][:, 0], [1.0, 0.5])
    assert s["eligible"][:, 0].tolist() == [False, True]
    assert label_scores(lab, CARRY, [1], restrict=restrict, restrict_fraction=0.5)["eligible"][:, 0].tolist() \
        == [True, True]
    # "over 85 %" is strict: 17 of 20 carries (exactly 85 %) at 10s/100s fail, 10 of 11 pass
    edge = _clusters([np.r_[0:17, 60:63], np.r_[17, 40:49, 63]])
    assert label_scores(edge, CARRY, [1], restrict=restrict)["eligible"][:, 0].tolist() == [False, True]
    s = label_scores(edge, CARRY, [1], restrict=restrict, restrict_fraction=0.84)
    assert s["eligible"][:, 0].tolist() == [True, True]
    with pytest.raises(ValueError, match="restrict_fraction"):
        label_scores(lab, CARRY, restrict=restrict, restrict_fraction=1.0)


def test_chance_level_from_the_stores_own_rates():
    # the 30 10s + 10 100s cluster: 0.75 * 18/40 + 0.25 * 10/20, whatever its own carries
    got = chance_homogeneity(UNITS[2], CARRY, [0, 1], group=PLACE)
    np.testing.assert_allclose(got[0], [1 - 0.4625, 0.4625])
    np.testing.assert_allclose(got[1], [1.0, 0.0])
    # the rates are over every token, clustered or not: relabelling outliers changes nothing
    np.testing.assert_allclose(chance_homogeneity(np.where(UNITS[2] < 0, -2, UNITS[2]), CARRY, [1], group=PLACE),
                               got[:, 1:])
    # no group: the label's rate among all tokens, for every non-empty cluster
    np.testing.assert_allclose(chance_homogeneity(UNITS[1], CARRY, [1], n_clusters=3)[:, 0],
                               [0.4, 0.4, np.nan])
    s = label_scores(UNITS[0], CARRY, [1], group=PLACE)
    np.testing.assert_allclose(s["chance"][:, 0], CHANCE[:2])


def test_top_three_one_per_unit_best_first():
    h = np.array(HOMOGENEITY)
    unit = np.array([0, 0, 1, 1, 2, 2])
    assert best_clusters(h, unit, np.array(ELIGIBLE_085), top_k=3).tolist() == [2, 1, 4]
    assert best_clusters(h, unit, np.array(ELIGIBLE_050), top_k=3).tolist() == [0, 2, 4]
    assert best_clusters(h, unit, np.array(ELIGIBLE_085), top_k=4).tolist() == [2, 1, 4, -1]
    assert best_clusters(h, unit, np.array(ELIGIBLE_085), top_k=2).tolist() == [2, 1]
    assert best_clusters(h, unit, np.zeros(6, bool), top_k=2).tolist() == [-1, -1]


@pytest.fixture(scope="module")
def hand_store():
    ds = make_synthetic_store(n_sequences=20, n_intervals=30, n_basis=3, lca=False, seed=0)
    return ds.assign_coords(place=("token", PLACE), carry=("token", CARRY))


def _analyze_with_hand_clusters(ds, monkeypatch, **kwargs):
    calls = iter(UNITS)

    def fake_cluster(traj, settings, *, mask=None, groups=None, return_reduced=False, timings=None):
        labels = next(calls).copy()
        return (labels, np.asarray(traj, dtype=np.float64)) if return_reduced else labels

    monkeypatch.setattr(analysis_pipeline, "cluster_trajectories", fake_cluster)
    return analyze(ds, methods=["polca"], restrict=CARRY_RESTRICT, entropy_scores=False, **kwargs)


def test_analyze_scores_hand_clusters(hand_store, monkeypatch):
    res = _analyze_with_hand_clusters(hand_store, monkeypatch, top_k=4)
    assert res["entry_unit"].values.tolist() == [0, 0, 1, 1, 2, 2]
    assert res.attrs["analysis_restrict_fraction"] == 0.85
    one = {"carry_value": 1}
    np.testing.assert_allclose(res["carry_homogeneity"].sel(one).values, HOMOGENEITY)
    np.testing.assert_allclose(res["carry_chance"].sel(one).values, CHANCE)
    np.testing.assert_allclose(res["carry_chance"].sel(carry_value=0).values, 1 - np.array(CHANCE))
    assert res["carry_eligible"].sel(one).values.tolist() == ELIGIBLE_085
    assert res["carry_best"].sel(trajectory_type="polca", **one).values.tolist() == [2, 1, 4, -1]
    np.testing.assert_allclose(res["carry_base_rate"].values, [0.6, 0.4])
    np.testing.assert_allclose(res["carry_restricted_base_rate"].values, [32 / 60, 28 / 60])
    # place is not restricted: its chance is its rate among all tokens (10s: 40 of 80)
    assert res["place_chance"].dims == ("entry", "place_value")
    np.testing.assert_allclose(res["place_chance"].sel(place_value=2).values, 0.5)
    np.testing.assert_allclose(res["place_base_rate"].values, [8 / 80, 20 / 80, 40 / 80, 12 / 80])
    np.testing.assert_allclose(res["place_restricted_base_rate"].values, res["place_base_rate"].values)

    # the earlier majority rule lets the 80 % cluster in, and it tops the table
    res = _analyze_with_hand_clusters(hand_store, monkeypatch, restrict_fraction=0.5)
    assert res["carry_eligible"].sel(one).values.tolist() == ELIGIBLE_050
    assert res["carry_best"].sel(trajectory_type="polca", **one).values.tolist() == [0, 2, 4]


def test_appendix_g_table_puts_chance_beside_homogeneity(hand_store, monkeypatch):
    res = _analyze_with_hand_clusters(hand_store, monkeypatch)
    store = hand_store.assign_attrs(token_labels=["place", "carry"])
    vars_ = result_variables(res, store)
    assert vars_["carry_chance"][0] == ("entry", "carry_value")
    assert vars_["carry_base_rate"][0] == ("carry_value",)
    ds = store.assign({k: xr.Variable(d, v, a) for k, (d, v, a) in vars_.items()})
    table = appendix_g_table(ds)
    assert table.columns[7:9] == ["homogeneity", "chance"]
    rows = [r for r in table.rows if r[:3] == ["carry", 1, "polca"]]
    # rank, unit, cluster, size, homogeneity, chance: the top three by hand
    assert [r[3:9] for r in rows] == [
        [0, 1, 0, 10, pytest.approx(0.9), pytest.approx(0.46)],
        [1, 0, 1, 8, pytest.approx(0.5), pytest.approx(0.45)],
        [2, 2, 0, 40, pytest.approx(0.45), pytest.approx(0.4625)],
    ]
    # an analysis written before chance levels existed still tabulates, chance empty
    old = ds.drop_vars(["carry_chance", "place_chance"])
    assert all(r[8] is None for r in appendix_g_table(old).rows)


def test_best_is_the_appendix_g_top_three_on_a_real_clustering():
    """``L_best`` against a brute-force reading of the protocol on HDBSCAN's clusters."""
    ds = make_synthetic_store(n_sequences=60, n_intervals=40, n_basis=5, lca=False, seed=3)
    res = analyze(ds, methods=["polca", "loss"], restrict=CARRY_RESTRICT, entropy_scores=False, min_samples=5)
    em, eu = res["entry_method"].values, res["entry_unit"].values
    for m in ("polca", "loss"):
        for vi, v in enumerate(res["carry_value"].values):
            h = res["carry_homogeneity"].values[:, vi]
            elig = res["carry_eligible"].values[:, vi]
            per_unit = {}  # best eligible entry of every unit of the trajectory type
            for e in np.flatnonzero((em == m) & elig & np.isfinite(h)):
                if eu[e] not in per_unit or h[e] > h[per_unit[eu[e]]]:
                    per_unit[eu[e]] = e
            want = sorted(per_unit.values(), key=lambda e: (-h[e], e))[:3]
            want += [-1] * (3 - len(want))
            assert res["carry_best"].sel(trajectory_type=m, carry_value=v).values.tolist() == want


@pytest.fixture(scope="module")
def long_store():
    # 500 intervals of 20 steps: the paper's 10,000-step run
    return make_synthetic_store(n_sequences=15, n_intervals=500, n_basis=3, lca=False, seed=1)


def test_tau_defaults_to_the_plateau_beside_the_papers_and_delta_to_1_percent(long_store):
    assert default_tau(np.arange(100, 1101.0, 50)) == 200.0  # counted from the first step
    step = long_store["step"].values.astype(np.float64)
    mean = np.nanmean(long_store["loss"].values.astype(np.float64), axis=1)
    res = analyze(long_store, methods=["loss"], entropy_scores=False)
    assert float(res["tau"]) == plateau_step(mean, step) != 1000.0
    assert res.attrs["analysis_tau_rule"].startswith("plateau")
    assert float(res["tau_paper"]) == res.attrs["analysis_tau_paper"] == 1000.0 and float(res["onset_delta"]) == 100.0
    assert res.attrs["analysis_delta_rule"].startswith("paper") and res.attrs["analysis_delta_rule"].endswith("= 100")
    onset = res["loss_cluster_onset"].values
    np.testing.assert_array_equal(res["loss_hidden"].values, np.isfinite(onset) & (onset > float(res["tau"])))
    # the cluster table under both rules, by hand
    e_onset = res["entry_onset"].values
    for suffix, tau in (("", float(res["tau"])), ("_paper", 1000.0)):
        np.testing.assert_array_equal(res["entry_hidden" + suffix].values, np.isfinite(e_onset) & (e_onset > tau))
        assert float(res["hidden_fraction" + suffix].sel(trajectory_type="loss")) == np.mean(
            np.isfinite(e_onset) & (e_onset > tau))
    # the other rules, by name; numbers as given
    res = analyze(long_store, methods=["loss"], entropy_scores=False, tau="paper", delta="wide")
    assert float(res["tau"]) == float(res["tau_paper"]) == 1000.0 and float(res["onset_delta"]) == 200.0
    assert res.attrs["analysis_tau_rule"].startswith("paper") and res.attrs["analysis_delta_rule"].startswith("wide")
    res = analyze(long_store, methods=["loss"], entropy_scores=False, tau=2500, delta=60)
    assert float(res["tau"]) == 2500.0 and float(res["onset_delta"]) == 60.0 and float(res["tau_paper"]) == 1000.0
    assert res.attrs["analysis_tau_rule"] == res.attrs["analysis_delta_rule"] == "given"


def test_tau_and_delta_floor_and_errors(hand_store):
    # 30 intervals of 20 steps: 1 % of 600 is 6 < one snapshot interval, so Δ = 20
    res = analyze(hand_store, methods=["loss"], entropy_scores=False, labels=[])
    assert float(res["tau_paper"]) == 60.0 and float(res["onset_delta"]) == 20.0
    with pytest.warns(UserWarning, match="shorter than the largest snapshot spacing"):
        analyze(hand_store, methods=["loss"], entropy_scores=False, labels=[], delta=10)
    for kwargs, match in [({"tau": "median"}, "tau must be"), ({"delta": "auto"}, "delta must be"),
                          ({"delta": -5}, "positive"), ({"tau": float("nan")}, "finite"),
                          ({"restrict_fraction": 1.5}, "restrict_fraction")]:
        with pytest.raises(ValueError, match=match):
            analyze(hand_store, methods=["loss"], **kwargs)


def test_cli_flags_reach_analyze(capsys):
    from polca_lightning.cli import build_parser, main
    from polca_lightning.cli.analyze import analysis_changes

    args = build_parser().parse_args(["analyze", "s", "--tau", "plateau", "--delta", "50",
                                      "--restrict", "carry:place=1,2", "--restrict-fraction", "0.5",
                                      "--min-samples", "5", "--min-cluster-size", "0.02"])
    assert analysis_changes(args) == dict(tau="plateau", delta=50.0, restrict_fraction=0.5,
                                           restrict={"carry": ("place", (1, 2))}, min_samples=5,
                                           min_cluster_size=0.02)
    assert isinstance(analysis_changes(args)["min_samples"], int)  # a count, not a fraction
    args = build_parser().parse_args(["analyze", "s", "--tau", "1000", "--delta", "wide"])
    assert analysis_changes(args) == dict(tau=1000.0, delta="wide")
    assert analysis_changes(build_parser().parse_args(["analyze", "s"])) == {}  # the store's settings, unchanged
    assert analysis_changes(build_parser().parse_args(["analyze", "s", "--no-restrict"])) == {"restrict": None}
    assert main(["analyze", "s", "--restrict-fraction", "1.5"]) == 2
    assert "restrict_fraction must be in [0, 1)" in capsys.readouterr().err
    assert main(["analyze", "s", "--no-restrict", "--restrict", "carry:place=1,2"]) == 2
    assert "--no-restrict" in capsys.readouterr().err
    for bad in (["--tau", "detected"], ["--restrict", "carry=1,2"], ["--restrict", "carry:place=a"]):
        assert main(["analyze", "s", *bad]) == 2
    assert "expected" in capsys.readouterr().err
