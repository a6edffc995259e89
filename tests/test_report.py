"""Reports: figures on a synthetic analysis, the PNG folder and W&B logging after a real tiny fit.

The W&B test reads back what the offline run wrote (media files, table JSON, and the
history records of the ``.wandb`` log), not a mock.
"""

import json
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from torch.utils.data import DataLoader

from _tiny import AdditionModule, batches
from _wandb import wandb_history
from polca_lightning import POLCACallback, open_store
from polca_lightning.analysis import analyze, check_hidden_flags, make_synthetic_store
from polca_lightning.report import (
    analyze_store,
    appendix_g_figure,
    appendix_g_table,
    cluster_targets_figure,
    cluster_targets_table,
    coverage_figure,
    exact_loss_figure,
    kept_units,
    label_composition_figure,
    mean_loss_figure,
    medoid_contexts_table,
    open_analysed_store,
    projected_loss_figure,
    report_after_fit,
    result_variables,
    store_coverage,
    summary_table,
    write_report_folder,
)


# ------------------------------------------------------------------ a tiny real run
def tiny_fit(root: Path, logger=False, max_steps=12, analyze=True, analysis_kwargs=None) -> POLCACallback:
    """3-digit addition, TinyTransformer(d=8, 1 layer, 2 heads), snapshots every 2 steps,
    2 Hessian vectors every 4 steps up to 4, labels place/carry. With the default analysis
    settings the kept vectors have no clusters; ``analysis_kwargs={"min_samples": 3}``
    gives clusters on vectors 0 and 3 and none on the kept vector 1."""
    cb = POLCACallback(
        store=root / "polca.zarr", probe_data=batches(24, 12, seed=1, labels=True),
        hessian_data=batches(16, 16, seed=2), token_labels=lambda b: {"carry": b["carry"], "place": b["place"]},
        snapshot_every=2, basis_every=4, k=2, max_basis=4, analyze=analyze, progress=False,
        analysis_kwargs=analysis_kwargs,
    )
    trainer = L.Trainer(default_root_dir=root, max_steps=max_steps, callbacks=[cb], logger=logger,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    trainer.fit(AdditionModule(), DataLoader(batches(80, 16, seed=0), batch_size=None))
    return cb


def finished_store(tmp_path_factory) -> Path:
    """One finished, analysed run per test session (built by the callback with no logger,
    so it also wrote its report folder); callers copy it before changing it."""
    root = tmp_path_factory.getbasetemp() / "polca_finished_run"
    store = root / "polca.zarr"
    if not (store / "zarr.json").exists() or not open_store(store).attrs.get("complete"):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        tiny_fit(root)
    return store


def copy_store(store: Path, dest: Path) -> Path:
    shutil.copytree(store, dest / store.name)
    return dest / store.name


# ------------------------------------------------------------------ W&B offline read-back
def test_fit_with_offline_wandb_logger_logs_the_report(tmp_path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=tmp_path, offline=True, project="polca-test")
    cb = tiny_fit(tmp_path, logger=logger, analysis_kwargs={"min_samples": 3})
    run_dir = Path(logger.experiment.dir).parent
    wandb.finish()

    # the analysis is in the store, and no folder was written (W&B got the report)
    ds = open_analysed_store(cb.store)
    assert ds.attrs["complete"] and "cluster" in ds and "tau" in ds
    assert not (tmp_path / "polca.zarr.report").exists()
    kept = kept_units(ds)
    assert kept, "the tiny run should keep at least one vector"
    clustered = [u for u in kept if (ds["cluster_size"].sel(basis=u).values > 0).any()]
    assert clustered and clustered != kept, "the tiny run should have kept vectors with and without clusters"

    media = run_dir / "files" / "media"
    images = {str(p.relative_to(media / "images")) for p in (media / "images").rglob("*.png")}
    for u in clustered:
        for name in ("projected_loss", "exact_loss", "labels"):
            assert any(i.startswith(f"polca_report/vector_{u:02d}/{name}_") for i in images), (u, name, images)
    # no blank figures: neither for vectors the filter dropped nor for kept ones without clusters
    assert not any(i.startswith(f"polca_report/vector_{u:02d}/") for u in set(range(4)) - set(clustered)
                   for i in images)
    assert any(i.startswith("polca_report/coverage_plot_") for i in images)
    assert any(i.startswith("polca_report/appendix_g_carry_") for i in images)

    by_key = {}  # media/table/<key>_<wandb step>_<hash>.table.json
    for p in (media / "table").rglob("*.table.json"):
        by_key[str(p.relative_to(media / "table")).rsplit("_", 2)[0]] = json.loads(p.read_text())
    assert set(by_key) >= {"polca_report/summary", "polca_report/medoid_contexts", "polca_report/appendix_g",
                           "polca_report/cluster_targets", "polca_report/signal_check"}
    signal = by_key["polca_report/signal_check"]  # carry is the binary label (place has 4 values)
    assert signal["columns"] == ["label", "where", "basis", "auc", "accuracy", "n_tokens", "n_positive"]
    assert [row[2] for row in signal["data"]] == ["0", "1", "2", "3", "all vectors", "exact loss", "majority"]
    carry = ds["carry"].values
    assert {row[0] for row in signal["data"]} == {"carry"} and signal["data"][0][5:] == [96, int(carry.sum())]
    assert signal["data"][-1][4] == pytest.approx(max(carry.mean(), 1 - carry.mean()))  # the majority rate
    summary = by_key["polca_report/summary"]
    assert summary["columns"][:4] == ["vector", "eigenvalue", "basis_step", "kept"]
    assert "best carry=1" in summary["columns"] and len(summary["data"]) == 4
    eig = np.asarray(ds["eigenvalue"].values)
    assert np.allclose([row[1] for row in summary["data"]], eig, rtol=1e-5)
    contexts = by_key["polca_report/medoid_contexts"]
    assert contexts["columns"][:7] == ["vector", "cluster", "rank", "token", "sequence", "position", "target"]
    assert {"carry", "place"} <= set(contexts["columns"])
    for row in contexts["data"]:  # rows agree with the store's token coordinates
        token = row[3]
        assert row[4] == int(ds["sequence"][token]) and row[5] == int(ds["position"][token])
        assert int(ds["cluster"].sel(basis=row[0])[token]) == row[1]
    targets = by_key["polca_report/cluster_targets"]  # the sum digits each cluster predicts, recounted here
    assert targets["columns"] == ["vector", "cluster", "cluster_size", "rank", "target", "count", "share", "base_share"]
    clusters = {(u, c) for u in kept for c in range(int((ds["cluster_size"].sel(basis=u).values > 0).sum()))}
    assert {(row[0], row[1]) for row in targets["data"]} == clusters  # every cluster of a kept vector (maybe none)
    for vector, cluster, size, _, target, count, share, _ in targets["data"]:
        members = ds["cluster"].sel(basis=vector).values == cluster
        assert members.sum() == size and (ds["target"].values[members] == target).sum() == count
        assert share == pytest.approx(count / size)
    app_g = by_key["polca_report/appendix_g"]
    assert {"carry", "place"} == {row[0] for row in app_g["data"]}
    assert set(row[2] for row in app_g["data"]) <= {"polca", "polca_first", "fisher", "lca", "loss", "loss_change"}

    # scalars: per-interval coverage at each interval's end step, totals at the last step
    history = wandb_history(run_dir)
    cov_rows = [h for h in history if "polca_report/coverage/ratio" in h]
    assert sorted(h["trainer/global_step"] for h in cov_rows) == [2, 4, 6, 8, 10, 12]
    cov = store_coverage(ds)
    got = {h["trainer/global_step"]: h["polca_report/coverage/real"] for h in cov_rows}
    assert np.allclose([got[s] for s in cov["step"]], cov["real"])
    totals = [h for h in history if "polca_report/coverage_total/ratio" in h]
    assert len(totals) == 1 and totals[0]["trainer/global_step"] == 12
    assert totals[0]["polca_report/kept_vectors"] == len(kept)
    assert totals[0]["polca_report/coverage_total/ratio"] == pytest.approx(cov["summary"]["ratio"])


def test_fit_without_wandb_writes_the_png_folder(tmp_path_factory):
    store = finished_store(tmp_path_factory)
    out = store.with_name("polca.zarr.report")
    ds = open_analysed_store(store)
    kept = kept_units(ds)
    files = {p.name for p in out.iterdir()}
    assert {"index.md", "summary.csv", "medoid_contexts.csv", "cluster_targets.csv", "appendix_g.csv",
            "coverage.csv", "coverage.png", "appendix_g_carry.png", "appendix_g_place.png", "signal_check.csv"} <= files
    signal = (out / "signal_check.csv").read_text().splitlines()
    assert signal[0] == "label,where,basis,auc,accuracy,n_tokens,n_positive" and len(signal) == 1 + 4 + 3
    assert "## Signal check" in (out / "index.md").read_text()
    clustered = [u for u in kept if (ds["cluster_size"].sel(basis=u).values > 0).any()]
    for u in clustered:
        assert {f"vector_{u:02d}_{n}.png" for n in ("projected_loss", "exact_loss", "labels", "targets")} <= files
    # no blank figures: neither for vectors the filter dropped nor for kept ones without clusters
    assert not any(f.startswith(f"vector_{u:02d}") for u in set(range(4)) - set(clustered) for f in files)
    if set(kept) - set(clustered):
        assert (f"Kept vectors without clusters (no per-vector figures): "
                f"{', '.join(str(u) for u in kept if u not in clustered)}.") in (out / "index.md").read_text()
    for f in files:
        if f.endswith(".png"):
            assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vector" in (out / "index.md").read_text()


def test_report_after_fit_on_a_trainer_without_logger_uses_decode(tmp_path, tmp_path_factory):
    store = copy_store(finished_store(tmp_path_factory), tmp_path)
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    report_after_fit(store, trainer, decode=lambda s, p: f"<{s}:{p}>", decode_target=lambda t: f"digit {t}",
                     analysis_kwargs={"min_samples": 3}, report_dir=tmp_path / "out")
    text = (tmp_path / "out" / "medoid_contexts.csv").read_text().splitlines()
    assert text[0].endswith(",text")
    for line in text[1:]:
        cells = line.split(",")
        assert cells[-1] == f"<{cells[4]}:{cells[5]}>"
    text = (tmp_path / "out" / "cluster_targets.csv").read_text().splitlines()
    assert text[0].endswith(",text") and len(text) > 1
    for line in text[1:]:
        cells = line.split(",")
        assert cells[-1] == f"digit {cells[4]}"
    assert open_store(store)["cluster"].attrs["analysis_min_samples"] == 3


def test_report_after_fit_says_the_store_is_complete_when_analysis_fails(tmp_path, tmp_path_factory):
    from polca_lightning.report import ReportError

    store = copy_store(finished_store(tmp_path_factory), tmp_path)
    trainer = L.Trainer(logger=False, default_root_dir=tmp_path, accelerator="cpu", devices=1,
                        enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ReportError, match="is complete; re-run it with `polca analyze"):
        report_after_fit(store, trainer, analysis_kwargs={"group_by": "no_such_label"})
    assert open_store(store).attrs["complete"]


# ------------------------------------------------------------------ synthetic results
@pytest.fixture(scope="module")
def synthetic():
    store = make_synthetic_store(n_sequences=60, n_intervals=40, n_basis=4, lca=False, seed=0)
    store.attrs["token_labels"] = ["place", "carry"]
    res = analyze(store, methods=["polca", "loss"], min_samples=5, restrict={"carry": ("place", (1, 2))})
    vars_ = result_variables(res, store)
    import xarray as xr

    ds = store.assign({k: xr.Variable(d, v, a) for k, (d, v, a) in vars_.items()}).assign(
        tau=res["tau"], tau_paper=res["tau_paper"])
    return ds, res


def _gids(fig, gid):
    return [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]


def test_projected_and_exact_loss_figures_draw_one_line_per_cluster(synthetic):
    ds, res = synthetic
    for u in kept_units(ds):
        n_c = int((res["cluster_size"].sel(basis=u).values > 0).sum())
        n_on = int(np.isfinite(res["cluster_onset"].sel(basis=u).values[:n_c]).sum())
        fig = projected_loss_figure(ds, u)
        assert isinstance(fig, Figure)
        lines = _gids(fig, "cluster_mean")
        assert len(lines) == n_c and len(_gids(fig, "onset")) == n_on and len(_gids(fig, "tau")) == 1
        assert len(fig.axes[0].collections) == n_c  # one quantile band per cluster
        for c, line in enumerate(lines):  # the line is the analysis' cluster mean
            assert np.allclose(line.get_ydata(), res["cluster_trajectory"].sel(basis=u).values[c])
        x_on = sorted(line.get_xdata()[0] for line in _gids(fig, "onset"))
        assert np.allclose(x_on, sorted(res["cluster_onset"].sel(basis=u).values[:n_c][np.isfinite(
            res["cluster_onset"].sel(basis=u).values[:n_c])]))
        fig = exact_loss_figure(ds, u)
        assert len(_gids(fig, "cluster_mean")) == n_c and len(_gids(fig, "mean_loss")) == 1
    # vector 0 plants a carry group: its figure has at least one cluster
    assert 0 in kept_units(ds) and len(_gids(projected_loss_figure(ds, 0), "cluster_mean")) >= 1


def test_the_tau_line_says_taus_rule(synthetic):
    ds, res = synthetic
    tau = float(res["tau"])
    assert res.attrs["analysis_tau_rule"].startswith("plateau") and tau != float(res["tau_paper"])
    for fig in (projected_loss_figure(ds, 0), exact_loss_figure(ds, 0), mean_loss_figure(ds)):
        (line,) = _gids(fig, "tau")
        assert line.get_xdata()[0] == tau and line.get_label() == f"τ = {tau:g} (plateau: mean loss flat)"
    paper = analyze(ds, methods=["loss"], tau="paper", entropy_scores=False)  # the rule it records
    as_paper = ds.copy().assign(tau=paper["tau"])
    as_paper["cluster"].attrs = {**ds["cluster"].attrs, "analysis_tau_rule": paper.attrs["analysis_tau_rule"]}
    (line,) = _gids(projected_loss_figure(as_paper, 0), "tau")
    assert line.get_label() == f"τ = {float(res['tau_paper']):g} (paper: 10% of the run)"


def test_mean_loss_figure_draws_the_mean_exact_loss_and_both_taus(synthetic):
    ds, res = synthetic
    fig = mean_loss_figure(ds)
    (curve,) = _gids(fig, "mean_loss")
    mean = np.nanmean(ds["loss"].transpose("snapshot", "token").values.astype(np.float64), axis=1)
    np.testing.assert_allclose(curve.get_ydata(), mean)
    np.testing.assert_array_equal(curve.get_xdata(), ds["step"].values)
    (paper,) = _gids(fig, "tau_paper")
    assert paper.get_xdata()[0] == float(res["tau_paper"]) and "10% of the run" in paper.get_label()
    assert len(_gids(fig, "tau")) == 1
    # with the paper's rule in force there is one τ line, not two
    same = ds.assign(tau=res["tau_paper"])
    assert len(_gids(mean_loss_figure(same), "tau_paper")) == 0
    with pytest.raises(ValueError, match="no analysis"):
        mean_loss_figure(ds.drop_vars(["tau"]))


def test_label_composition_figure_has_a_stack_per_label_value(synthetic):
    ds, res = synthetic
    fig = label_composition_figure(ds, 0)
    cl = res["cluster"].sel(basis=0).values
    n_cols = int((res["cluster_size"].sel(basis=0).values > 0).sum()) + int((cl == -1).any())
    assert len(fig.axes) == 2
    for ax, label, n_vals in zip(fig.axes, ["place", "carry"], [4, 2]):
        bars = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert len(bars) == n_vals and all(len(b) == n_cols for b in bars)
        tops = np.sum([[r.get_height() for r in b] for b in bars], axis=0)
        assert np.allclose(tops, 1.0)  # fractions stack to 1
    # the carry=1 share of cluster 0 is its homogeneity
    carry = ds["carry"].values
    share = [r.get_height() for r in fig.axes[1].containers[1]][0]
    assert share == pytest.approx(np.mean(carry[cl == 0] == 1))


def test_coverage_and_appendix_g(synthetic):
    ds, res = synthetic
    cov = store_coverage(ds)
    polca = ds["polca"].values.astype(np.float64).sum(1)  # [interval, token]
    real = np.diff(ds["loss"].values.astype(np.float64), axis=0)
    assert np.allclose(cov["allocated"], polca.mean(1)) and np.allclose(cov["real"], real.mean(1))
    assert cov["summary"]["ratio"] == pytest.approx(polca.sum() / real.sum())
    fig = coverage_figure(cov)
    assert len(_gids(fig, "allocated")) == 2 and len(_gids(fig, "real")) == 1  # polca and first order
    fig = appendix_g_figure(ds, "carry")
    bars = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]
    assert len(bars) == int(res.attrs["analysis_top_k"]) and all(len(b) == 2 for b in bars)  # polca, loss
    table = appendix_g_table(ds)
    best = int(res["carry_best"].sel(trajectory_type="polca", carry_value=1, rank=0))
    row = [r for r in table.rows if r[:4] == ["carry", 1, "polca", 0]][0]
    assert row[4] == int(res["entry_unit"][best]) and row[7] == pytest.approx(
        float(res["carry_homogeneity"][best].sel(carry_value=1)))
    summary = summary_table(ds)
    assert [r[0] for r in summary.rows] == [0, 1, 2, 3] and summary.rows[2][3] is False  # vector 2 oscillates
    contexts = medoid_contexts_table(ds, k=3)
    medoid_rows = [r for r in contexts.rows if r[2] == 0]
    for r in medoid_rows:
        assert r[3] == int(res["medoid"].sel(basis=r[0]).values[r[1]]) and r[7] == 0.0


