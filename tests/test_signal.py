"""The signal check on stores with a planted label: which vector carries it, and how."""

import numpy as np
import pytest
import xarray as xr

from polca_lightning.analysis import (
    analyze,
    interpret_signal_check,
    make_synthetic_store,
    signal_check,
    signal_check_table,
)
from polca_lightning.analysis.signal import TIME_POINTS
from polca_lightning.report.pipeline import binary_labels, result_variables, signal_table


def planted(n_tokens=400, n_intervals=150, n_basis=4, rate=0.3, seed=0, shape_only=False):
    """POLCA noise on every vector; label-1 tokens get an extra drop of 0.5 along vector 2
    (intervals 60-80). With ``shape_only`` the drop is along vector 1 and recovers by
    interval 100: the label is in the curve's shape, not its end. The exact loss is a
    smooth per-token drop at a random time, independent of the label."""
    rng = np.random.default_rng(seed)
    label = (rng.random(n_tokens) < rate).astype(np.int64)  # [token]
    polca = rng.normal(0, 0.01, (n_intervals, n_basis, n_tokens))  # [interval, basis, token]
    if shape_only:
        polca[60:80, 1] -= 0.5 / 20 * label
        polca[80:100, 1] += 0.5 / 20 * label
    else:
        polca[60:80, 2] -= 0.5 / 20 * label
    t = np.arange(n_intervals + 1)[:, None]  # [snapshot, 1]
    onset = rng.uniform(10, 120, n_tokens)
    loss = 2.0 - 1.5 / (1 + np.exp(-(t - onset) / 5)) + rng.normal(0, 0.01, (n_intervals + 1, n_tokens))
    return xr.Dataset(
        {"step": ("snapshot", 10 * np.arange(n_intervals + 1)), "loss": (("snapshot", "token"), loss),
         "polca": (("interval", "basis", "token"), polca.astype(np.float32)),
         "polca_first": (("interval", "basis", "token"), polca.astype(np.float32))},
        coords={"carry": ("token", label), "place": ("token", np.tile(np.arange(4), n_tokens // 4)),
                "sequence": ("token", np.repeat(np.arange(n_tokens // 4), 4))},
    )


def mann_whitney_auc(score, y):
    """P(score of a label-1 token > score of a label-0 token), ties half: the AUC by its definition."""
    pos, neg = score[y == 1][:, None], score[y == 0][None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


@pytest.fixture(scope="module")
def ds():
    return planted()


@pytest.fixture(scope="module")
def result(ds):
    return signal_check(ds, "carry")


def test_the_planted_vector_carries_the_label_and_the_others_do_not(ds, result):
    y = ds["carry"].values
    majority = max(y.mean(), 1 - y.mean())
    assert float(result["majority"]) == pytest.approx(majority)
    assert int(result["n_tokens"]) == y.size and int(result["n_positive"]) == y.sum()
    acc, auc = result["accuracy"].values, result["auc"].values
    assert acc[2] >= 0.95
    for b in (0, 1, 3):
        assert abs(acc[b] - majority) <= 0.1, (b, acc[b], majority)
        assert abs(auc[b] - 0.5) < 0.1
    assert auc[2] < 0.05  # label-1 tokens end lower along vector 2
    assert float(result["accuracy_all"]) >= 0.95
    assert abs(float(result["accuracy_loss"]) - majority) <= 0.1
    assert abs(float(result["auc_loss"]) - 0.5) < 0.1
    # AUC is the Mann-Whitney statistic of the final projected loss (the sum of all POLCA)
    final = ds["polca"].values.astype(np.float64).sum(0)  # [basis, token]
    for b in range(4):
        assert auc[b] == pytest.approx(mann_whitney_auc(final[b], y), abs=1e-9)
    # 151 snapshots are block-averaged to 64 time points
    assert result.attrs["time_points"] == TIME_POINTS and result.attrs["n_snapshots"] == 151


def test_a_label_in_the_shape_only_is_found_by_the_trajectory_not_the_final_value():
    ds = planted(shape_only=True, seed=1)
    res = signal_check(ds, "carry")
    assert float(res["accuracy"].sel(basis=1)) >= 0.95 and float(res["accuracy_all"]) >= 0.95
    assert np.all(np.abs(res["auc"].values - 0.5) < 0.1)  # every vector ends where it would without the label
    text = interpret_signal_check(res)
    assert "vector 1 carries the most information" in text
    assert "not in any single vector's final value" in text


def test_table_and_interpretation(ds, result):
    table = signal_check_table(result)
    assert list(table.columns) == ["basis", "auc", "accuracy"]
    assert table["basis"].tolist() == [0, 1, 2, 3, "all vectors", "exact loss", "majority"]
    assert table["accuracy"].tolist() == pytest.approx(
        list(result["accuracy"].values) + [float(result[k]) for k in ("accuracy_all", "accuracy_loss", "majority")])
    assert table["auc"].iloc[2] == pytest.approx(float(result["auc"][2]))
    assert np.isnan(table["auc"].iloc[4]) and np.isnan(table["auc"].iloc[6])
    text = interpret_signal_check(result)
    assert text.startswith("Label 'carry' (where all tokens; 400 tokens")
    assert "vector 2 carries the most information" in text and "exact loss does not carry it" in text
    assert "Vector 2's final projected loss alone separates the label" in text


def test_where_masks_and_excluded_labels_change_the_tokens_used(ds):
    y, place = ds["carry"].values, ds["place"].values
    for where in (ds.place.isin([1, 2]), np.isin(place, [1, 2]), {"place": [1, 2]}):
        res = signal_check(ds, "carry", where=where)
        sel = np.isin(place, [1, 2])
        assert int(res["n_tokens"]) == sel.sum() and int(res["n_positive"]) == y[sel].sum()
        assert float(res["majority"]) == pytest.approx(max(y[sel].mean(), 1 - y[sel].mean()))
        assert float(res["accuracy"].sel(basis=2)) >= 0.95
    assert signal_check(ds, "carry", where={"place": [1, 2]}).attrs["where"] == "place in [1, 2]"
    assert "mask (" in signal_check(ds, "carry", where=np.isin(place, [1, 2])).attrs["where"]
    # two conditions are ANDed
    res = signal_check(ds, "carry", where={"place": [1, 2, 3], "sequence": list(range(50))})
    assert int(res["n_tokens"]) == (np.isin(place, [1, 2, 3]) & (ds["sequence"].values < 50)).sum()
    # negative labels are left out, and a [token] array works like a coordinate
    lab = y.copy()
    lab[:40] = -1
    res = signal_check(ds, lab)
    assert int(res["n_tokens"]) == 360 and int(res["n_positive"]) == y[40:].sum()
    assert res.attrs["n_excluded_label"] == 40 and res.attrs["label"] == "label array"


def test_complete_prefix_non_finite_tokens_and_determinism(ds, result):
    bad = ds.copy(deep=True)
    bad["loss"][-1] = np.nan  # an unwritten last snapshot: not part of the complete prefix
    polca = bad["polca"].values
    polca[10, 3, 7] = np.nan  # token 7 has a hole along vector 3
    res = signal_check(bad, "carry")
    assert res.attrs["n_snapshots"] == 150 and res.attrs["n_dropped_nonfinite"] == 1
    assert int(res["n_tokens"]) == 399
    final = polca[:149].astype(np.float64).sum(0)  # [basis, token] over the 149 complete intervals
    keep = np.arange(400) != 7
    assert float(res["auc"][2]) == pytest.approx(mann_whitney_auc(final[2, keep], ds["carry"].values[keep]))
    again = signal_check(ds, "carry")
    xr.testing.assert_identical(again, result)
    other = signal_check(ds, "carry", seed=1)
    assert other.attrs["seed"] == 1 and float(other["accuracy"][2]) >= 0.95
    short = signal_check(planted(n_intervals=30), "carry")  # fewer snapshots than TIME_POINTS: all kept
    assert short.attrs["time_points"] == 31


def test_bad_input_fails_with_the_argument_named(ds):
    with pytest.raises(ValueError, match=r"label: expected a token coordinate .* got 'digit'"):
        signal_check(ds, "digit")
    with pytest.raises(ValueError, match=r"label 'place': expected binary values 0/1 .* also found \[2.0, 3.0\]"):
        signal_check(ds, "place")
    with pytest.raises(ValueError, match=r"label: expected .* shape \(400,\), got shape \(3,\)"):
        signal_check(ds, np.array([0, 1, 0]))
    few = ds["carry"].values.copy()
    few[few == 1] = -1
    few[:3] = 1  # 3 positives < 5 folds
    with pytest.raises(ValueError, match=f"5 folds need at least 5 tokens of each class, got {(few == 0).sum()} "
                                         "with 0 and 3 with 1"):
        signal_check(ds, few)
    with pytest.raises(ValueError, match=r"where: expected a boolean mask of shape \(400,\), got shape \(10,\)"):
        signal_check(ds, "carry", where=np.ones(10, dtype=bool))
    with pytest.raises(ValueError, match="where: expected a boolean mask, got dtype int64"):
        signal_check(ds, "carry", where=np.ones(400, dtype=np.int64))
    with pytest.raises(ValueError, match=r"where: expected a mask along \('token',\)"):
        signal_check(ds, "carry", where=xr.DataArray(np.ones((2, 200), bool), dims=("a", "b")))
    with pytest.raises(ValueError, match="where: expected token coordinates .* got 'colour'"):
        signal_check(ds, "carry", where={"colour": [1]})
    with pytest.raises(ValueError, match=r"ds: the store lacks variable\(s\) \['polca'\]"):
        signal_check(ds.drop_vars("polca"), "carry")
    with pytest.raises(ValueError, match="method: expected an .interval, basis, token. variable"):
        signal_check(ds, "carry", method="loss")
    with pytest.raises(ValueError, match="folds: expected an int >= 2, got 1"):
        signal_check(ds, "carry", folds=1)
    with pytest.raises(ValueError, match="at least 2 complete snapshots"):
        signal_check(ds.isel(snapshot=slice(0, 1), interval=slice(0, 0)), "carry")


def test_synthetic_store_carries_hidden_carries_along_vector_0():
    ds = make_synthetic_store(n_sequences=100, n_intervals=60, n_basis=4, lca=False, seed=0)
    res = signal_check(ds, "carry", where=ds.place.isin([1, 2]))
    assert float(res["accuracy"].sel(basis=0)) >= 0.95 and float(res["auc"].sel(basis=0)) < 0.05
    assert abs(float(res["accuracy"].sel(basis=3)) - float(res["majority"])) <= 0.1
    first = signal_check(ds, "carry", where={"place": [1, 2]}, method="polca_first")
    assert first.attrs["method"] == "polca_first" and float(first["accuracy"].sel(basis=0)) >= 0.95


def test_signal_table_of_the_report_uses_the_recorded_restriction():
    store = make_synthetic_store(n_sequences=60, n_intervals=40, n_basis=3, lca=False, seed=0)
    store.attrs["token_labels"] = ["place", "carry"]
    assert binary_labels(store) == ["carry"]
    res = analyze(store, methods=["polca"], min_samples=5, restrict={"carry": ("place", (1, 2))})
    ds = store.assign({k: xr.Variable(d, v, a) for k, (d, v, a) in result_variables(res, store).items()})
    table = signal_table(ds)
    assert table.columns == ["label", "where", "basis", "auc", "accuracy", "n_tokens", "n_positive"]
    assert [r[2] for r in table.rows] == ["0", "1", "2", "all vectors", "exact loss", "majority"]
    assert {r[1] for r in table.rows} == {"place in [1, 2]"}
    direct = signal_check(store, "carry", where={"place": [1, 2]})
    assert table.rows[0][3:5] == pytest.approx([float(direct["auc"][0]), float(direct["accuracy"][0])])
    assert table.rows[0][5] == int(direct["n_tokens"]) == 120
    assert table.rows[3][3] is None  # no AUC for all vectors
    # no analysis: all tokens; no binary label, or one too rare to score: no table
    assert {r[1] for r in signal_table(store).rows} == {"all tokens"}
    assert signal_table(store.drop_vars("carry").assign_attrs(token_labels=["place"])) is None
    rare = store.assign_coords(carry=("token", np.where(np.arange(240) < 2, 1, 0)))
    assert signal_table(rare) is None
