"""A re-analysis starts from the store's own settings, and every App. G score says what it
is conditioned on: the restriction (or "none"), the chance level's basis, the
coordinates that fix the label within the cluster, τ and its rule."""

import json

import matplotlib
import numpy as np
import pytest
import xarray as xr

from polca_lightning.analysis import AnalysisSettings, analyze, make_synthetic_store
from polca_lightning.analysis.recorded import SETTINGS_ATTR, describe_settings
from polca_lightning.analysis.scores import determined, fixed_by
from polca_lightning.cli import main
from polca_lightning.report import appendix_g_figure, appendix_g_table, open_analysed_store, summary_table
from polca_lightning.report.conditioning import entry_members, fixing_coordinates, hidden_views
from polca_lightning.report.pipeline import analyze_store, report_after_fit, result_variables
from test_report import copy_store, finished_store, tiny_fit

matplotlib.use("Agg")

CARRY_RESTRICT = {"carry": ("place", (1, 2))}
AFTER_FIT = {"min_samples": 3, "restrict": CARRY_RESTRICT, "tau": "paper"}  # τ named: not the default's


@pytest.fixture(scope="module")
def restricted_run(tmp_path_factory):
    """A tiny run the callback analysed after fit with App. G's carry restriction."""
    root = tmp_path_factory.mktemp("restricted_run")
    tiny_fit(root, analysis_kwargs=AFTER_FIT)
    return root / "polca.zarr"


@pytest.fixture
def restricted(restricted_run, tmp_path):
    return copy_store(restricted_run, tmp_path)


def _scores(table, label="carry"):
    """The App. G rows of ``label`` up to ``fixed_by`` (the hidden columns name τ)."""
    end = table.columns.index("fixed_by") + 1
    return [row[:end] for row in table.rows if row[0] == label]


# ------------------------------------------------------------------ the recorded settings
def test_from_store_rebuilds_the_settings_exactly():
    ds = make_synthetic_store(n_sequences=30, n_intervals=30, n_basis=3, lca=False, seed=0)
    settings = AnalysisSettings(methods=["polca", "loss"], tau="plateau", tau_fraction=0.1, delta="wide",
                                min_samples=None, restrict=CARRY_RESTRICT, restrict_fraction=0.5, top_k=2,
                                entropy_scores=False, normalize="token")
    res = analyze(ds, settings)
    assert json.loads(res.attrs[SETTINGS_ATTR]) == settings.to_dict()
    assert AnalysisSettings.from_store(res) == settings
    # the same through the variables a store gets (every one carries the attributes)
    written = ds.assign({k: xr.Variable(d, v, a) for k, (d, v, a) in result_variables(res, ds).items()})
    assert AnalysisSettings.from_store(written) == settings
    assert AnalysisSettings.from_store(ds) is None  # no analysis recorded


def test_from_store_falls_back_to_the_single_attributes_of_earlier_versions():
    ds = make_synthetic_store(n_sequences=30, n_intervals=30, n_basis=3, lca=False, seed=0)
    # the single attributes hold the methods and labels as resolved on the store: given here
    for settings in (AnalysisSettings(methods=["polca"], labels=["place", "carry"], tau="plateau", delta="wide", restrict=CARRY_RESTRICT,
                                      min_samples=None, group_by="place", normalize="token"),
                     AnalysisSettings(methods=["loss"], labels=["place", "carry"], tau=120.0, delta=40.0, min_cluster_size=5,
                                      restrict_fraction=0.5, entropy_scores=False)):
        res = analyze(ds, settings)
        old = res.assign_attrs({SETTINGS_ATTR: None})
        del old.attrs[SETTINGS_ATTR]
        written = ds.assign({k: xr.Variable(d, v, a) for k, (d, v, a) in result_variables(old, ds).items()})
        assert AnalysisSettings.from_store(written) == settings
    # the earliest plateau rule, and a removed setting, as an earlier version wrote them
    attrs = {"analysis_methods": ["loss"], "analysis_tau": 300.0, "analysis_onset_delta": 20.0,
             "analysis_tau_rule": "plateau_step(fraction=0.1, smooth=3)", "analysis_hidden_rule": "mean_curve",
             "analysis_restrict": "{}", "analysis_min_samples": -1, "analysis_group_by": ""}
    got = AnalysisSettings.from_store(xr.Dataset(attrs=attrs))
    assert got == AnalysisSettings(methods=["loss"], tau="plateau", tau_fraction=0.1, tau_smooth=3, delta=20.0,
                                   min_samples=None)
    # a JSON record with a key that is no setting now (one since removed) skips it
    record = {**AnalysisSettings(tau="plateau").to_dict(), "a_removed_setting": "x"}
    assert AnalysisSettings.from_store(xr.Dataset(attrs={SETTINGS_ATTR: json.dumps(record)})).tau == "plateau"
    with pytest.raises(ValueError, match="not a JSON object"):
        AnalysisSettings.from_store(xr.Dataset(attrs={SETTINGS_ATTR: "[1, 2]"}))