def test_analyze_store_writes_and_replaces_results(tmp_path, tmp_path_factory):
    store = copy_store(finished_store(tmp_path_factory), tmp_path)
    ds = analyze_store(store, methods=["polca", "loss"], min_samples=3)
    assert "loss_cluster" in ds and "polca_first_cluster" not in ds  # stale baselines are gone
    assert float(ds["tau"]) == ds["cluster"].attrs["analysis_tau"]
    assert float(ds["tau_paper"]) == ds["cluster"].attrs["analysis_tau_paper"] < float(ds["tau"])
    assert ds["cluster"].attrs["analysis_tau_rule"].startswith("plateau")  # the default
    again = open_analysed_store(store)
    assert (again["cluster"].values == ds["cluster"].values).all()
    assert again["entry_method"].dims == ("entry",)


# ------------------------------------------------------------------ most common targets per cluster
def targets_store(target=True):
    """12 tokens, 3 vectors (1 dropped by the filter), clusters and targets chosen by hand.

    target ids:   5 5 5 7 7 | 9 -1 5 7 7 7 9
    vector 0:     0 0 0 0 0 | 1  1 -1 1 1 1 -2   (c0: 5x3 7x2; c1: 7x3 9x1 and one without a target)
    vector 1:     not kept
    vector 2:     0 0 1 1 0 | 1  0  0 1 -1 -1 -1 (c0: 5x3 7x1 and one without; c1: 7x2, then 5 and 9 tie)
    """
    import xarray as xr

    clusters = np.array([
        [0, 0, 0, 0, 0, 1, 1, -1, 1, 1, 1, -2],
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 0, 1, 0, 0, 1, -1, -1, -1],
    ])
    sizes = np.array([[(c == k).sum() for k in range(3)] for c in clusters])
    coords = {"target": ("token", np.array([5, 5, 5, 7, 7, 9, -1, 5, 7, 7, 7, 9]))} if target else {}
    return xr.Dataset(
        {"cluster": (("basis", "token"), clusters), "cluster_size": (("basis", "cluster_id"), sizes),
         "kept": ("basis", np.array([True, False, True]))},
        coords=coords,
    )


