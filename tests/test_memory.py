"""Chunked products with the basis (basis_on_device=False, memory_cap) against the in-memory float64 path."""

import sys

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from _tiny import AdditionModule, addition_batch, batches, tiny_lm
from polca_lightning import POLCACallback, open_store
from polca_lightning.core._streaming import RowStream
from polca_lightning.core.engine import DirectionalDerivatives
from polca_lightning.core.functional import FunctionalTokenLoss, ParameterSpace, evaluation_mode
from polca_lightning.core.hessian import hvp_of, orthonormalize_rows, projected_hessian_eigs
from polca_lightning.core.losses import causal_lm_token_loss

F64 = torch.float64


def orthonormal_rows(n, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, n, generator=g, dtype=F64)).Q.T.contiguous().to(dtype)  # [n, d]


def dense_orthonormalize(vectors, basis):
    """The in-memory reference: float64 copies, projection twice, Householder QR, signs kept."""
    v = vectors.double()
    if basis is not None:
        b = basis.double()
        for _ in range(2):
            v = v - (v @ b.T) @ b
    q, r = torch.linalg.qr(v.T)
    return (q * r.diagonal().sign()).T.to(vectors.dtype)


@pytest.fixture
def chunk_log(monkeypatch):
    """Every chunk RowStream moves to the compute device: its float64 size in bytes."""
    sizes = []
    load = RowStream.load

    def spy(self, block, cols):
        out = load(self, block, cols)
        sizes.append((out.numel() * 8, self.memory_cap))
        return out

    monkeypatch.setattr(RowStream, "load", spy)
    return sizes


def test_chunked_orthonormalisation_equals_dense_qr(chunk_log):
    d = 300
    basis = orthonormal_rows(4, d, seed=0)  # float32 rows: orthonormal to float32 accuracy only
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(3, d, generator=g) + 0.3 * basis[:3]  # a component along the basis to remove
    expected = dense_orthonormalize(raw, basis)
    got = orthonormalize_rows(raw.clone(), basis, memory_cap=500)
    assert len(chunk_log) > 50 and all(size <= cap for size, cap in chunk_log)  # many chunks, each under the cap
    assert (got - expected).abs().max() <= 1e-6
    assert (got.double() @ got.double().T - torch.eye(3, dtype=F64)).abs().max() < 1e-6
    assert (got.double() @ basis.double().T).abs().max() < 1e-6
    one_chunk = orthonormalize_rows(raw.clone(), basis)
    assert (got - one_chunk).abs().max() <= 1e-6
    # without a basis, and an ill-conditioned input (condition ~1e3) needs the second Cholesky QR
    skewed = raw.clone()
    skewed[1] = skewed[0] + 1e-3 * skewed[1]
    expected = dense_orthonormalize(skewed, None)
    assert (orthonormalize_rows(skewed.clone(), memory_cap=500) - expected).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="the new directions are linearly dependent"):
        orthonormalize_rows(torch.stack([basis[0], basis[1] + basis[0]]), basis[:2].clone(), memory_cap=500)


def test_streamed_lanczos_equals_in_memory_and_dense(chunk_log):
    torch.manual_seed(0)
    model = tiny_lm(d_model=8)  # float64 parameters: the dense Hessian is the independent reference
    space = ParameterSpace.from_module(model)
    fn = FunctionalTokenLoss(model, causal_lm_token_loss, space)
    batch = addition_batch(16)
    theta = space.flatten(model)

    def loss(t):
        value, mask, _ = fn(t, batch)
        return value[mask].mean()

    basis = orthonormal_rows(3, space.dim, seed=2)  # [3, d] float32
    hvp = hvp_of(lambda t: loss(t.double()), theta.float())
    kwargs = dict(tol=1e-4, dtype=torch.float32, krylov_dim=12)  # restarts too
    with evaluation_mode(model):
        ref = projected_hessian_eigs(hvp, space.dim, 4, basis, **kwargs)
        chunk_log.clear()
        got = projected_hessian_eigs(hvp, space.dim, 4, basis, storage_device="cpu", memory_cap=4096, **kwargs)
        H = torch.autograd.functional.hessian(loss, theta)
    assert len(chunk_log) > 1000 and all(size <= cap for size, cap in chunk_log)
    assert got.n_hvp == ref.n_hvp
    assert (got.eigenvalues - ref.eigenvalues).abs().max() <= 1e-6 * ref.eigenvalues.abs().max()
    assert (got.eigenvectors - ref.eigenvectors).abs().max() <= 1e-6
    # and both against the dense Hessian of the complement of the basis
    Q = torch.linalg.qr(basis.double().T, mode="complete").Q[:, basis.shape[0]:]  # [d, d-K]
    dense = torch.linalg.eigvalsh(Q.T @ H @ Q).flip(0)[:4]
    assert torch.allclose(got.eigenvalues.double(), dense, rtol=1e-3)


