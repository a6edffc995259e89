"""The ``polca`` command, in process: info/analyze/report on finished, half-written and foreign paths."""

import glob
from pathlib import Path

import numpy as np
import pytest

from polca_lightning.cli import main
from polca_lightning.report import open_analysed_store
from polca_lightning.store import StoreWriter, TokenIndex, open_store
from test_report import copy_store, finished_store, wandb_history


@pytest.fixture
def store(tmp_path, tmp_path_factory) -> Path:
    return copy_store(finished_store(tmp_path_factory), tmp_path)


@pytest.fixture
def half_written(tmp_path):
    """A store whose run is still going: 5 snapshots, 2 vectors committed, never closed."""
    rng = np.random.default_rng(0)
    n_seq, S, K, D = 15, 5, 2, 6
    T = 4 * n_seq
    tokens = TokenIndex(np.repeat(np.arange(n_seq), 4), np.tile(np.arange(8, 12), n_seq),
                        rng.integers(0, 10, T), {"place": np.tile(np.arange(4), n_seq)})
    writer = StoreWriter(tmp_path / "running.zarr", tokens=tokens, parameters=[("w", (2, 3))], order="first",
                         config={}, max_basis=4, with_curvature=False)
    writer.write_basis(0, np.linalg.qr(rng.normal(size=(D, K)))[0].T, [2.0, 1.0], [0, 0])
    for s in range(S):
        writer.write_snapshot(s, 10 * s, 2.0 - 0.1 * s + rng.normal(0, 0.01, T), rng.normal(size=D))
        writer.write_directional_grad(s, 0, rng.normal(size=(K, T)))
        if s:
            drops = -np.abs(rng.normal(0.05, 0.02, (K, T)))
            writer.write_interval(s - 1, 0, [0.1, 0.1], drops, drops)
    writer.commit(S, K)
    writer.flush()
    yield tmp_path / "running.zarr"
    writer.close(complete=False)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_info_on_a_finished_store(store, capsys):
    code, out, err = run(capsys, "info", store)
    assert code == 0 and err == ""
    assert "complete:    yes" in out
    assert "snapshots:   7 (0..12, every 2)" in out
    assert "basis:       4 of max 4 vectors" in out and "joined at step (count): 0: 2, 4: 2" in out
    eig = open_store(store)["eigenvalue"].values
    assert "eigenvalues: " + " ".join(f"{e:.4g}" for e in eig) in out
    assert "tokens:      96 in 24 sequences" in out
    assert "carry: 0 (" in out and "place: 0 (24), 1 (24), 2 (24), 3 (24)" in out
    assert "order:       trapezoid" in out
    assert "analysis:" in out and " cluster " in out  # the callback analysed it after fit


def test_analyze_rewrites_results_and_writes_folder_and_offline_wandb(store, tmp_path, capsys):
    code, out, err = run(capsys, "analyze", store, "--min-samples", "3", "--min-cluster-size", "5",
                         "--methods", "polca", "loss", "--tau", "6", "--normalize", "token", "--quiet",
                         "--wandb-project", "polca-cli", "--wandb-dir", tmp_path / "wb", "--report", tmp_path / "rep")
    assert code == 0, err
    assert "analysis written into" in out and "W&B run (offline)" in out
    ds = open_analysed_store(store)
    attrs = ds["cluster"].attrs
    assert attrs["analysis_min_samples"] == 3 and attrs["analysis_min_cluster_size"] == 5
    assert float(ds["tau"]) == 6.0 and attrs["analysis_methods"] == ["polca", "loss"]
    assert attrs["analysis_normalize"] == "token" and "* normalize                token (was none)" in out
    assert "polca_first_cluster" not in ds  # the earlier analysis' other methods are gone
    assert (tmp_path / "rep" / "summary.csv").exists() and (tmp_path / "rep" / "coverage.png").exists()
    (run_dir,) = glob.glob(str(tmp_path / "wb" / "wandb" / "offline-run-*"))
    history = wandb_history(Path(run_dir))
    assert any(h.get("polca_report/tau") == 6.0 for h in history)
    images = list(Path(run_dir, "files", "media", "images").rglob("*.png"))
    assert any("projected_loss" in p.name for p in images)


def test_report_writes_the_default_folder(store, capsys):
    out_dir = store.with_name("polca.zarr.report")
    assert not out_dir.exists()  # the copy does not take the original's folder
    code, out, err = run(capsys, "report", store, "--quiet")
    assert code == 0, err
    assert f"report folder: {out_dir}" in out
    assert {"index.md", "summary.csv", "coverage.png"} <= {p.name for p in out_dir.iterdir()}


def test_report_analyses_a_store_without_results(half_written, tmp_path, capsys):
    code, out, err = run(capsys, "report", half_written, "--force", "--quiet", "--out", tmp_path / "rep")
    assert code == 0, err
    assert "holds no analysis" in out and "cluster" in open_store(half_written)
    assert (tmp_path / "rep" / "index.md").exists()


def test_missing_path_and_non_store_directory_fail_with_one_line(tmp_path, capsys):
    for command in ("info", "analyze", "report"):
        code, out, err = run(capsys, command, tmp_path / "nope")
        assert code == 2 and out == ""
        assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")
    for command in ("info", "analyze", "report"):
        code, out, err = run(capsys, command, tmp_path / "plain")
        assert code == 2 and err.count("\n") == 1 and "is not a POLCA store" in err