def test_cluster_targets_table_counts_each_clusters_targets():
    table = cluster_targets_table(targets_store(), top=5)
    assert table.columns == ["vector", "cluster", "cluster_size", "rank", "target", "count", "share", "base_share"]
    base = {5: 4 / 12, 7: 5 / 12, 9: 2 / 12}  # share among all 12 tokens
    expected = [
        # vector 0, c0 = tokens 0-4: 5 5 5 7 7
        [0, 0, 5, 0, 5, 3, 3 / 5, base[5]], [0, 0, 5, 1, 7, 2, 2 / 5, base[7]],
        # vector 0, c1 = tokens 5 6 8 9 10: 9 -1 7 7 7 (the token without a target counts in the size only)
        [0, 1, 5, 0, 7, 3, 3 / 5, base[7]], [0, 1, 5, 1, 9, 1, 1 / 5, base[9]],
        # vector 2, c0 = tokens 0 1 4 6 7: 5 5 7 -1 5
        [2, 0, 5, 0, 5, 3, 3 / 5, base[5]], [2, 0, 5, 1, 7, 1, 1 / 5, base[7]],
        # vector 2, c1 = tokens 2 3 5 8: 5 7 9 7
        [2, 1, 4, 0, 7, 2, 2 / 4, base[7]], [2, 1, 4, 1, 5, 1, 1 / 4, base[5]], [2, 1, 4, 2, 9, 1, 1 / 4, base[9]],
    ]
    assert len(table.rows) == len(expected)
    for got, want in zip(table.rows, expected):
        assert got[:6] == want[:6] and got[6:] == pytest.approx(want[6:]), (got, want)


