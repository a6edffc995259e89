"""track(): POLCA in a plain PyTorch loop. Its store equals the Lightning callback's on the same
run; a crash then a resume at a checkpoint's step equals an uninterrupted run; bad use is named."""

import shutil

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from _stores import same_stores
from _tiny import AdditionModule, batches, tiny_lm
from polca_lightning import POLCACallback, open_store, track
from polca_lightning.core.losses import causal_lm_token_loss

LR = 0.5
TRAIN = batches(80, 16, seed=0)  # 5 batches, taken in order, again and again
SETTINGS = dict(probe_data=batches(24, 12, seed=1, labels=True), hessian_data=batches(16, 16, seed=2),
                token_labels=lambda b: {"carry": b["carry"], "place": b["place"]}, snapshot_every=2,
                basis_every=4, k=1, max_basis=3, engine="forward", analyze=False, progress=False)


def loss_of(net, batch):
    loss, mask, _ = causal_lm_token_loss(net, batch)
    return loss[mask].mean()


def plain_loop(store, steps, *, net=None, optimizer=None, start=0, crash_at=None, checkpoints=(), **kw):
    """Train the tiny transformer with SGD on TRAIN from step ``start`` to ``steps`` inside
    ``track``; ``checkpoints``: ``{step: path}``, the model and optimizer saved after those
    optimizer steps; ``crash_at``: raise after that optimizer step, before its ``polca.step()``."""
    net = net if net is not None else tiny_lm(seed=0, d_model=8, dtype=torch.float32)
    optimizer = optimizer or torch.optim.SGD(net.parameters(), lr=LR)
    with track(net, store, **{**SETTINGS, **kw}) as polca:
        for step in range(start + 1, steps + 1):
            loss_of(net, TRAIN[(step - 1) % len(TRAIN)]).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step in checkpoints:
                torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, checkpoints[step])
            if step == crash_at:
                raise RuntimeError("simulated crash")
            polca.step()
    return polca


class SGDAddition(AdditionModule):
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=LR)


def test_the_plain_loop_store_equals_the_lightning_callbacks_on_the_same_run(tmp_path):
    loop = plain_loop(tmp_path / "loop.zarr", 8)
    callback = POLCACallback(tmp_path / "lightning.zarr", **SETTINGS)
    L.Trainer(default_root_dir=tmp_path, max_steps=8, callbacks=[callback], accelerator="cpu", devices=1,
              logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              ).fit(SGDAddition(), DataLoader(TRAIN, batch_size=None))  # the same initial weights (seed 0)
    a, b = open_store(callback.store).load(), open_store(loop.store).load()
    assert b.attrs["complete"] and b["step"].values.tolist() == [0, 2, 4, 6, 8]
    assert b["basis_step"].values.tolist() == [0, 4, 8] and loop.global_step == 8
    same_stores(a, b, rtol=1e-5, floor=1e-6)


def test_crash_then_resume_at_a_checkpoints_step_equals_an_uninterrupted_run(tmp_path):
    """A crash at step 12, after the optimizer step, before ``polca.step()``; checkpoints saved
    at 8 and 12. Resumed at 8, the store (up to 10) is cut back to 8; resumed at 12, it lacks
    the snapshot and the basis step due at 12, taken on entering the block."""
    # engine "auto": the resumed run reads the engine costs from the store
    settings = dict(engine="auto", max_basis=4, basis="random")
    reference = plain_loop(tmp_path / "reference.zarr", 14, **settings)

    paths = {8: tmp_path / "step8.pt", 12: tmp_path / "step12.pt"}
    with pytest.raises(RuntimeError, match="simulated crash"):
        plain_loop(tmp_path / "run.zarr", 14, crash_at=12, checkpoints=paths, **settings)
    left = open_store(tmp_path / "run.zarr")
    assert not left.attrs["complete"] and left["step"].values.tolist() == [0, 2, 4, 6, 8, 10]
    calibration = left.attrs["engine_calibration"]
    shutil.copytree(tmp_path / "run.zarr", tmp_path / "run_at_8.zarr")

    for resume, store in ((8, tmp_path / "run_at_8.zarr"), (12, tmp_path / "run.zarr")):
        saved = torch.load(paths[resume])
        net = tiny_lm(seed=5, d_model=8, dtype=torch.float32)  # other weights: the checkpoint's replace them
        net.load_state_dict(saved["model"])
        optimizer = torch.optim.SGD(net.parameters(), lr=LR)
        optimizer.load_state_dict(saved["optimizer"])
        resumed = plain_loop(store, 14, net=net, optimizer=optimizer, start=resume, mode="a", resume_step=resume,
                             **settings)
        # the resumed run makes the crashed run's engine choices: it reads their measured costs back
        assert calibration and resumed.tracker.dd.calibration == calibration
        a, b = open_store(reference.store).load(), open_store(resumed.store).load()
        assert b.attrs["complete"] and b["step"].values.tolist() == list(range(0, 15, 2))
        assert b["basis_step"].values.tolist() == [0, 4, 8, 12]
        # the reference measured its own engine costs, so it may compute some K another way
        same_stores(a, b, rtol=1e-5, floor=1e-6)


