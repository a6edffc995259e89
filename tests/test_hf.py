"""POLCATrainerCallback inside transformers.Trainer: a tiny GPT-2 on 3-digit addition.

The store is complete and holds the model's own per-token losses; it equals the store of
POLCACallback on a Lightning run of the same model, batches and optimizer; a crash and
resume equals an uninterrupted run; a two-process run (torchrun, gloo) equals one process;
the report reaches the Trainer's TensorBoard event file.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the transformers extra is not installed: pip install -e '.[transformers]'")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate: pip install -e '.[transformers]'")

from transformers import TrainerCallback  # noqa: E402

import _hf  # noqa: E402
from _stores import same_stores as _same  # noqa: E402
from polca_lightning import open_store  # noqa: E402

HERE = Path(__file__).resolve().parent


def test_store_is_complete_holds_the_models_own_losses_and_the_report_reaches_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # datasets of examples, collated with the Trainer's collator; two micro-batches a step
    cb = _hf.polca(tmp_path / "polca.zarr", probe_data=_hf.Examples(24, seed=1, labels=True), batch_size=12,
                   hessian_data=_hf.Examples(8, seed=2), k=1, max_basis=2, basis_every=6, analyze=True,
                   lca_directions=0, analysis_kwargs={"min_samples": 3})
    trainer = _hf.train(tmp_path / "out", 12, [cb], batch=8, gradient_accumulation_steps=2,
                        report_to="tensorboard")
    assert trainer.state.global_step == 12
    ds = open_store(cb.store)
    assert ds.attrs["complete"] and ds["step"].values.tolist() == [0, 2, 4, 6, 8, 10, 12]  # optimizer steps
    assert ds["basis_step"].values.tolist() == [0, 6] and ds.sizes["token"] == 24 * 4
    assert [len(b["input_ids"]) for b in cb.probe_batches] == [12, 12]
    for name in ("loss", "directional_grad", "polca", "delta"):
        assert np.isfinite(ds[name].values).all(), name
    assert "cluster" in ds  # the analysis was written back

    # the last snapshot's per-token losses are the trained model's own (Hugging Face shifts the labels)
    probe = _hf.Examples(24, seed=1, labels=True).rows
    np.testing.assert_allclose(ds["loss"].values[-1], _hf.own_losses(trainer.model, probe), rtol=1e-5, atol=1e-6)
    assert (ds["carry"].values == np.concatenate([r["carry"][r["labels"] != -100] for r in probe])).all()

    # the report is in the Trainer's TensorBoard log dir, beside the Trainer's own scalars
    (log_dir,) = {p.parent for p in (tmp_path / "out" / "runs").glob("*/events.out.tfevents.*")}
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    images, texts, scalars = (set(acc.Tags()[k]) for k in ("images", "tensors", "scalars"))
    assert "train/loss" in scalars  # the Trainer's
    assert {"polca/eigenvalue", "polca/coverage", "polca_report/kept_vectors", "polca_report/coverage/ratio"} <= scalars
    assert "polca_report/coverage_plot" in images
    assert {"polca_report/summary/text_summary", "polca_report/overview/text_summary"} <= texts
    assert [e.step for e in acc.Scalars("polca/eigenvalue")] == [0, 6]
    np.testing.assert_allclose([e.value for e in acc.Scalars("polca/eigenvalue")], ds["eigenvalue"].values, rtol=1e-6)
    (kept,) = acc.Scalars("polca_report/kept_vectors")
    assert kept.step == 12 and kept.value == int(ds["kept"].values.sum())
    assert (log_dir / "polca_report" / "summary.csv").exists()
    assert not Path(str(cb.store) + ".report").exists()  # TensorBoard got it, not a folder


def test_the_same_numbers_as_the_lightning_callback_on_the_same_run(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader
    from transformers import default_data_collator

    from polca_lightning import POLCACallback

    settings = dict(probe_data=_hf.batches(24, 12, seed=1, labels=True), hessian_data=_hf.batches(8, 8, seed=2),
                    token_labels=_hf.carry_and_place, snapshot_every=2, basis_every=4, k=1, max_basis=2,
                    engine="forward", analyze=False, progress=False)
    hf = _hf.polca(tmp_path / "hf.zarr", **settings)
    _hf.train(tmp_path / "out", 8, [hf])

    class GPT2Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _hf.tiny_gpt2(0)  # the same initial weights

        def forward(self, input_ids, attention_mask=None):
            return self.net(input_ids=input_ids, attention_mask=attention_mask)

        def training_step(self, batch, _):
            return self.net(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=_hf.LR)

    lightning = POLCACallback(tmp_path / "lightning.zarr", **settings)
    loader = DataLoader(_hf.Examples(_hf.TRAIN, seed=0), batch_size=16, collate_fn=default_data_collator)
    L.Trainer(default_root_dir=tmp_path, max_steps=8, callbacks=[lightning], accelerator="cpu", devices=1,
              logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(GPT2Module(), loader)

    a, b = open_store(lightning.store).load(), open_store(hf.store).load()
    assert a["step"].values.tolist() == b["step"].values.tolist() == [0, 2, 4, 6, 8]
    assert a.sizes["basis"] == 2
    np.testing.assert_allclose(b["loss"].values, a["loss"].values, rtol=1e-4)
    np.testing.assert_allclose(b["eigenvalue"].values, a["eigenvalue"].values, rtol=1e-4)
    _same(a, b)


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 13:
            raise RuntimeError("simulated crash")


def test_crash_then_resume_from_checkpoint_equals_an_uninterrupted_run(tmp_path):
    settings = dict(basis="random", snapshot_every=2, basis_every=4, k=1, max_basis=3, engine="auto")
    ref = _hf.polca(tmp_path / "ref.zarr", **settings)
    _hf.train(tmp_path / "ref", 14, [ref])

    crashed = _hf.polca(tmp_path / "run.zarr", **settings)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _hf.train(tmp_path / "run", 14, [crashed, Crash()], save_strategy="steps", save_steps=5)
    crashed.close()
    left = open_store(crashed.store)
    assert not left.attrs["complete"] and left.sizes["snapshot"] == 7  # up to step 12
    checkpoint = tmp_path / "run" / "checkpoint-10"
    saved = json.loads((checkpoint / "trainer_state.json").read_text())["stateful_callbacks"]["POLCATrainerCallback"]
    calibration = saved["attributes"].pop("engine_calibration")
    assert saved["attributes"] == {"store": str(crashed.store), "last_step": 10, "n_snapshots": 6, "n_basis": 3}
    assert calibration == crashed.tracker.calibration and calibration

    resumed = _hf.polca(tmp_path / "run.zarr", mode="a", **settings)
    _hf.train(tmp_path / "run", 14, [resumed], seed=5, resume=str(checkpoint))  # weights from the checkpoint
    # the resumed run makes the crashed run's engine choices: its measured costs come from the checkpoint
    assert resumed.tracker.dd.calibration == calibration
    a, b = open_store(ref.store).load(), open_store(resumed.store).load()
    assert b.attrs["complete"] and b["step"].values.tolist() == list(range(0, 15, 2))
    # the engine choice is made from timings, so the reference may compute some K another way
    _same(a, b, rtol=1e-5, floor=1e-6)


def test_resume_is_refused_where_the_store_does_not_fit(tmp_path):
    settings = dict(basis="random", snapshot_every=2, basis_every=4, k=1, max_basis=2)
    _hf.train(tmp_path / "out", 4, [_hf.polca(tmp_path / "polca.zarr", **settings)])
    with pytest.raises(RuntimeError, match="resume_from_checkpoint= to Trainer.train"):
        _hf.train(tmp_path / "out", 4, [_hf.polca(tmp_path / "polca.zarr", mode="a", **settings)])
    with pytest.raises(ValueError, match="restore_callback_states_from_checkpoint"):
        _hf.train(tmp_path / "out", 4, [_hf.polca(tmp_path / "x.zarr", **settings)],
                  restore_callback_states_from_checkpoint=True)


def test_two_processes_under_torchrun_write_the_single_process_store(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes has
    try:
        single = _hf.polca(tmp_path / "single.zarr", k=1, max_basis=2, hessian_data=_hf.batches(16, 8, seed=2))
        _hf.train(tmp_path / "single", 8, [single])
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(HERE / "_hf_torchrun.py"), str(tmp_path / "ddp")],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    a, b = open_store(single.store).load(), open_store(tmp_path / "ddp" / "polca.zarr").load()
    assert b.attrs["complete"] and b["step"].values.tolist() == [0, 2, 4, 6, 8] and b.sizes["basis"] == 2
    # rounding: DDP's gradient all-reduce and the sharded probe and HVP sums add in another order
    _same(a, b, rtol=1e-5, floor=1e-5)


def test_a_list_of_example_dicts_is_collated_with_the_trainers_collator_in_a_tiny_llama(tmp_path):
    """The examples as Trainer(train_dataset=...) takes them: a list of dicts of 1-D tensors."""
    probe, hessian = _hf.Examples(12, seed=1, labels=True).rows, _hf.Examples(8, seed=2).rows
    cb = _hf.polca(tmp_path / "polca.zarr", probe_data=probe, hessian_data=hessian, k=1, max_basis=1)
    assert cb.probe_batches is None  # collated when training begins, by the Trainer's collator
    trainer = _hf.train(tmp_path / "out", 4, [cb], model=_hf.tiny_llama(0))
    assert [len(b["input_ids"]) for b in cb.probe_batches] == [8, 4]  # per_device_eval_batch_size at a time
    ds = open_store(cb.store)
    assert ds.attrs["complete"] and ds["step"].values.tolist() == [0, 2, 4]
    np.testing.assert_allclose(ds["loss"].values[-1], _hf.own_losses(trainer.model, probe), rtol=1e-5, atol=1e-6)
    assert (ds["carry"].values == np.concatenate([r["carry"][r["labels"] != -100] for r in probe])).all()


def test_data_that_are_not_batches_are_refused_before_training_naming_the_argument(tmp_path):
    rows = _hf.Examples(8, seed=1).rows
    with pytest.raises(ValueError, match=r"^probe_data\[0\]\['input_ids'\] has 1 dimension; a batch is "
                                         r"\[batch, positions\].*the examples as a list"):
        _hf.polca(tmp_path / "a.zarr", probe_data=iter(rows))  # a generator yields examples, not batches
    ragged = rows[:4] + [{k: v[:-1] for k, v in row.items()} for row in rows[4:]]
    cb = _hf.polca(tmp_path / "b.zarr", probe_data=ragged, batch_size=8)
    model = _hf.tiny_gpt2(0)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"probe_data\[4\]\['input_ids'\] has shape \[11\] but probe_data\[0\]"
                                         r"\['input_ids'\] \[12\]: .* pad them"):
        _hf.train(tmp_path / "out", 2, [cb], model=model)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # refused before training
    assert not (tmp_path / "b.zarr").exists()