def test_streamed_directions_equal_directions_in_memory(monkeypatch):
    model = tiny_lm(d_model=8, dtype=torch.float32)
    space = ParameterSpace.from_module(model)
    theta, V = space.flatten(model), orthonormal_rows(5, space.dim, seed=3)
    batches_ = [addition_batch(6, 0), addition_batch(4, 1)]
    for engine, curvature in (("forward", True), ("reverse", False)):
        ref = DirectionalDerivatives(model, causal_lm_token_loss, space, engine=engine)(theta, batches_, V,
                                                                                     curvature=curvature)
        row_bytes = space.dim * 4
        dd = DirectionalDerivatives(model, causal_lm_token_loss, space, engine=engine, memory_cap=5 * row_bytes)
        # on a CPU-only machine both are on the CPU: take the path of a basis kept off the model's device
        monkeypatch.setattr(dd, "_on_other_device", lambda directions, theta: True)
        seen = []
        run = dd._run
        monkeypatch.setattr(dd, "_run", lambda e, t, b, v, c: seen.append((v.shape[0], dd._work_cap)) or run(e, t, b, v, c))
        got = dd(theta, batches_, V, curvature=curvature)
        assert [k for k, _ in seen] == [2, 2, 1]  # at most half the cap: two rows a chunk
        assert all(cap == 5 * row_bytes - 2 * row_bytes for _, cap in seen) and dd._work_cap == dd.memory_cap
        assert torch.equal(got.loss, ref.loss)
        assert (got.g - ref.g).abs().max() <= 1e-6 * ref.g.abs().max()
        if curvature:
            assert (got.c - ref.c).abs().max() <= 1e-6 * ref.c.abs().max()


def _fit(tmp_path, name, **kw):
    cb = POLCACallback(
        store=tmp_path / name, probe_data=batches(24, 12, seed=1), hessian_data=batches(32, 16, seed=2),
        snapshot_every=2, basis_every=4, k=2, max_basis=5, order="exact", engine="forward", analyze=False,
        progress=False, **kw,
    )
    L.Trainer(default_root_dir=tmp_path / name, max_steps=8, callbacks=[cb], logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1).fit(
        AdditionModule(), DataLoader(batches(80, 16, seed=0), batch_size=None))
    return cb, open_store(cb.store).load()


def test_a_run_with_the_basis_off_the_device_and_a_tight_memory_cap_equals_the_default(tmp_path, monkeypatch):
    _, ref = _fit(tmp_path, "default.zarr")
    # on a CPU-only machine the basis and the model share a device: take the path of a basis off it,
    # and record the rows the tracker's derivatives bring to the device, per call
    monkeypatch.setattr(DirectionalDerivatives, "_on_other_device", staticmethod(lambda directions, theta: True))
    calls, chunks = [], DirectionalDerivatives.direction_chunks

    def recorded(self, directions, theta):
        sizes = []
        if sys._getframe(1).f_code.co_name == "derivatives":  # the tracker's loop, not the engine's own
            calls.append((0 if directions is None else directions.shape[0], sizes))
        for chunk in chunks(self, directions, theta):
            sizes.append(0 if chunk is None else chunk.shape[0])
            yield chunk

    monkeypatch.setattr(DirectionalDerivatives, "direction_chunks", recorded)
    cb, got = _fit(tmp_path, "tight.zarr", basis_on_device=False, memory_cap=4096)
    assert cb.tracker.basis.device.type == "cpu" and cb.tracker.n_basis == 5
    assert len(cb.probe_batches) == 2 and max(k for k, _ in calls) == 4  # the snapshot at step 8, before its basis step
    for k, sizes in calls:  # every row once per call (the probe batches reuse it), one 4 kB row a chunk
        assert sum(sizes) == k and max(sizes) <= 1, (k, sizes)
    assert ref.sizes == got.sizes and got.sizes["basis"] == 5
    for name in ("basis_vectors", "eigenvalue", "delta", "directional_grad", "curvature", "polca", "polca_first"):
        a, b = ref[name].values, got[name].values
        assert not np.isnan(a).any(), name
        scale = float(np.abs(a).max())
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * scale, err_msg=name)