def test_cluster_targets_table_top_ties_units_and_text():
    ds = targets_store()
    # in vector 2's c1, 5 and 9 tie at 1 behind 7: the smaller id goes first, top=2 cuts 9
    table = cluster_targets_table(ds, top=2, units=[2])
    assert [(r[1], r[4], r[5]) for r in table.rows] == [(0, 5, 3), (0, 7, 1), (1, 7, 2), (1, 5, 1)]
    assert [r[:2] for r in cluster_targets_table(ds, top=1).rows] == [[0, 0], [0, 1], [2, 0], [2, 1]]
    # a vector the filter dropped is listed when asked for: one cluster of all 12 tokens
    (row,) = cluster_targets_table(ds, top=1, units=[1]).rows
    assert row[:6] == [1, 0, 12, 0, 7, 5]
    words = {5: "the", 7: "of", 9: ","}
    table = cluster_targets_table(ds, top=5, decode_target=words.__getitem__)
    assert table.columns[-1] == "text" and all(r[-1] == words[r[4]] for r in table.rows)


def test_cluster_targets_table_without_targets_and_bad_arguments():
    assert cluster_targets_table(targets_store(target=False)) is None
    none_known = targets_store().assign_coords(target=("token", np.full(12, -1)))
    assert cluster_targets_table(none_known) is None  # token_loss gave no target
    with pytest.raises(ValueError, match="top: expected a positive int, got 0"):
        cluster_targets_table(targets_store(), top=0)
    with pytest.raises(TypeError, match="decode_target: expected a callable"):
        cluster_targets_table(targets_store(), decode_target={5: "the"})
    with pytest.raises(ValueError, match="method: expected one of"):
        cluster_targets_table(targets_store(), method="pca")


