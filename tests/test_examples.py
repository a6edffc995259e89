"""The examples end to end in their tiny modes, so none can rot."""

import glob
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from _wandb import media_files, wandb_history

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


def test_arithmetic_tiny_mode_logs_the_report_to_an_offline_wandb_run(tmp_path, capsys):
    import arithmetic

    from polca_lightning import open_store

    store = arithmetic.main(["--tiny", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    out = captured.out
    # the progress bar counts the run's 24 steps in one epoch (max_steps alone reads "Epoch 0/-2")
    bar = captured.out + captured.err
    assert "24/24" in bar and not re.search(r"Epoch \d+/-\d", bar)
    ds = open_store(store)
    assert ds.attrs["complete"] and ds.sizes["snapshot"] == 7 and ds.sizes["basis"] == 4
    assert set(ds["place"].values) == {0, 1, 2, 3} and set(ds["carry"].values) == {0, 1}
    assert "cluster" in ds and "carry_homogeneity" in ds  # the analysis was written back
    assert "best cluster of carry tokens" in out and "change in exact loss" in out
    assert "causal check: undo the final model's movement along POLCA vector" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["carry"]) == {"loss", "loss_change", "fisher", "lca", "polca_first", "polca"}
    best = results["carry"]["polca"]
    # against the per-cluster scores: the most homogeneous eligible carry=1 cluster of POLCA
    polca = (ds["entry_method"].values.astype(str) == "polca") & ds["carry_eligible"].values[:, 1].astype(bool)
    assert best["homogeneity"] == pytest.approx(np.nanmax(ds["carry_homogeneity"].values[polca, 1]))
    mine = ds["entry_method"].values.astype(str) == "polca"
    onset = ds["entry_onset"].values[mine]
    tau, tau_paper = results["tau"]["value"], results["tau"]["paper"]
    assert results["tau"]["rule"].startswith("plateau") and tau_paper == float(ds["step"][0]) + 0.1 * float(
        ds["step"][-1] - ds["step"][0])
    # both rules side by side, each the share of POLCA's clusters whose drawn onset is after its τ
    assert best["hidden_fraction"] == pytest.approx(np.mean(np.isfinite(onset) & (onset > tau)))
    assert best["hidden_fraction_paper"] == pytest.approx(np.mean(np.isfinite(onset) & (onset > tau_paper)))
    assert f"'plateau' (τ = {tau:g}" in out and f"'paper' (τ = {tau_paper:g}" in out
    assert results["ablation"]["vector"] == best["unit"]
    # every homogeneity beside its chance level: the carry rate of the cluster's mix of places
    entry = int(ds["carry_best"].sel(trajectory_type="polca", carry_value=1, rank=0))
    members = ds["cluster"].values[best["unit"]] == int(ds["entry_cluster"].values[entry])
    place, label = ds["place"].values, ds["carry"].values
    rate = {p: label[place == p].mean() for p in range(4)}
    assert best["chance"] == pytest.approx(np.mean([rate[p] for p in place[members]]))
    assert results["finding"]["found"] == any(results["finding"]["met"].values())
    assert results["finding"]["baseline"] == results["carry"]["loss"]["homogeneity"]
    mid = np.isin(place, (1, 2))
    signal = results["signal"]["polca"]
    assert signal["tokens"] == mid.sum() and len(signal["auc"]) == ds.sizes["basis"]
    assert signal["majority"] == pytest.approx(max(label[mid].mean(), 1 - label[mid].mean()))
    assert "signal check" in out and "chance" in out
    change = ds["ablation_loss_change"].values[best["unit"]]
    carry = (ds["carry"].values == 1) & np.isin(ds["place"].values, (1, 2))
    assert results["ablation"]["carry_tokens"] == pytest.approx(change[carry].mean(), rel=1e-5)
    assert results["ablation"]["clusters"][-1]["loss_change"] == pytest.approx(change.mean(), rel=1e-5)

    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    images = media_files(run_dir, "images")
    tables = media_files(run_dir, "table")
    assert any(i.startswith("polca_report/coverage_plot_") for i in images)
    assert any(i.startswith("polca_report/appendix_g_carry_") for i in images)
    kept = [int(b) for b in np.flatnonzero(ds["kept"].values)]
    for u in kept:
        for name in ("projected_loss", "exact_loss", "labels", "ablation"):
            assert any(i.startswith(f"polca_report/vector_{u:02d}/{name}_") for i in images), (u, name)
    for name in ("summary", "medoid_contexts", "appendix_g", "ablation", "ablation_summary"):
        assert any(t.startswith(f"polca_report/{name}_") for t in tables), name
    history = wandb_history(Path(run_dir))
    assert any("polca/eigenvalue" in h for h in history)  # scalars logged while training ran
    assert {k for h in history for k in h if k.startswith("polca/eigenvalue")} == {
        "polca/eigenvalue", "polca/eigenvalue_smallest_new"}  # one series, not one a vector (k = 2)
    assert any("train/loss" in h for h in history)
    # decoded contexts: the medoid table shows the problem with the digit bracketed
    (contexts,) = [p for p in Path(run_dir, "files", "media", "table").rglob("medoid_contexts_*.json")]
    data = json.loads(contexts.read_text())
    assert "text" in data["columns"]
    text = data["data"][0][data["columns"].index("text")]
    assert "+" in text and "=" in text and "[" in text

    # `polca analyze STORE` with no flags starts from the run's settings: the same appendix G table
    from polca_lightning.cli import main as polca
    from polca_lightning.report import appendix_g_table, open_analysed_store

    assert (tmp_path / "appendix_g_carry.png").exists() and "beside the paper's table 8" in out
    before = appendix_g_table(open_analysed_store(store))
    assert {row[before.columns.index("restriction")] for row in before.rows if row[0] == "carry"} \
        == {"place in [1, 2], over 85%"}
    assert polca(["analyze", str(store), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "the store's previous analysis" in printed and "restrict                 carry: place in [1, 2]" in printed
    assert not [line for line in printed.splitlines() if line.startswith("* ")]  # no setting changed
    after = appendix_g_table(open_analysed_store(store))
    assert after.columns == before.columns and after.rows == before.rows
    again = arithmetic.write_results(store)  # what the run printed, from the re-analysed store
    assert json.dumps(again["carry"], sort_keys=True) == json.dumps(results["carry"], sort_keys=True)


def test_arithmetic_seeds_table_is_mean_and_sample_spread():
    import arithmetic

    def result(h, ablation):
        carry = {t: {"homogeneity": h, "recall": 0.5, "f1": None, "hidden_fraction": 0.25,
                     "hidden_fraction_paper": h} for t in arithmetic.TYPE_NAMES}
        return {"seed": 0, "carry": carry, "ablation": {"carry_tokens": ablation, "other_tokens": 0.0},
                "tau": {"value": 300.0 + 10 * h, "rule": "plateau", "paper": 60.0}}

    table = arithmetic.seeds_table([result(0.2, 0.1), result(0.4, 0.3), result(0.6, 0.2)])
    polca = next(line for line in table.splitlines() if line.startswith("| POLCA |"))
    assert polca.split(" | ")[1:7] == ["0.400 ± 0.200", "-", "0.500 ± 0.000", "-", "0.250 ± 0.000", "0.400 ± 0.200"]
    assert "hidden fraction, plateau τ | hidden fraction, paper's τ" in table
    assert "plateau (where the mean loss flattens) 302, 304, 306; the paper's (10% of the run) 60, 60, 60." in table
    assert "0.973 / 0.736 / 0.838 / 0.355" in polca
    assert "+0.2000 (seeds: +0.1000, +0.3000, +0.2000)" in table



@pytest.mark.parametrize("symbols", [True, False])
def test_addition_data_digits_places_and_carries_are_the_schoolbook_sum(symbols):
    import torch

    from polca_lightning.toy import addition_data

    data = addition_data(50, seed=7, symbols=symbols)
    ids = data["input_ids"].tolist()
    first = 8 if symbols else 6
    assert data["input_ids"].shape == (50, first + 4) and data["input_ids"].max() < (12 if symbols else 10)
    for i, row in enumerate(ids):
        a = int("".join(map(str, row[0:3])))
        b = int("".join(map(str, row[4:7] if symbols else row[3:6])))
        assert int("".join(map(str, row[first:]))) == a + b
        if symbols:
            assert (row[3], row[7]) == (10, 11)
        carries, c = [], 0
        for da, db in zip(reversed(f"{a:03d}"), reversed(f"{b:03d}")):  # 1s column first
            carries.append(c)
            c = (int(da) + int(db) + c) >= 10
        carries.append(int(c))  # into the 1000s digit
        assert data["carry"][i, first:].tolist() == [int(x) for x in reversed(carries)]
        assert data["place"][i, first:].tolist() == [0, 1, 2, 3]
        assert data["labels"][i, first:].tolist() == row[first:] and set(data["labels"][i, :first].tolist()) == {-100}
    other = addition_data(50, seed=7, symbols=not symbols)
    assert torch.equal(other["carry"][:, -4:], data["carry"][:, -4:])  # the same problems either way
def test_huggingface_tiny_mode_runs_a_transformers_model_through_the_callback(tmp_path, capsys):
    pytest.importorskip("transformers")
    import huggingface

    from polca_lightning import open_store

    store = huggingface.main(["--tiny", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    ds = open_store(store)
    assert ds.attrs["complete"] and ds.sizes["snapshot"] == 7 and ds.sizes["basis"] == 4
    assert ds.sizes["token"] == 4 * 48 and set(ds["position"].values) == {8, 9, 10, 11}
    assert set(ds["place"].values) == {0, 1, 2, 3} and set(ds["carry"].values) == {0, 1}
    assert np.isfinite(ds["polca"].values).all() and np.isfinite(ds["directional_grad"].values).all()
    assert "cluster" in ds and "carry_homogeneity" in ds
    assert "GPT2LMHeadModel" in out and "engine 'auto'" in out and "best cluster of carry tokens" in out

    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    images = media_files(run_dir, "images")
    tables = media_files(run_dir, "table")
    assert any(i.startswith("polca_report/coverage_plot_") for i in images)
    assert any(i.startswith("polca_report/appendix_g_carry_") for i in images)
    for name in ("summary", "medoid_contexts", "appendix_g"):
        assert any(t.startswith(f"polca_report/{name}_") for t in tables), name
    history = wandb_history(Path(run_dir))
    assert any("polca/eigenvalue" in h for h in history) and any("train/loss" in h for h in history)


def test_hf_trainer_tiny_mode_reports_into_the_wandb_run_the_trainer_opened(tmp_path, capsys):
    pytest.importorskip("transformers", reason="the transformers extra is not installed")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate (the transformers extra)")
    import hf_trainer

    from polca_lightning import open_store

    store = hf_trainer.main(["--tiny", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    ds = open_store(store)
    assert ds.attrs["complete"] and ds.sizes["snapshot"] == 7 and ds.sizes["basis"] == 4
    assert ds["step"].values.tolist() == list(range(0, 25, 4))  # the Trainer's optimizer steps
    assert ds.sizes["token"] == 4 * 48 and set(ds["carry"].values) == {0, 1}
    assert "cluster" in ds and "carry_homogeneity" in ds  # the analysis was written back
    assert "trained by transformers.Trainer for 24 steps" in out and "best cluster of carry tokens" in out

    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    images, tables = media_files(run_dir, "images"), media_files(run_dir, "table")
    assert any(i.startswith("polca_report/coverage_plot_") for i in images)
    assert any(i.startswith("polca_report/appendix_g_carry_") for i in images)
    for name in ("summary", "medoid_contexts", "appendix_g"):
        assert any(t.startswith(f"polca_report/{name}_") for t in tables), name
    history = wandb_history(Path(run_dir))
    assert any("train/loss" in h for h in history)  # the Trainer's own
    eigen = [h for h in history if "polca/eigenvalue" in h]  # POLCA's, on the Trainer's step axis
    assert [h["train/global_step"] for h in eigen] == [0, 8]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_huggingface_token_loss_is_the_models_own_loss_at_each_sum_digit(arch):
    """Position p of the token loss is Hugging Face's own (internally shifted) loss of the digit at p,
    and both engines give the same directional derivatives of it."""
    pytest.importorskip("transformers")
    import torch

    import huggingface
    from polca_lightning.core._ghost import ghost_plan
    from polca_lightning.core.engine import DirectionalDerivatives
    from polca_lightning.core.functional import ParameterSpace
    from polca_lightning.core.losses import causal_lm_token_loss
    from polca_lightning.toy import addition_data

    torch.manual_seed(0)
    model = huggingface.HFAdditionModel(arch, d_model=16, n_layers=1, n_heads=2).eval()
    assert model.net.config._attn_implementation == "eager"
    data = addition_data(6, seed=3)
    batch = {"input_ids": data["input_ids"], "labels": data["labels"]}
    with torch.no_grad():
        loss, mask, target = causal_lm_token_loss(model, batch)
        assert mask.any(0).nonzero().squeeze(1).tolist() == [8, 9, 10, 11]
        for p in range(8, 12):
            assert torch.equal(target[:, p], data["input_ids"][:, p])  # the sum digit at p
            for i in range(len(data["input_ids"])):
                only = torch.full_like(data["labels"][i : i + 1], -100)
                only[0, p] = data["labels"][i, p]
                hf = model.net(input_ids=data["input_ids"][i : i + 1], labels=only).loss
                torch.testing.assert_close(loss[i, p], hf, rtol=1e-5, atol=1e-6)

    space = ParameterSpace.from_module(model)
    assert ghost_plan(model, space.names) is not None  # Conv1D, tied embeddings / RMSNorm: the activation path
    theta = space.flatten(model)
    directions = torch.linalg.qr(torch.randn(space.dim, 3, dtype=torch.float64)).Q.T.to(theta)
    forward, reverse = (DirectionalDerivatives(model, causal_lm_token_loss, space, engine=e)(theta, [batch], directions)
                        for e in ("forward", "reverse"))
    assert (forward.engine, reverse.engine) == ("forward", "reverse")
    torch.testing.assert_close(forward.loss, loss[mask])
    torch.testing.assert_close(forward.g, reverse.g, rtol=1e-4, atol=1e-5 * float(reverse.g.abs().max()))


def test_language_tiny_mode_reports_clusters_with_words_to_an_offline_wandb_run(tmp_path, capsys):
    import json
    import re

    import language

    from polca_lightning import open_store

    store = language.main(["--tiny", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    ds = open_store(store)
    assert ds.attrs["complete"] and ds.sizes["snapshot"] == 7 and ds.sizes["basis"] == 4
    assert "cluster" in ds and "kind_homogeneity" in ds  # the analysis was written back
    # probe tokens: the second half of each held-out sequence, no <unk> target
    position, target = ds["position"].values, ds["target"].values
    assert position.min() == 8 and position.max() == 15 and (target > 0).all()
    assert set(np.unique(ds["kind"].values)) <= {0, 1, 2} and 0 in ds["kind"].values
    assert "kept vectors:" in out and "nearest the medoid:" in out

    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    kept = [int(b) for b in np.flatnonzero(ds["kept"].values)]
    assert kept, "the tiny run should keep at least one vector"
    images = media_files(run_dir, "images")
    for u in kept:
        assert any(i.startswith(f"polca_report/vector_{u:02d}/targets_") for i in images), u
    tables, root = {}, Path(run_dir, "files", "media", "table")
    for p in root.rglob("*.table.json"):  # <key>_<wandb step>_<hash>.table.json
        tables[str(p.relative_to(root)).rsplit("_", 2)[0]] = json.loads(p.read_text())
    assert {"polca_report/medoid_contexts", "polca_report/cluster_targets"} <= set(tables)

    # the contexts are English: eight words before the target, the target in brackets
    contexts = tables["polca_report/medoid_contexts"]
    texts = [row[contexts["columns"].index("text")] for row in contexts["data"]]
    assert texts and all(re.search(r"\[[^\]]+\]$", t) for t in texts)
    words = {w for t in texts for w in re.findall(r"[a-z]+", t)}
    assert len(words & {"the", "a", "is", "of", "to", "in", "and", "an", "be", "are"}) >= 3, texts

    # the targets table names real words and agrees with the store
    targets = tables["polca_report/cluster_targets"]
    col = {name: i for i, name in enumerate(targets["columns"])}
    assert targets["data"] and {row[col["vector"]] for row in targets["data"]} <= set(kept)
    vocabulary = language.WordTokenizer(language.tokenize(language.load_text()), 10**6).words
    for row in targets["data"]:
        members = ds["cluster"].values[row[col["vector"]]] == row[col["cluster"]]
        assert (ds["target"].values[members] == row[col["target"]]).sum() == row[col["count"]]
        assert row[col["text"]] in vocabulary and row[col["text"]] != "<unk>"


#: make paper's flags at toy size: checkpoints every 8 of the tiny preset's 24 steps
RESUMABLE = ["--tiny", "--checkpoint-every", "8", "--no-wandb", "--no-ablate", "--no-bars", "--lca-directions", "0"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The folder of a tiny run with ``RESUMABLE``'s flags (Algorithm 1's basis), never interrupted."""
    import arithmetic

    out = tmp_path_factory.mktemp("uninterrupted")
    arithmetic.main(RESUMABLE + ["--out", str(out)])
    return out


def test_arithmetic_killed_and_started_again_ends_with_the_uninterrupted_store(tmp_path, uninterrupted):
    """``make paper``'s promise at toy size: a run killed (SIGKILL, mid-training) and started
    again with the same flags resumes from its last checkpoint and ends with the store of a run
    that was never interrupted, variable by variable."""
    import os
    import signal
    import subprocess
    import time

    import arithmetic

    from polca_lightning import open_store

    flags = RESUMABLE

    out = tmp_path / "killed"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(EXAMPLES / "arithmetic.py"), *flags, "--out", str(out)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not (out / "checkpoints" / "step=000016.ckpt").exists():  # two checkpoints, then the kill
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = open_store(out / "polca.zarr")
    assert not killed.attrs["complete"] and not (out / "results.json").exists()  # killed before the end
    assert killed.sizes["snapshot"] < 7  # of 0, 4, ..., 24

    results = arithmetic.main(flags + ["--out", str(out)])  # the same command again: it resumes
    summary = json.loads((out / "results.json").read_text())
    assert summary["resumed_at_step"] in (8, 16)  # the newer checkpoint, or the older if the kill tore it
    assert summary["timings"]["cpu"] > 0  # the checkpoint carried the killed process's CPU time
    a = open_store(uninterrupted / "polca.zarr").load()
    b = open_store(results).load()
    assert b.attrs["complete"] and a.sizes == b.sizes
    for name in a.variables:
        values = a[name].values
        if values.dtype.kind not in "fiub":
            assert (b[name].values == values).all(), name
            continue
        scale = float(np.nanmax(np.abs(values))) if values.size and np.isfinite(values).any() else 0.0
        np.testing.assert_allclose(b[name].values, values, rtol=1e-5, atol=1e-6 * scale + 1e-9, err_msg=name)
    # and a complete run is reused, not run again
    assert arithmetic.main(flags + ["--out", str(out)]) == results


def test_plain_loop_tiny_mode_reports_into_the_open_wandb_run(tmp_path, capsys):
    import plain_loop

    from polca_lightning import open_store

    store = plain_loop.main(["--tiny", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    ds = open_store(store)
    assert ds.attrs["complete"] and ds["step"].values.tolist() == list(range(0, 25, 4))
    assert ds["basis_step"].values.tolist() == [0, 0, 8, 8] and set(ds["carry"].values) == {0, 1}
    assert "cluster" in ds and "carry_homogeneity" in ds and "ablation_loss_change" in ds  # the work after training
    assert f"24 steps; store {store}: 7 snapshots, 4 vectors" in out

    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    images, tables = media_files(run_dir, "images"), media_files(run_dir, "table")
    assert any(i.startswith("polca_report/coverage_plot_") for i in images)
    assert any(t.startswith("polca_report/summary_") for t in tables)
    history = wandb_history(Path(run_dir))
    assert any("train/loss" in h for h in history)  # the loop's own
    eigen = [h for h in history if "polca/eigenvalue" in h]  # POLCA's, against the loop's step
    assert [h["global_step"] for h in eigen] == [0, 8]
    np.testing.assert_allclose([h["polca/eigenvalue"] for h in eigen], ds["eigenvalue"].values[::2], rtol=1e-6)


def test_paper_study_reads_the_random_basis_along_a_finished_runs_weights(tmp_path, uninterrupted):
    """``studies/paper_run.py``'s random-basis runs read the weight snapshots of the seed's
    Hessian run instead of training again: at toy size, the store and the results they give
    are those of training with the random basis (POLCA does not change training)."""
    import arithmetic

    sys.path.insert(0, str(EXAMPLES.parent / "studies"))
    import paper_run

    from polca_lightning import open_store

    from _stores import same_stores

    random = RESUMABLE + ["--basis", "random", "--k", "4", "--basis-every", "1000"]
    trained = arithmetic.main(random + ["--out", str(tmp_path / "trained")])
    read = paper_run.along_random_basis_of(uninterrupted, tmp_path / "read", random)
    a, b = open_store(trained).load(), open_store(read["store"]).load()
    assert b.attrs["complete"] and b["basis_step"].values.tolist() == [0, 0, 0, 0]
    same_stores(a, b, rtol=1e-5, floor=1e-6)
    expected = json.loads((tmp_path / "trained" / "results.json").read_text())
    assert read["carry"] == expected["carry"] and read["signal"] == expected["signal"]
    assert read["weights_from"] == str(uninterrupted / "polca.zarr") and set(read["timings"]) == {"fit", "cpu"}
    spent = json.loads((tmp_path / "read" / "time_spent.json").read_text())
    assert spent["processes"] == 1 and (read["timings"]["fit"], read["timings"]["cpu"]) == (spent["seconds"],
                                                                                           spent["cpu_seconds"])
    arithmetic.print_results(read)  # the study prints it
    assert paper_run.along_random_basis_of(uninterrupted, tmp_path / "read", random) == read  # reused

    # the study's tables over the two runs, laid out as `run` leaves them
    study = tmp_path / "study"
    study.mkdir()
    (study / "hessian_seed0").symlink_to(uninterrupted)
    (study / "random_seed0").symlink_to(tmp_path / "read")
    paper_run.main(["table", "--seeds", "0", "--out", str(study), "--figures", str(tmp_path / "figures")])
    table = (study / "table.md").read_text()
    seed = json.loads((uninterrupted / "results.json").read_text())["seed"]
    assert f"| hessian_seed0 | `make paper SEED={seed}` |" in table
    assert f"| random_seed0 | `python studies/paper_run.py run --seeds {seed} --bases random` (over hessian_seed0's" in table
    loss_rows = table.split("Mean exact loss per (place, carry) group:")[1].split("The vectors")[0]
    assert "hessian_seed0" in loss_rows and "random_seed0" not in loss_rows  # one row per training
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["paper_best_carry_cluster.png",
                                                                      "paper_loss_by_place_carry.png"]