def test_describe_settings_marks_what_changed():
    before = AnalysisSettings(restrict=CARRY_RESTRICT, tau="paper")
    lines = describe_settings(AnalysisSettings(restrict=CARRY_RESTRICT, tau="plateau"), before,
                              resolved={"analysis_tau": 330.0})
    tau = [line for line in lines if line.split()[1:2] == ["tau"]][0]
    assert tau.startswith("* ") and "plateau (= 330)" in tau and "(was paper)" in tau
    restrict = [line for line in lines if " restrict " in line][0]
    assert restrict.startswith("  ") and "carry: place in [1, 2]" in restrict
    assert not any(line.startswith("*") for line in describe_settings(before, before))
    assert not any(line.startswith("*") for line in describe_settings(before))  # nothing to compare with


# ------------------------------------------------------------------ re-analysing a store
def test_reanalysis_keeps_the_restriction_and_changes_only_the_flags_given(restricted, capsys):
    run = open_analysed_store(restricted)
    attrs = dict(run["cluster"].attrs)
    assert AnalysisSettings.from_store(run) == AnalysisSettings(**AFTER_FIT)
    table = appendix_g_table(run)
    assert {row[table.columns.index("restriction")] for row in table.rows if row[0] == "carry"} \
        == {"place in [1, 2], over 85%"}

    assert main(["analyze", str(restricted), "--tau", "plateau", "--quiet", "--no-report"]) == 0
    out = capsys.readouterr().out
    ds = open_analysed_store(restricted)
    new = ds["cluster"].attrs
    assert new["analysis_restrict"] == attrs["analysis_restrict"] and new["analysis_min_samples"] == 3
    assert new["analysis_tau_rule"].startswith("plateau") and attrs["analysis_tau_rule"].startswith("paper")
    assert new["analysis_tau"] != attrs["analysis_tau"]
    assert _scores(appendix_g_table(ds)) == _scores(table)  # τ moves no cluster: the carry figures stay
    assert "the store's previous analysis" in out
    assert [line for line in out.splitlines() if line.startswith("* ")] == \
        [line for line in out.splitlines() if line.startswith("* tau ")]
    assert "carry: restriction place in [1, 2], over 85%; chance from the cluster's mix of place" in out

    assert main(["analyze", str(restricted), "--min-samples", "5", "--quiet", "--no-report"]) == 0
    ds = open_analysed_store(restricted)
    assert ds["cluster"].attrs["analysis_restrict"] == attrs["analysis_restrict"]
    assert ds["cluster"].attrs["analysis_min_samples"] == 5 and ds["cluster"].attrs["analysis_tau_rule"] \
        .startswith("plateau")
    # the carry figures of the restricted protocol at min_samples 5, as a fresh analysis gives them
    fresh = analyze_store(restricted, write=False, defaults=True, tau="plateau", min_samples=5,
                          restrict=CARRY_RESTRICT)
    assert _scores(appendix_g_table(ds)) == _scores(appendix_g_table(fresh))
    place = ds["place"].values
    for row in appendix_g_table(ds).rows:  # every carry cluster listed passes the 85 % rule
        if row[0] == "carry" and row[1] == 1:
            method = row[2]
            prefix = "" if method == "polca" else f"{method}_"
            cl = ds[prefix + "cluster"].values
            members = (cl[row[4]] if cl.ndim == 2 else cl) == row[5]
            carries = members & (ds["carry"].values == 1)
            assert np.isin(place[carries], (1, 2)).mean() > 0.85


