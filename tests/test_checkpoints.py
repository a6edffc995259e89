"""from_checkpoints(): POLCA over saved weights. Over the checkpoints a Lightning run saved at its
snapshot steps, and over the Hugging Face folders of a tiny GPT-NeoX trained by the Trainer, it
gives the store the run's callback wrote; a killed run continues at the next checkpoint."""

import json

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from _stores import same_stores
from _tiny import AdditionModule, batches, tiny_lm
from polca_lightning import POLCACallback, from_checkpoints, open_store
from polca_lightning.checkpoints import list_checkpoints, load_weights, read_state_dict, step_of, store_snapshots

SETTINGS = dict(probe_data=batches(24, 12, seed=1, labels=True), hessian_data=batches(16, 16, seed=2),
                token_labels=lambda b: {"carry": b["carry"], "place": b["place"]}, snapshot_every=2,
                basis_every=4, k=1, max_basis=3, engine="forward", analyze=False, progress=False)


def train(root, store, callbacks=(), **settings):
    """8 steps of the tiny addition model, its callback snapshotting every 2 into ``store``."""
    callback = POLCACallback(root / store, **{**SETTINGS, **settings})
    L.Trainer(default_root_dir=root, max_steps=8, callbacks=[callback, *callbacks], accelerator="cpu", devices=1,
              logger=False, enable_progress_bar=False, enable_model_summary=False,
              ).fit(AdditionModule(), DataLoader(batches(80, 16, seed=0), batch_size=None))


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory):
    """A Lightning run of 8 steps whose callback snapshots every 2 steps, a checkpoint saved at
    each snapshot step (step 0 by hand: Lightning saves none before training)."""
    root = tmp_path_factory.mktemp("lightning")
    initial = {k: v.clone() for k, v in AdditionModule().state_dict().items()}  # the seeded initial weights
    train(root, "callback.zarr", [ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1)])
    torch.save(initial, root / "ckpt" / "step=0.pt")
    (root / "ckpt" / "last.ckpt").write_bytes((root / "ckpt" / "epoch=1-step=8.ckpt").read_bytes())  # no step: left out
    return root


def test_steps_are_read_from_names_and_a_folder_lists_its_checkpoints_in_step_order(lightning_run):
    assert [step_of(n) for n in ("epoch=1-step=120.ckpt", "out/checkpoint-40", "step1000", "model_7.pt",
                                 "weights.safetensors")] == [120, 40, 1000, 7, None]
    found = list_checkpoints(lightning_run / "ckpt")
    assert [p.name for p in found] == ["step=0.pt", "epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt",
                                       "epoch=1-step=6.ckpt", "epoch=1-step=8.ckpt"]


class Unpicklable:
    """A class of the test's own: ``torch.load(weights_only=True)`` refuses it."""


