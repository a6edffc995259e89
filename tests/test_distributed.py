"""POLCACallback under DDP: two CPU processes (gloo) write the same store as one process.

The run is launched with Lightning's ``ddp_spawn`` (``ddp`` re-runs the script, which
pytest is not). Everything the spawned processes need is picklable and module-level.
Training is made identical on both sides, so that any difference left is the callback's
(a difference in the data or the loss would hide in the comparison): the data are sharded by hand (``use_distributed_sampler=False``;
rank ``r`` takes samples ``r, r+W, ...`` of each global batch of 16), the loss is a mean
over tokens (every addition sequence has 4 loss tokens, so DDP's average of the two
shard means is the single-process mean), and the optimiser is plain SGD.
"""

import time

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from polca_lightning import POLCACallback, open_store
from _tiny import AdditionModule, batches

TRAIN_BATCHES = batches(64, 16, seed=0)  # 4 global batches of 16 per epoch


class ShardedSGDAddition(AdditionModule):
    """Rank ``r`` of ``W`` trains on the samples ``r::W`` of every global batch, with SGD."""

    def train_dataloader(self):
        r, w = self.trainer.global_rank, self.trainer.world_size
        return DataLoader([{k: v[r::w] for k, v in b.items()} for b in TRAIN_BATCHES], batch_size=None)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def carry_and_place(batch):  # module-level: ddp_spawn pickles the callback, and a lambda cannot be pickled
    return {"carry": batch["carry"], "place": batch["place"]}


def _run(path, devices, strategy):
    callback = POLCACallback(
        store=path,
        probe_data=batches(24, 8, seed=1, labels=True),  # 3 batches: rank 0 takes two, rank 1 one
        hessian_data=batches(16, 8, seed=2),  # 2 batches: one per rank
        token_labels=carry_and_place,
        snapshot_every=2, basis_every=4, k=2, max_basis=4,
        analyze=False, progress=False,
    )
    trainer = L.Trainer(
        default_root_dir=path.parent, max_steps=8, callbacks=[callback], accelerator="cpu", devices=devices,
        strategy=strategy, use_distributed_sampler=False, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(ShardedSGDAddition(lr=0.5))
    return open_store(path).load()


# Tolerances: relative 1e-5, plus an absolute floor of 1e-5 times the variable's largest
# magnitude. Rounding differences between the runs (a different summation order in DDP's
# gradient all-reduce and in the sharded probe/HVP sums) are ~1e-7 relative to a variable's
# scale; an entry much smaller than its variable's scale (a near-zero POLCA value, a delta
# along a direction training barely moved) carries that absolute error, so a purely
# relative test would fail on rounding alone, while 1e-5 of the scale still catches any
# wrong token, interval, basis row or rank mix-up (those are O(scale) errors).
def _assert_same(single, ddp):
    assert ddp.attrs["complete"] and single.sizes == ddp.sizes
    assert ddp.sizes["snapshot"] == 5 and ddp.sizes["basis"] == 4
    diffs = {}
    for name in single.variables:
        a, b = single[name].values, ddp[name].values
        if not np.issubdtype(a.dtype, np.floating):
            np.testing.assert_array_equal(b, a, err_msg=name)
            continue
        assert not np.isnan(a).any() or name == "eigenvalue", name
        np.testing.assert_array_equal(np.isnan(b), np.isnan(a), err_msg=name)
        a64, b64 = a.astype(np.float64), b.astype(np.float64)
        ok = ~np.isnan(a64)
        scale = np.abs(a64[ok]).max() if ok.any() else 0.0
        err = np.abs(b64[ok] - a64[ok])
        diffs[name] = (err.max() if err.size else 0.0, scale)
        np.testing.assert_allclose(b64, a64, rtol=1e-5, atol=1e-5 * scale, err_msg=name)
    print("max |ddp - single| (scale):", {k: f"{d:.1e} ({s:.1e})" for k, (d, s) in diffs.items()})


def test_ddp_on_two_cpu_processes_writes_the_single_process_store(tmp_path):
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP process has (Lightning: cores // processes); also faster on busy cores
    try:
        single = _run(tmp_path / "single" / "polca.zarr", 1, "auto")
    finally:
        torch.set_num_threads(threads)
    ddp = _run(tmp_path / "ddp" / "polca.zarr", 2, "ddp_spawn")
    print(f"both runs: {time.perf_counter() - start:.1f}s")
    _assert_same(single, ddp)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDP strategy needs a GPU (it refuses accelerator='cpu')")
def test_a_real_fsdp_trainer_is_refused_at_setup(tmp_path):
    module = ShardedSGDAddition()
    before = [p.detach().clone() for p in module.parameters()]
    trainer = L.Trainer(
        default_root_dir=tmp_path, max_steps=2, strategy="fsdp", accelerator="cuda", devices=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    callback = POLCACallback(tmp_path / "polca.zarr", batches(8, 8, 1), batches(8, 8, 2), progress=False)
    trainer.callbacks.append(callback)
    with pytest.raises(RuntimeError, match="FSDPStrategy strategy shards parameters"):
        trainer.fit(module)
    assert not (tmp_path / "polca.zarr").exists()
    assert all(torch.equal(a, b.cpu()) for a, b in zip(before, module.parameters()))