def test_defaults_and_no_restrict_drop_the_restriction_and_say_none(restricted, capsys):
    assert main(["analyze", str(restricted), "--no-restrict", "--quiet", "--no-write", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "* restrict                 none (was carry: place in [1, 2])" in out
    assert "carry: restriction none; chance from the label's base rate" in out
    assert main(["analyze", str(restricted), "--defaults", "--quiet", "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "the defaults (--defaults)" in out and "* min_samples" in out
    ds = open_analysed_store(restricted)
    assert ds["cluster"].attrs["analysis_restrict"] == "{}" and ds["cluster"].attrs["analysis_min_samples"] == 10


def _says_none_everywhere(ds):
    table = appendix_g_table(ds)
    assert table is not None and table.rows
    col = table.columns.index
    assert {row[col("restriction")] for row in table.rows} == {"none"}
    assert {row[col("chance_from")] for row in table.rows} == {"base rate"}
    summary = summary_table(ds)
    for lab in ("carry", "place"):
        assert {row[summary.columns.index(f"restriction {lab}")] for row in summary.rows} == {"none"}
    for lab in ("carry", "place"):
        title = appendix_g_figure(ds, lab).axes[0].get_title()
        assert "restriction: none" in title and "τ = " in title and ds["cluster"].attrs["analysis_tau_rule"] in title


def test_a_store_analysed_without_a_restriction_says_none(tmp_path, tmp_path_factory):
    store = copy_store(finished_store(tmp_path_factory), tmp_path)  # analysed after fit on the defaults
    ds = open_analysed_store(store)
    assert ds["cluster"].attrs["analysis_restrict"] == "{}"
    ds = analyze_store(store, methods=["polca", "loss"], min_samples=3)  # clusters to list; still none
    _says_none_everywhere(ds)


def test_the_after_fit_analysis_uses_its_kwargs_on_the_defaults(restricted, tmp_path):
    with pytest.warns(UserWarning, match="no W&B or TensorBoard logger"):
        report_after_fit(restricted, loggers=[], analysis_kwargs={"min_samples": 4}, progress=False,
                         report_dir=tmp_path / "rep")
    ds = open_analysed_store(restricted)
    assert AnalysisSettings.from_store(ds) == AnalysisSettings(min_samples=4)  # not the store's restriction


def test_analyze_store_checks_where_it_starts(restricted):
    with pytest.raises(TypeError, match="not both"):
        analyze_store(restricted, write=False, settings=AnalysisSettings(), defaults=True)
    with pytest.raises(TypeError, match="unknown"):
        analyze_store(restricted, write=False, min_sample=5)
    ds = analyze_store(restricted, write=False, settings=AnalysisSettings(tau=6.0), min_samples=3)
    assert AnalysisSettings.from_store(ds) == AnalysisSettings(tau=6.0, min_samples=3)


# ------------------------------------------------------------------ a label fixed by another coordinate
# 3-digit addition by hand, 60 tokens: twenty 1000s digits (the carry is the digit: 0 or 1),
# twenty 10s digits (the carry is not the digit: each digit 0..4 once without and once with a
# carry, twice over) and twenty 1s digits (nothing carries into the 1s)
PLACE_H = np.repeat([0, 2, 3], 20)
DIGIT_H = np.r_[np.tile([0, 1], 10), np.tile(np.arange(5), 4), np.arange(20) % 10]
CARRY_H = np.r_[np.tile([0, 1], 10), np.repeat([0, 1, 0, 1], 5), np.zeros(20, int)]


def test_determined_by_hand():
    det = determined(CARRY_H, [PLACE_H, DIGIT_H])
    # 1000s: strata (0, 0) and (0, 1) of 10 tokens each, pure; 10s: (2, d) of 4 tokens,
    # under min_count 5 (and half carries); 1s: (3, d) of 2 tokens, under min_count 5
    assert det.tolist() == [True] * 20 + [False] * 40
    assert determined(CARRY_H, PLACE_H).tolist() == [False] * 40 + [True] * 20  # place 3: never a carry
    assert determined(CARRY_H, [PLACE_H, DIGIT_H], min_count=2).tolist() == [True] * 20 + [False] * 20 + [True] * 20
    # 18 of 20 in a stratum: at the 0.9 bar; 17 of 20: not
    label = np.r_[np.zeros(18, int), 1, 1]
    assert determined(label, np.zeros(20, int)).sum() == 18
    assert not determined(np.r_[np.zeros(17, int), 1, 1, 1], np.zeros(20, int)).any()
    with pytest.raises(ValueError, match="fraction"):
        determined(label, label, fraction=0)


def test_fixed_by_by_hand():
    both = [PLACE_H, DIGIT_H]
    thousands, tens, ones = PLACE_H == 0, PLACE_H == 2, PLACE_H == 3
    assert fixed_by(thousands, CARRY_H, both) and not fixed_by(thousands, CARRY_H, DIGIT_H)
    assert not fixed_by(thousands, CARRY_H, PLACE_H)  # half the 1000s digits carry
    assert fixed_by(ones, CARRY_H, PLACE_H)  # nothing carries into the 1s
    assert not fixed_by(tens, CARRY_H, both) and not fixed_by(tens, CARRY_H, PLACE_H)
    assert fixed_by(thousands | ones, CARRY_H, PLACE_H) is False  # half the members: the 1s only
    # 18 of 20 members determined: at the 0.9 bar; three 10s digits among 17 1000s: not
    assert fixed_by(thousands & (np.arange(60) > 1) | np.isin(np.arange(60), [20, 21]), CARRY_H, both)
    assert not fixed_by(thousands & (np.arange(60) > 2) | np.isin(np.arange(60), [20, 21, 22]), CARRY_H, both)
    # coordinates that give the label for (nearly) every token fix nothing: a word's kind by the word
    word = np.array([5, 6, 7, 8] * 10)
    kind = (word > 6).astype(int)
    assert not fixed_by(np.arange(40) < 20, kind, word)
    assert not fixed_by(np.ones(60, bool), np.ones(60, int), PLACE_H)  # a label that never varies
    with pytest.raises(ValueError, match="members"):
        fixed_by(thousands[:10], CARRY_H, both)


def test_the_1000s_cluster_is_flagged_fixed_by_place_and_target():
    """The synthetic store plants the motivating case: vector 1 drops the 1000s-place
    tokens, whose carry is their digit (target = digit + 3)."""
    ds = make_synthetic_store(n_sequences=100, n_intervals=60, n_basis=4, lca=False, seed=0)
    res = analyze(ds, methods=["polca", "loss"], entropy_scores=False)  # no restriction
    merged = ds.assign({k: xr.Variable(d, v, a) for k, (d, v, a) in result_variables(res, ds).items()})
    place, carry, target = ds["place"].values, ds["carry"].values, ds["target"].values
    entries = np.arange(merged.sizes["entry"])
    members = [entry_members(merged, e) for e in entries]
    fixed = fixing_coordinates(merged, "carry", entries)
    thousands = [e for e in entries if (place[members[e]] == 0).mean() >= 0.9]
    ones = [e for e in entries if (place[members[e]] == 3).mean() >= 0.9]
    assert thousands and all(fixed[e] == ["place+target"] for e in thousands)
    assert ones and all(fixed[e] == ["place"] for e in ones)
    # against the rule read off by hand: the share of members whose (place, target) stratum of
    # the whole store is at least 90 % of their own carry value, and has at least 5 tokens
    for e in entries:
        ok = []
        for t in np.flatnonzero(members[e]):
            stratum = (place == place[t]) & (target == target[t])
            ok.append(stratum.sum() >= 5 and (carry[stratum] == carry[t]).mean() >= 0.9)
        assert ("place+target" in fixed[e] or fixed[e] == ["place"]) == (np.mean(ok) >= 0.9), e
    table = appendix_g_table(merged)
    col = table.columns.index
    rows = [r for r in table.rows if r[0] == "carry" and r[col("unit")] == 1 and r[2] == "polca"
            and r[col("cluster")] == merged["entry_cluster"].values[thousands[0]]]
    assert rows and all(r[col("fixed_by")] == "place+target" and r[col("restriction")] == "none" for r in rows)
    fig = appendix_g_figure(merged, "carry")
    assert any(t.get_gid() == "fixed" and "place+target" in t.get_text() for t in fig.axes[0].texts)


# ------------------------------------------------------------------ the figure and the two τ
def test_figure_draws_chance_and_reference_beside_every_bar():
    ds = make_synthetic_store(n_sequences=60, n_intervals=40, n_basis=4, lca=False, seed=3)
    res = analyze(ds, methods=["polca", "loss"], restrict=CARRY_RESTRICT, entropy_scores=False, min_samples=5)
    merged = ds.assign({k: xr.Variable(d, v, a) for k, (d, v, a) in result_variables(res, ds).items()})
    merged = merged.assign(tau=res["tau"])
    fig = appendix_g_figure(merged, "carry", reference={"polca": [0.973, 0.946, 0.903], "loss": 0.514,
                                                        "lca": 0.792})
    ax = fig.axes[0]
    best = res["carry_best"].sel(carry_value=1).values  # [type, rank]
    chance = res["carry_chance"].sel(carry_value=1).values
    sticks = [c for c in ax.collections if c.get_gid() == "chance"]
    want = sorted(float(chance[e]) for e in best.ravel() if e >= 0 and np.isfinite(chance[e]))
    assert sorted(float(s.get_segments()[0][1][1]) for s in sticks) == pytest.approx(want)
    marks = [line for line in ax.lines if line.get_gid() == "reference"]
    n_polca = int((best[0] >= 0).sum())  # a reference per rank drawn for polca; lca is not in the analysis
    assert len(marks) == min(n_polca, 3) + 1
    title = ax.get_title()
    assert "restriction: place in [1, 2], over 85%" in title and "the cluster's mix of place" in title
    assert "τ = " in title and res.attrs["analysis_tau_rule"] in title


def test_both_hidden_fractions_side_by_side_when_the_analysis_has_the_papers_tau():
    ds = make_synthetic_store(n_sequences=40, n_intervals=40, n_basis=3, lca=False, seed=1)
    res = analyze(ds, methods=["polca", "loss"], tau="plateau", restrict=CARRY_RESTRICT, entropy_scores=False,
                  min_samples=5)
    both = ds.assign({k: xr.Variable(d, v, a) for k, (d, v, a) in result_variables(res, ds).items()})
    both = both.assign(tau=res["tau"], tau_paper=res["tau_paper"])
    merged = both.drop_vars(["entry_hidden_paper", "hidden_fraction_paper", "tau_paper"])  # as older versions wrote it
    (own,) = hidden_views(merged)  # an analysis without the paper's τ: its own only
    assert own.rule == "plateau" and own.flag_column == f"hidden (τ={float(res['tau']):g}, plateau)"
    # the paper's τ, computed here from the steps and the drawn onsets, independently of the analysis
    paper_tau = float(ds["step"][0] + 0.1 * (ds["step"][-1] - ds["step"][0]))
    assert float(both["tau_paper"]) == pytest.approx(paper_tau)
    onset = both["entry_onset"].values
    flags = np.isfinite(onset) & (onset > paper_tau)
    views = hidden_views(both)
    assert [v.key for v in views] == ["hidden", "hidden_paper"]
    table = appendix_g_table(both)
    col = table.columns.index
    paper_col = f"hidden_paper (τ={paper_tau:g}, paper)"
    assert paper_col in table.columns and f"hidden_fraction_paper (τ={paper_tau:g}, paper)" in table.columns
    for row in table.rows:
        entry = [e for e in range(both.sizes["entry"]) if both["entry_method"].values[e] == row[2]
                 and both["entry_unit"].values[e] == row[4] and both["entry_cluster"].values[e] == row[5]][0]
        assert row[col(paper_col)] == bool(flags[entry])
    ticks = [t.get_text() for t in appendix_g_figure(both, "carry").axes[0].get_xticklabels()]
    assert all(t.count("|") == 1 for t in ticks)
    assert len(appendix_g_table(merged).columns) == len(table.columns) - 2


# ------------------------------------------------------------------ a re-analysis that does not write
@pytest.mark.parametrize("flags", [["--min-samples", "5"], ["--group-by", "target"]], ids=lambda f: f[0])
def test_a_reanalysis_without_writing_gives_the_tables_of_one_that_writes(restricted, flags, capsys):
    """Settings that change the number of clusters: the new results must not meet the
    store's previous analysis (``cluster_id`` of another length) in one dataset."""
    before = open_analysed_store(restricted)
    changes = {"min_samples": 5} if flags[0] == "--min-samples" else {"group_by": "target"}
    kept = analyze_store(restricted, write=False, **changes)
    assert kept.sizes["cluster_id"] != before.sizes["cluster_id"]  # the case: another number of clusters
    assert main(["analyze", str(restricted), *flags, "--quiet", "--no-write", "--no-report"]) == 0
    not_written = capsys.readouterr().out
    untouched = open_analysed_store(restricted)  # the store still holds its previous analysis
    assert untouched.sizes["cluster_id"] == before.sizes["cluster_id"]
    assert AnalysisSettings.from_store(untouched) == AnalysisSettings.from_store(before)

    assert main(["analyze", str(restricted), *flags, "--quiet", "--no-report"]) == 0
    written = capsys.readouterr().out
    assert not restricted.with_name(restricted.name + ".report").exists()  # --no-report: the tables only
    assert written.replace(f"analysis written into {restricted}\n", "") == not_written
    ds = open_analysed_store(restricted)
    assert ds.sizes["cluster_id"] == kept.sizes["cluster_id"]
    for table in (summary_table, appendix_g_table):
        a, b = table(kept), table(ds)
        assert a.columns == b.columns and a.rows == b.rows, table.__name__
    # every result variable of the two, and no stale one of the previous analysis
    results = {name for name, var in ds.variables.items() if "analysis_timings" in var.attrs}
    assert results == {name for name, var in kept.variables.items() if "analysis_timings" in var.attrs}
    for name in results:
        np.testing.assert_array_equal(kept[name].values, ds[name].values, err_msg=name)
