"""POLCAConfig: checked once, round-tripped through the store, the resume check; the tracker's
setup (token index, engine check, writer opened last) and its NullWriter."""

import dataclasses

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from _tiny import AdditionModule, batches
from polca_lightning import POLCACallback, POLCAConfig, open_store
from polca_lightning.config import RUN_FACTS
from polca_lightning.core.functional import ParameterSpace
from polca_lightning.core.losses import causal_lm_token_loss
from polca_lightning.store import NullWriter, StoreError, StoreWriter
from polca_lightning.tracker import POLCATracker

TRAIN = DataLoader(batches(48, 16, seed=0), batch_size=None)


def fit(tmp_path, max_steps, callback, extra=(), ckpt_path=None, **kw):
    kw.setdefault("enable_checkpointing", False)
    L.Trainer(default_root_dir=tmp_path, max_steps=max_steps, callbacks=[callback, *extra], logger=False,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
              **kw).fit(AdditionModule(), TRAIN, ckpt_path=ckpt_path)


def callback(tmp_path, name="polca.zarr", **kw):
    settings = dict(snapshot_every=2, basis_every=4, k=2, max_basis=4, analyze=False, progress=False)
    return POLCACallback(tmp_path / name, batches(24, 12, seed=1), batches(32, 16, seed=2), **{**settings, **kw})


@pytest.mark.parametrize(
    "field, value, error, message",
    [
        ("snapshot_every", 0, ValueError, "snapshot_every: expected a positive int, got 0"),
        ("k", True, ValueError, "k: expected a positive int, got True"),
        ("max_basis", 2.0, ValueError, "max_basis: expected a positive int"),
        ("basis_every", 30, ValueError, r"basis_every: expected a multiple of snapshot_every \(25\)"),
        ("order", "third", ValueError, "order: expected one of"),
        ("basis", "pca", ValueError, "basis: expected 'hessian', 'random' or a callable"),
        ("parameters", "net.*", TypeError, "parameters: expected a list of names or patterns"),
        ("engine", "jit", ValueError, "engine: expected one of"),
        ("memory_cap", 0, ValueError, r"memory_cap: expected a positive int \(bytes\)"),
        ("basis_on_device", 1, TypeError, "basis_on_device: expected True or False"),
        ("compute_precision", "fp16", ValueError, "compute_precision: expected one of"),
        ("lanczos_tol", 1, ValueError, r"lanczos_tol: expected a float in \(0, 1\)"),
        ("lanczos_tol", 1.5, ValueError, r"lanczos_tol: expected a float in \(0, 1\)"),
        ("seed", "0", TypeError, "seed: expected an int"),
    ],
)
def test_every_bad_field_is_named(field, value, error, message):
    with pytest.raises(error, match=message):
        POLCAConfig(**{field: value})
    with pytest.raises(error, match=message):
        POLCAConfig().replace(**{field: value})  # checked on every copy too


def test_frozen_and_round_trips_through_a_dict():
    config = POLCAConfig(snapshot_every=5, basis_every=50, k=3, parameters=["net.*"], order="first",
                         engine="reverse", memory_cap=1 << 20, basis_on_device=False, seed=7)
    assert config.parameters == ("net.*",)  # a list comes in, a tuple is kept: the config hashes
    assert hash(config) == hash(POLCAConfig.from_dict(config.to_dict()))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.k = 4
    d = config.to_dict()
    assert d["parameters"] == ["net.*"] and set(d) == {f.name for f in dataclasses.fields(POLCAConfig)}
    assert POLCAConfig.from_dict(d) == config
    assert POLCAConfig.from_dict({}) == POLCAConfig()  # a field an older store lacks takes its default
    assert POLCAConfig.from_dict({**d, **{key: 1 for key in RUN_FACTS}}) == config  # the run's facts skipped
    with pytest.raises(ValueError, match=r"unknown keys \['lr'\]"):
        POLCAConfig.from_dict({**d, "lr": 0.1})


def test_a_callable_basis_is_stored_by_name_and_must_be_given_back():
    def my_directions(module, step, basis):
        return torch.ones(1, 3)

    config = POLCAConfig(basis=my_directions)
    assert config.to_dict()["basis"] == "my_directions" == config.basis_name
    with pytest.raises(ValueError, match="the callable 'my_directions'; pass it as basis="):
        POLCAConfig.from_dict(config.to_dict())
    assert POLCAConfig.from_dict(config.to_dict(), basis=my_directions) == config


def test_the_store_records_the_callbacks_config(tmp_path):
    cb = callback(tmp_path, order="first", seed=3)
    assert cb.config == POLCAConfig(snapshot_every=2, basis_every=4, k=2, max_basis=4, order="first", seed=3)
    fit(tmp_path, 4, cb)
    stored = open_store(cb.store).attrs["config"]
    assert {k: stored[k] for k in cb.config.to_dict()} == cb.config.to_dict()
    assert set(stored) - set(cb.config.to_dict()) == set(RUN_FACTS)
    assert POLCAConfig.from_dict(stored) == cb.config
    assert stored["n_probe_batches"] == 2 and stored["compute_dtype"] == "float32"
    again = POLCACallback(tmp_path / "again.zarr", batches(8, 8, seed=1), batches(8, 8, seed=2),
                          **vars(POLCAConfig.from_dict(stored)))  # the docs' way to rerun with a store's settings
    assert again.config == cb.config


