"""``analyze`` end to end on small synthetic stores with planted breakthroughs."""

import numpy as np
import pytest

from polca_lightning.analysis import analyze, make_synthetic_store, planted_groups

CARRY_RESTRICT = {"carry": ("place", (1, 2))}


@pytest.fixture(scope="module")
def store():
    return make_synthetic_store(n_sequences=100, n_intervals=60, n_basis=4, seed=0)


@pytest.fixture(scope="module")
def result(store):
    return analyze(store, restrict=CARRY_RESTRICT)


def test_result_layout(store, result):
    res = result
    assert not set(res.variables) & set(store.data_vars)  # never the training variables
    assert res["cluster"].dims == ("basis", "token")
    assert res["hidden"].dims == ("basis", "cluster_id")
    assert res["lca_cluster"].dims == ("lca_basis", "token")
    assert res["loss_cluster"].dims == ("token",)
    assert res["cluster_trajectory"].dims == ("basis", "cluster_id", "snapshot")
    assert res["carry_homogeneity"].dims == ("entry", "carry_value")
    assert res["carry_best"].dims == ("trajectory_type", "carry_value", "rank")
    assert list(res["trajectory_type"].values) == [
        "polca", "polca_first", "lca", "fisher", "loss", "loss_change"]
    # label conventions: -2 exactly where a token was not clustered
    cl, tk = res["cluster"].values, res["token_kept"].values
    assert np.all((cl == -2) == ~tk)
    # sizes and medoids consistent with labels
    for b in range(4):
        for c in range(int(cl[b].max()) + 1):
            assert res["cluster_size"].values[b, c] == np.sum(cl[b] == c)
            assert cl[b, res["medoid"].values[b, c]] == c
    assert res.attrs["analysis_min_samples"] == 10
    assert float(res["tau"]) > 0


def test_filter_and_planted_recovery(store, result):
    res, planted = result, planted_groups(store)
    assert res["kept"].values.tolist() == [True, True, False, True]  # vector 2 oscillates
    # vector 0: the planted carry group (10s/100s places) is one cluster, hidden (after τ)
    grp = np.array(planted["vectors"]["0"]["groups"][0])
    lab = res["cluster"].values[0]
    c = np.bincount(lab[grp][lab[grp] >= 0]).argmax()
    assert np.mean(lab[grp] == c) >= 0.9 and np.mean(np.isin(np.flatnonzero(lab == c), grp)) >= 0.9
    onset = planted["vectors"]["0"]["onsets"][0]
    assert abs(res["cluster_onset"].values[0, c] - onset) <= 2 * float(res["onset_delta"])
    assert res["hidden"].values[0, c] and onset > float(res["tau"])
    # the best POLCA carry cluster is that one, perfectly homogeneous
    best = int(res["carry_best"].sel(trajectory_type="polca", carry_value=1, rank=0))
    assert (int(res["entry_unit"][best]), int(res["entry_cluster"][best])) == (0, c)
    assert float(res["carry_homogeneity"].sel(carry_value=1)[best]) == 1.0
    # the exact loss does not isolate carries
    b_loss = int(res["carry_best"].sel(trajectory_type="loss", carry_value=1, rank=0))
    assert b_loss == -1 or float(res["carry_homogeneity"].sel(carry_value=1)[b_loss]) < 0.9
    # entropy scores exist for clustered units, NaN for the unkept vector
    v = res["carry_v_measure_score"].values[res["clustering_method"].values == "polca"]
    assert np.isnan(v[2]) and np.all(np.isfinite(v[[0, 1, 3]]))


def test_options_and_incomplete_store(store):
    ds = store.copy(deep=True)
    ds = ds.drop_vars("lca_polca")
    # a store cut mid-training: the last 5 snapshots not written yet
    ds["step"] = ds["step"].astype(float)
    ds["step"][-5:] = np.nan
    ds["loss"][-5:] = np.nan
    res = analyze(ds, methods=["polca", "fisher"], tau=300.0, group_by="target",
                  entropy_scores=False, labels=["carry"])
    assert res.attrs["analysis_n_snapshots_used"] == 56 and res.sizes["snapshot"] == 56
    assert float(res["tau"]) == 300.0
    assert "lca_cluster" not in res and "place_homogeneity" not in res
    # clusters never mix target tokens when grouped
    lab, tgt = res["cluster"].values, ds["target"].values
    for b in range(lab.shape[0]):
        for c in np.unique(lab[b][lab[b] >= 0]):
            assert len(np.unique(tgt[lab[b] == c])) == 1
    np.testing.assert_array_equal(
        res["hidden"].values, np.isfinite(res["cluster_onset"].values) & (res["cluster_onset"].values > 300))


def test_validation_errors(store):
    with pytest.raises(ValueError, match="unknown method"):
        analyze(store, methods=["kmeans"])
    with pytest.raises(ValueError, match="lca_polca"):
        analyze(store.drop_vars("lca_polca"), methods=["lca"])
    with pytest.raises(ValueError, match="group_by"):
        analyze(store, group_by="colour")
    with pytest.raises(ValueError, match="restrict"):
        analyze(store, methods=["loss"], restrict={"carry": "place"})
    with pytest.raises(TypeError, match="unknown \\['hidden_rule'\\]"):  # removed: hidden is cluster_onset > tau
        analyze(store, hidden_rule="token_mean")


def test_settings_object_and_keyword_overrides_give_the_same_analysis(store, result):
    import xarray as xr

    from polca_lightning.analysis import AnalysisSettings

    settings = AnalysisSettings(restrict=CARRY_RESTRICT)
    for res in (analyze(store, settings), analyze(store, AnalysisSettings(), restrict=CARRY_RESTRICT)):
        assert set(res.data_vars) == set(result.data_vars)
        for name in result.data_vars:
            xr.testing.assert_identical(res[name], result[name])
    other = analyze(store, settings, min_samples=5, tau="plateau", methods=["polca"])
    assert other.attrs["analysis_min_samples"] == 5 and other.attrs["analysis_tau_rule"].startswith("plateau")
    assert list(other["trajectory_type"].values) == ["polca"]
    assert settings.min_samples == 10  # the settings object is not changed by overrides


def test_settings_are_checked_at_construction_and_round_trip_through_plain_values():
    import json

    from polca_lightning.analysis import AnalysisSettings

    for bad, message in [({"restrict_fraction": 1.0}, "restrict_fraction"),
                         ({"min_cluster_size": 0}, "min_cluster_size"), ({"top_k": 0}, "top_k"),
                         ({"recall_over": "some"}, "recall_over"), ({"methods": "polca"}, "list of names"),
                         ({"restrict": {"carry": "place"}}, "coordinate, allowed values")]:
        with pytest.raises(ValueError, match=message):
            AnalysisSettings(**bad)
    with pytest.raises(TypeError, match="unknown \\['min_sample'\\]"):
        AnalysisSettings.from_dict({"min_sample": 5})
    settings = AnalysisSettings(methods=["polca", "loss"], restrict={"carry": ["place", [1, 2]]}, tau=120.0)
    assert settings.methods == ("polca", "loss") and settings.restrict == {"carry": ("place", (1, 2))}
    plain = json.loads(json.dumps(settings.to_dict()))
    assert AnalysisSettings.from_dict(plain) == settings
    assert settings.cluster.min_samples == 10 and settings.cluster.n_components == 10
