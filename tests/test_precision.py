"""compute_precision: validation, bf16 autocast on CPU against float32, scopes restored, the store's record."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from _tiny import AdditionModule, addition_batch, batches, tiny_lm
from polca_lightning import POLCACallback, open_store
from polca_lightning.core._precision import precision_scope
from polca_lightning.core.engine import DirectionalDerivatives
from polca_lightning.core.functional import ParameterSpace, evaluation_mode
from polca_lightning.core.losses import causal_lm_token_loss

MATMUL, CONV = torch.backends.cuda.matmul, torch.backends.cudnn.conv


def _setup():
    model = tiny_lm(d_model=16, dtype=torch.float32)
    space = ParameterSpace.from_module(model)
    gen = torch.Generator().manual_seed(0)
    V = torch.linalg.qr(torch.randn(space.dim, 4, generator=gen, dtype=torch.float64)).Q.T.float().contiguous()
    return model, space, space.flatten(model), V, [addition_batch(16, 0), addition_batch(8, 1)]


@pytest.mark.parametrize("bad", ["fp16", "bfloat16", None, 32])
def test_bad_precisions_are_named(bad, tmp_path):
    model, space, *_ = _setup()
    with pytest.raises(ValueError, match=r"compute_precision: expected one of \('float32', 'tf32', 'bf16'\)"):
        DirectionalDerivatives(model, causal_lm_token_loss, space, compute_precision=bad)
    with pytest.raises(ValueError, match="compute_precision: expected one of"):
        POLCACallback(store=tmp_path / "s.zarr", probe_data=batches(8, 4, 0), hessian_data=batches(8, 4, 1),
                      compute_precision=bad)


@pytest.mark.parametrize("engine", ["forward", "reverse"])
def test_bf16_on_cpu_is_within_its_rounding_of_float32_and_differs_from_it(engine):
    model, space, theta, V, batches_ = _setup()
    ref = DirectionalDerivatives(model, causal_lm_token_loss, space, engine=engine)(theta, batches_, V, curvature=True)
    got = DirectionalDerivatives(model, causal_lm_token_loss, space, engine=engine, compute_precision="bf16")(
        theta, batches_, V, curvature=True)
    assert got.engine == engine and got.g.dtype == got.c.dtype == torch.float32
    for name in ("g", "c"):
        a, b = getattr(got, name), getattr(ref, name)
        err = ((a - b).norm() / b.norm()).item()
        # measured 0.8-1.6e-2 (benchmarks/precision.py); float32 against float64 is ~1e-7
        assert 1e-3 < err < 5e-2, (name, err)
    assert torch.equal(got.loss, ref.loss)  # the loss itself is computed in float32


def test_tf32_without_cuda_is_float32():
    model, space, theta, V, batches_ = _setup()
    ref = DirectionalDerivatives(model, causal_lm_token_loss, space, engine="forward")(theta, batches_, V)
    got = DirectionalDerivatives(model, causal_lm_token_loss, space, engine="forward", compute_precision="tf32")(
        theta, batches_, V)
    assert torch.equal(got.g, ref.g) and torch.equal(got.loss, ref.loss)


def test_scopes_set_and_restore_the_flags_and_autocast():
    saved = (MATMUL.fp32_precision, CONV.fp32_precision)
    for precision, inside in (("tf32", "tf32"), ("float32", "ieee")):
        with precision_scope(precision, "cuda"):  # the flags exist without a GPU
            assert (MATMUL.fp32_precision, CONV.fp32_precision) == (inside, inside)
        assert (MATMUL.fp32_precision, CONV.fp32_precision) == saved
    with pytest.raises(RuntimeError, match="inside"):
        with precision_scope("tf32", "cuda"):
            raise RuntimeError("inside")
    assert (MATMUL.fp32_precision, CONV.fp32_precision) == saved
    with precision_scope("tf32", "cpu"):  # no CUDA work: nothing changes
        assert (MATMUL.fp32_precision, CONV.fp32_precision) == saved
    model = tiny_lm(dtype=torch.float32)
    with evaluation_mode(model):  # turns the training run's autocast off; the scope turns bf16 on inside it
        assert not torch.is_autocast_enabled("cpu")
        with precision_scope("bf16", "cpu"):
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
        assert not torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


def test_the_store_records_the_precision_and_a_resume_must_match(tmp_path):
    def callback(**kw):
        return POLCACallback(store=tmp_path / "p.zarr", probe_data=batches(24, 12, seed=1),
                             hessian_data=batches(32, 16, seed=2), snapshot_every=2, basis_every=2, k=1, max_basis=2,
                             analyze=False, progress=False, **kw)

    def fit(cb, **kw):
        L.Trainer(default_root_dir=tmp_path, max_steps=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1).fit(
            AdditionModule(), DataLoader(batches(32, 16, seed=0), batch_size=None), **kw)

    fit(callback(compute_precision="bf16"))
    ds = open_store(tmp_path / "p.zarr")
    assert ds.attrs["config"]["compute_precision"] == "bf16" and ds.sizes["basis"] == 2
    with pytest.raises(ValueError, match="compute_precision"):
        fit(callback(compute_precision="float32", mode="a"))