def test_half_written_store(half_written, tmp_path, capsys):
    code, out, err = run(capsys, "info", half_written)
    assert code == 0 and "complete:    NO" in out and "snapshots:   5 (0..40, every 10)" in out
    assert "analysis:    none" in out
    for command in ("analyze", "report"):
        code, out, err = run(capsys, command, half_written)
        assert code == 2 and err.count("\n") == 1 and "not complete" in err and "--force" in err
    assert "cluster" not in open_store(half_written)
    code, out, err = run(capsys, "analyze", half_written, "--force", "--no-write", "--quiet",
                         "--report", tmp_path / "rep")
    assert code == 0, err
    assert "cluster" not in open_store(half_written)  # --no-write left the store alone
    assert (tmp_path / "rep" / "summary.csv").exists()


def test_analysis_error_and_usage_error(store, capsys):
    code, out, err = run(capsys, "analyze", store, "--group-by", "nothing", "--quiet")
    assert code == 2 and err.startswith("polca analyze: error: analysis failed:") and err.count("\n") == 1
    for where in (["--report", "rep"], ["--wandb-project", "p"]):
        code, out, err = run(capsys, "analyze", store, "--no-report", *where)
        assert code == 2 and f"--no-report writes no report: leave out {where[0]}" in err and out == ""
    code, out, err = run(capsys, "frobnicate")
    assert code == 2 and "invalid choice" in err
    code, out, err = run(capsys, "--help")
    assert code == 0 and "analyze" in out


def synthetic_store_on_disk(path: Path) -> Path:
    """``make_synthetic_store`` written through ``StoreWriter``: vector 0 plants the carries of
    the 10s and 100s places (a drop at 55 % of training), the others do not."""
    from polca_lightning.analysis import make_synthetic_store

    syn = make_synthetic_store(n_sequences=60, n_intervals=30, n_basis=3, lca=False, seed=0)
    S, K = syn.sizes["snapshot"], syn.sizes["basis"]
    tokens = TokenIndex(syn["sequence"].values, syn["position"].values, syn["target"].values,
                        {"carry": syn["carry"].values, "place": syn["place"].values})
    writer = StoreWriter(path, tokens=tokens, parameters=[("w", (K,))], order="second", config={}, max_basis=K,
                         with_curvature=False)
    writer.write_basis(0, np.eye(K), syn["eigenvalue"].values, syn["basis_step"].values)
    for s in range(S):
        writer.write_snapshot(s, int(syn["step"][s]), syn["loss"].values[s], np.zeros(K))
        writer.write_directional_grad(s, 0, syn["directional_grad"].values[s])
        if s:
            writer.write_interval(s - 1, 0, syn["delta"].values[s - 1], syn["polca"].values[s - 1],
                                  syn["polca_first"].values[s - 1])
    writer.commit(S, K)
    writer.close(complete=True)
    return path


def test_signal_prints_each_vectors_auc_and_accuracy_and_writes_csv(tmp_path, capsys):
    import csv

    from polca_lightning.analysis import signal_check

    store = synthetic_store_on_disk(tmp_path / "synthetic.zarr")
    code, out, err = run(capsys, "signal", store, "--label", "carry", "--where", "place=1,2,3", "--where", "place=1,2",
                         "--csv", tmp_path / "signal.csv")
    assert code == 0, err
    expected = signal_check(open_store(store), "carry", where={"place": [1, 2]})
    assert int(expected["n_tokens"]) == 120  # two places of 60 sequences
    assert "signal check of label 'carry' where place in [1, 2]: method polca, 5-fold" in out
    assert f"120 tokens, {int(expected['n_positive'])} with label 1; 31 snapshots as 31 time points" in out
    lines = out.splitlines()
    header = [i for i, line in enumerate(lines) if line.split() == ["basis", "auc", "accuracy"]][0]
    rows = [line.split() for line in lines[header + 1 : header + 7]]
    names = [" ".join(r[:-2]) for r in rows]
    assert names == ["0", "1", "2", "all vectors", "exact loss", "majority"]
    for b in range(3):  # the printed numbers are signal_check's
        assert rows[b][1:] == [f"{float(expected['auc'][b]):.3f}", f"{float(expected['accuracy'][b]):.3f}"]
    assert float(rows[0][2]) >= 0.95 and float(rows[0][1]) < 0.05  # vector 0 carries the carries
    assert rows[5][1:] == ["-", f"{float(expected['majority']):.3f}"]
    assert "vector 0 carries the most information" in " ".join(out.split())
    with open(tmp_path / "signal.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0] == ["basis", "auc", "accuracy"] and [r[0] for r in table[1:]] == [
        "0", "1", "2", "all vectors", "exact loss", "majority"]
    assert float(table[1][2]) == pytest.approx(float(expected["accuracy"][0])) and table[4][1] == ""
    # polca_first and a label given as another coordinate
    code, out, _ = run(capsys, "signal", store, "--label", "carry", "--method", "polca_first", "--folds", "3")
    assert code == 0 and "method polca_first, 3-fold" in out and "where all tokens" in out
    # errors: one line, exit 2
    code, _, err = run(capsys, "signal", store, "--label", "place")
    assert code == 2 and "expected binary values 0/1" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "signal", store, "--label", "colour")
    assert code == 2 and "label: expected a token coordinate" in err
    code, _, err = run(capsys, "signal", store, "--label", "carry", "--where", "place")
    assert code == 2 and "expected COORD=V,V" in err
    code, _, err = run(capsys, "signal", tmp_path / "nothing.zarr", "--label", "carry")
    assert code == 2 and err.startswith("polca signal: error:")


def test_version_is_the_installed_package_version(capsys):
    import tomllib

    import polca_lightning

    assert main(["--version"]) == 0
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert capsys.readouterr().out.strip() == f"polca {polca_lightning.__version__}"
    assert polca_lightning.__version__ == pyproject["project"]["version"]