def test_cluster_targets_figure_draws_shares_against_base_shares():
    ds = targets_store()
    fig = cluster_targets_figure(ds, 0, decode_target=str)
    panels = [ax for ax in fig.axes if ax.axison]
    assert len(panels) == 2  # c0, c1
    for ax, (shares, bases) in zip(panels, [([3 / 5, 2 / 5], [4 / 12, 5 / 12]), ([3 / 5, 1 / 5], [5 / 12, 2 / 12])]):
        (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
        assert [r.get_width() for r in sorted(bars, key=lambda r: -r.get_y())] == pytest.approx(shares)
        (ticks,) = [a for a in ax.get_children() if a.get_gid() == "base_share"]
        x, y = np.asarray(ticks.get_offsets()).T  # one tick per bar, at the target's share of all tokens
        assert x[np.argsort(-y)] == pytest.approx(bases)
    ticks = sorted(zip(panels[0].get_yticks(), [t.get_text() for t in panels[0].get_yticklabels()]), reverse=True)
    assert [text for _, text in ticks] == ["5", "7"]  # the most common on top
    # no targets: one panel that says so
    fig = cluster_targets_figure(targets_store(target=False), 0)
    assert "no target tokens" in fig.axes[0].texts[0].get_text()


def test_report_folder_lists_targets_and_skips_them_without(tmp_path, synthetic):
    ds, _ = synthetic
    out = write_report_folder(ds, tmp_path / "with", decode_target=lambda t: f"w{t}")
    rows = (out / "cluster_targets.csv").read_text().splitlines()
    assert rows[0] == "vector,cluster,cluster_size,rank,target,count,share,base_share,text"
    assert len(rows) - 1 == len(cluster_targets_table(ds).rows) > 0
    assert all(line.split(",")[-1] == "w" + line.split(",")[4] for line in rows[1:])
    assert {f"vector_{u:02d}_targets.png" for u in kept_units(ds)} <= {p.name for p in out.iterdir()}
    # a store without a target coordinate: the rest of the report, no targets table or figure
    out = write_report_folder(ds.drop_vars("target"), tmp_path / "without")
    files = {p.name for p in out.iterdir()}
    assert "medoid_contexts.csv" in files and "summary.csv" in files
    assert "cluster_targets.csv" not in files and not any(f.endswith("_targets.png") for f in files)
    assert (out / "medoid_contexts.csv").read_text().splitlines()[1].split(",")[6] == "-1"


def test_every_hidden_flag_of_a_trained_store_is_its_drawn_onset_after_tau(tmp_path, tmp_path_factory):
    """On the callback's own store: ``hidden == (cluster_onset > tau)`` for every cluster of
    every trajectory type, under τ and the paper's τ; a flipped flag is caught."""
    store = copy_store(finished_store(tmp_path_factory), tmp_path)
    for settings in ({}, {"min_samples": 3}, {"min_samples": 3, "tau": "paper"}):
        ds = analyze_store(store, **settings)
        n = check_hidden_flags(ds)
        assert n == ds.sizes["entry"] and n > 0
        if settings:  # POLCA's own clusters among those checked (vectors 0 and 3)
            assert (ds["entry_method"].values == "polca").sum() >= 2
    ds = ds.load()
    for name in ("entry_hidden", "entry_hidden_paper", "hidden", "loss_hidden"):
        bad = ds.copy(deep=True)
        bad[name].values[..., 0] = ~bad[name].values[..., 0]
        with pytest.raises(ValueError, match="not cluster_onset > tau"):
            check_hidden_flags(bad)
    # the store as open_store gives it (τ from the recorded attributes), and a store without an analysis
    assert check_hidden_flags(open_store(store)) == n
    bare = open_store(store, analysis=False)
    with pytest.raises(ValueError, match="not an analysed store"):
        check_hidden_flags(bare)