def _two_processes(rank, store, init_file):
    """One of two gloo processes: the plain loop on its half of each batch, the model in DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        model = DistributedDataParallel(tiny_lm(seed=0, d_model=8, dtype=torch.float32))
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        with track(model, store, **{**SETTINGS, **DISTRIBUTED}) as polca:  # the wrapper: track takes the module in it
            for step in range(8):
                loss_of(model, {k: v[rank::2] for k, v in TRAIN[step % len(TRAIN)].items()}).backward()
                optimizer.step()
                optimizer.zero_grad()
                polca.step()
    finally:
        dist.destroy_process_group()


DISTRIBUTED = dict(basis="random", max_basis=2)


def test_two_processes_write_the_single_process_store_from_rank_0(tmp_path):
    """Each process trains on half of every batch (equal token counts: DDP's mean of the two
    halves' means is the whole batch's), takes half the probe batches, and rank 0 writes."""
    import torch.multiprocessing as mp

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two processes has
    try:
        single = plain_loop(tmp_path / "single.zarr", 8, **DISTRIBUTED)
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_two_processes, args=(tmp_path / "two.zarr", tmp_path / "init"), nprocs=2)
    a, b = open_store(single.store).load(), open_store(tmp_path / "two.zarr").load()
    assert b.attrs["complete"] and b["step"].values.tolist() == [0, 2, 4, 6, 8] and b.sizes["basis"] == 2
    # rounding: DDP's gradient all-reduce adds in another order
    same_stores(a, b, rtol=1e-5, floor=1e-5)


def test_bad_use_is_named_and_a_store_with_snapshots_needs_the_resume_step(tmp_path):
    net, store = tiny_lm(d_model=8, dtype=torch.float32), tmp_path / "polca.zarr"
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got str"):
        track("net", store, **SETTINGS)
    with pytest.raises(ValueError, match="mode: expected 'a' to resume the store at step 4, got 'w-'"):
        track(net, store, resume_step=4, **SETTINGS)
    with pytest.raises(ValueError, match="resume step: expected a non-negative int, got -1"):
        track(net, store, mode="a", resume_step=-1, **SETTINGS)
    examples = [{k: v[i] for k, v in batch.items()} for batch in SETTINGS["probe_data"] for i in range(12)]
    polca = track(net, store, **{**SETTINGS, "probe_data": examples, "batch_size": 6})  # examples: collated
    assert [b["input_ids"].shape for b in polca.probe_batches] == [(6, 12)] * 4
    with pytest.raises(ValueError, match=r"probe_data\[0\]\['input_ids'\] has 1 dimension"):
        track(net, store, **{**SETTINGS, "probe_data": [examples[0]] + SETTINGS["probe_data"]})
    with pytest.raises(RuntimeError, match=r"step\(\) is called inside the `with track\(...\)` block"):
        polca.step()
    assert not store.exists()  # nothing is written before the block

    settings = {**SETTINGS, "basis": "random"}
    plain_loop(store, 2, **settings)
    with pytest.raises(RuntimeError, match=r"holds 2 snapshots .* pass resume_step= \(the step the loop resumes "
                                           r"from\) to track to continue it"):
        with track(net, store, mode="a", **settings):
            pass
    with pytest.raises(ValueError, match="step: expected an int of at least 2"):
        with track(net, store, mode="a", resume_step=2, **settings) as polca:
            polca.step(1)
    assert open_store(store)["step"].values.tolist() == [0, 2]  # the exception closed it with what it holds


def test_batches_reach_the_models_device_in_their_own_containers():
    from collections import UserDict, namedtuple

    from polca_lightning.loop import to_device

    Pair = namedtuple("Pair", "ids mask")
    batch = UserDict({"input_ids": torch.zeros(2, 3, dtype=torch.long),
                      "extra": [Pair(torch.ones(2), "kept"), (torch.ones(1, dtype=torch.float64),)]})
    moved = to_device(batch, torch.device("meta"))
    assert type(moved) is UserDict and type(moved["extra"]) is list and type(moved["extra"][0]) is Pair
    assert moved["input_ids"].device.type == "meta" and moved["input_ids"].dtype == torch.long
    assert moved["extra"][0].ids.device.type == "meta" and moved["extra"][0].mask == "kept"
    assert moved["extra"][1][0].device.type == "meta" and moved["extra"][1][0].dtype == torch.float64
    assert batch["input_ids"].device.type == "cpu"  # the input is left as it was