def test_resume_may_change_how_the_numbers_are_computed_but_not_which(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    fit(tmp_path, 6, callback(tmp_path, engine="forward"), extra=[ckpt], enable_checkpointing=True)
    path = tmp_path / "ckpt" / "epoch=1-step=4.ckpt"
    with pytest.raises(StoreError, match=r"config\['k'\] differs \(store: 2, this run: 3\)"):
        fit(tmp_path, 6, callback(tmp_path, mode="a", k=3), ckpt_path=path)
    with pytest.raises(StoreError, match=r"config\['seed'\] differs"):
        fit(tmp_path, 6, callback(tmp_path, mode="a", seed=1), ckpt_path=path)
    resumed = callback(tmp_path, mode="a", engine="reverse", memory_cap=1 << 16, basis_on_device=False)
    fit(tmp_path, 8, resumed, ckpt_path=path)
    ds = open_store(resumed.store)
    assert ds.attrs["complete"] and ds["step"].values.tolist() == [0, 2, 4, 6, 8]
    assert ds.attrs["config"]["engine"] == "forward"  # the settings the store was created with


def test_a_store_from_before_a_field_existed_resumes(tmp_path):
    from polca_lightning.store import TokenIndex

    tokens = TokenIndex(np.zeros(3, dtype=np.int64), np.arange(3), np.full(3, -1), {})
    old = {k: v for k, v in POLCAConfig().to_dict().items() if k not in POLCAConfig.resumable_changes()}
    kw = dict(tokens=tokens, parameters=[("w", (2,))], order="first", max_basis=2, with_curvature=False,
              background=False)
    StoreWriter(tmp_path / "old.zarr", config=old, **kw).close()
    new = POLCAConfig(memory_cap=1 << 20).to_dict()
    with pytest.raises(StoreError, match=r"config\['basis_on_device'\] differs \(store: '<absent>'"):
        StoreWriter(tmp_path / "old.zarr", mode="a", config=new, **kw)  # compared unless told
    StoreWriter(tmp_path / "old.zarr", mode="a", config=new, resumable_changes=POLCAConfig.resumable_changes(),
                **kw).close()
    with pytest.raises(StoreError, match=r"config\['order'\] differs"):
        StoreWriter(tmp_path / "old.zarr", mode="a", config={**new, "order": "first"},
                    resumable_changes=POLCAConfig.resumable_changes(), **kw)


def _tracker(**kw):
    module = AdditionModule().net
    space = ParameterSpace.from_module(module)
    config = kw.pop("config", POLCAConfig(k=2, max_basis=2, order="first", engine="forward"))
    return POLCATracker(module, causal_lm_token_loss, space, batches(24, 12, seed=1), batches(16, 16, seed=2),
                        config, progress=False, **kw)


def test_the_tracker_checks_everything_before_it_opens_the_writer():
    opened = []
    with pytest.raises(ValueError, match="token_labels: expected 'carry'"):
        _tracker(token_labels=lambda b: {"carry": torch.zeros(3)}, open_writer=opened.append)
    assert not opened
    with pytest.raises(TypeError, match="config: expected a POLCAConfig, got dict"):
        _tracker(config={"k": 2})
    tracker = _tracker(token_labels=lambda b: {"carry": b["input_ids"] % 2}, open_writer=opened.append)
    assert opened == [tracker.tokens] and tracker.writer is None  # what open_writer returned
    assert len(tracker.tokens) == 24 * 4 and set(tracker.tokens.labels) == {"carry"}
    assert tracker.calibration is None  # engine="forward": nothing to measure
    assert tracker.timings["setup"] > 0


def test_a_tracker_without_a_writer_holds_a_null_writer_and_computes_what_a_writing_one_does(tmp_path):
    def run(tracker):
        tracker.snapshot(0)
        tracker.grow_basis(0)
        with torch.no_grad():
            for p in tracker.module.parameters():
                p.add_(1e-3)
        return tracker.snapshot(1)

    space = ParameterSpace.from_module(AdditionModule().net)  # the same parameters as _tracker's model
    config = POLCAConfig(k=2, max_basis=4, order="first", engine="forward")
    writing = _tracker(config=config, open_writer=lambda tokens: StoreWriter(
        tmp_path / "run.zarr", tokens=tokens, parameters=list(zip(space.names, space.shapes)), order="first",
        config={}, max_basis=4, with_curvature=False))
    plain = _tracker(config=config)
    assert isinstance(plain.writer, NullWriter) and not plain.writer.writes and plain.writer.committed == (0, 0)
    assert writing.writer.writes
    expected, metrics = run(writing), run(plain)
    assert metrics == expected and np.isfinite(metrics["polca/coverage"])
    assert torch.equal(plain.basis, writing.basis) and plain.eigenvalues == writing.eigenvalues
    writing.writer.close()
    assert open_store(tmp_path / "run.zarr").sizes["snapshot"] == 2
    with pytest.raises(RuntimeError, match="writes no store"):  # backfill reads earlier weights from the store
        plain.grow_basis(1)


def test_a_long_snapshot_shows_a_progress_bar(capsys, monkeypatch):
    tracker = _tracker()
    tracker.progress = True
    tracker.snapshot(0)
    assert "POLCA snapshot" not in capsys.readouterr().err  # quicker than bar_delay: no bar
    monkeypatch.setattr(POLCATracker, "bar_delay", 0.0)
    tracker.grow_basis(0)
    capsys.readouterr()
    tracker.snapshot(1)
    err = capsys.readouterr().err
    assert "POLCA snapshot 1 at step 1" in err and "0/2 [" in err  # two probe batches, the basis in one chunk