def test_every_format_gives_the_same_tensors(tmp_path):
    """A state dict saved alone, under "model" (hand-written loops), under "state_dict" with a
    LightningModule's prefix, as safetensors, and as a Hugging Face folder of two shards: each
    puts the same weights into another model."""
    from safetensors.torch import save_file

    source = tiny_lm(seed=0, d_model=8, dtype=torch.float32)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    torch.save(state, tmp_path / "alone.pt")
    torch.save({"model": state, "iter_num": 7}, tmp_path / "loop.pt")
    torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}, "global_step": 7}, tmp_path / "l.ckpt")
    save_file(state, tmp_path / "weights.safetensors")
    (tmp_path / "hf").mkdir()
    names = sorted(state)
    halves = {"model-1.safetensors": names[: len(names) // 2], "model-2.safetensors": names[len(names) // 2:]}
    for shard, keys in halves.items():
        save_file({k: state[k] for k in keys}, tmp_path / "hf" / shard)
    index = {"weight_map": {k: shard for shard, keys in halves.items() for k in keys}}
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(index))
    for name in ("alone.pt", "loop.pt", "l.ckpt", "weights.safetensors", "hf"):
        target = tiny_lm(seed=1, d_model=8, dtype=torch.float32)
        load_weights(target, read_state_dict(tmp_path / name), name)
        for (key, p), q in zip(target.named_parameters(), source.parameters()):
            assert torch.equal(p, q), (name, key)

    torch.save({"model": state, "extra": Unpicklable()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="holds objects besides tensors"):
        read_state_dict(tmp_path / "pickled.pt")
    torch.save({"iter_num": 7}, tmp_path / "empty.pt")
    with pytest.raises(ValueError, match="holds no state dict"):
        read_state_dict(tmp_path / "empty.pt")


def test_the_checkpoints_of_a_lightning_run_give_its_callbacks_store(lightning_run, tmp_path):
    # the inner network (its names lack the LightningModule's "net."), with other weights: each checkpoint's replace them
    ds = from_checkpoints(tiny_lm(seed=5, d_model=8, dtype=torch.float32), lightning_run / "ckpt",
                          tmp_path / "checkpoints.zarr", **SETTINGS)
    a, b = open_store(lightning_run / "callback.zarr").load(), ds.load()
    assert b.attrs["complete"] and b["step"].values.tolist() == [0, 2, 4, 6, 8]
    assert b["basis_step"].values.tolist() == [0, 4, 8]  # multiples of basis_every, as the callback's
    same_stores(a, b, rtol=1e-5, floor=1e-6)


def test_a_stores_weight_snapshots_read_along_another_basis_give_that_basis_run(lightning_run, tmp_path):
    """A store's weight snapshots are its run's checkpoints: along the same basis they give the
    same store; along a random basis, the store of the same training with a random-basis
    callback (POLCA does not change training: both runs keep the same weights)."""
    callback = lightning_run / "callback.zarr"
    assert [s.step for s in store_snapshots(callback)] == [0, 2, 4, 6, 8]
    again = from_checkpoints(tiny_lm(seed=5, d_model=8, dtype=torch.float32), callback, tmp_path / "again.zarr",
                             **SETTINGS)
    same_stores(open_store(callback).load(), again.load(), rtol=1e-5, floor=1e-6)

    train(tmp_path, "random.zarr", basis="random", k=3, basis_every=100)  # every vector at step 0
    trained = open_store(tmp_path / "random.zarr").load()
    np.testing.assert_array_equal(trained["weights"].values, open_store(callback)["weights"].values)
    read = from_checkpoints(AdditionModule(), callback, tmp_path / "read.zarr",
                            **{**SETTINGS, "basis": "random", "k": 3, "basis_every": 100}).load()
    assert read["basis_step"].values.tolist() == [0, 0, 0]
    same_stores(trained, read, rtol=1e-5, floor=1e-6)


def test_a_killed_run_continues_at_the_next_checkpoint(lightning_run, tmp_path, capsys):
    paths = list_checkpoints(lightning_run / "ckpt")

    def killed_at_step_6(path):  # a factory: the model at a checkpoint
        if step_of(path) == 6:
            raise KeyboardInterrupt
        net = tiny_lm(d_model=8, dtype=torch.float32)
        load_weights(net, read_state_dict(path))
        return net

    store = tmp_path / "run.zarr"
    with pytest.raises(KeyboardInterrupt):
        from_checkpoints(killed_at_step_6, paths, store, **SETTINGS)
    left = open_store(store)
    assert not left.attrs["complete"] and left["step"].values.tolist() == [0, 2, 4]
    with pytest.raises(ValueError, match="not the first of this series"):
        from_checkpoints(tiny_lm(d_model=8, dtype=torch.float32), paths[1:], store, mode="a", **SETTINGS)

    capsys.readouterr()
    ds = from_checkpoints(tiny_lm(seed=3, d_model=8, dtype=torch.float32), paths, store, mode="a",
                          steps=[0, 2, 4, 6, 8], **{**SETTINGS, "progress": True})
    assert "POLCA checkpoints" in capsys.readouterr().err  # the bar, from the 3 checkpoints the store kept
    same_stores(open_store(lightning_run / "callback.zarr").load(), ds.load(), rtol=1e-5, floor=1e-6)


def test_bad_series_are_refused_before_anything_is_written(lightning_run, tmp_path):
    paths = list_checkpoints(lightning_run / "ckpt")
    net = tiny_lm(d_model=8, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"checkpoints\[0\]: expected a name that says its step"):
        from_checkpoints(net, [lightning_run / "ckpt" / "last.ckpt"], tmp_path / "a.zarr", **SETTINGS)
    with pytest.raises(ValueError, match="steps: expected increasing steps"):
        from_checkpoints(net, paths[::-1], tmp_path / "a.zarr", **SETTINGS)
    with pytest.raises(ValueError, match=r"basis_at: expected steps of the checkpoints, got \[3\]"):
        from_checkpoints(net, paths, tmp_path / "a.zarr", basis_at=[3], **SETTINGS)
    with pytest.raises(ValueError, match="does not fit the model"):
        from_checkpoints(torch.nn.Linear(3, 4), paths, tmp_path / "a.zarr", **SETTINGS)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        from_checkpoints(net, [tmp_path / "step=4.pt"], tmp_path / "a.zarr", **SETTINGS)
    assert not (tmp_path / "a.zarr").exists()
