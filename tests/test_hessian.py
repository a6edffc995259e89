"""Known-answer tests for polca_lightning.core.hessian against dense, independent computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from polca_lightning.core.hessian import EigenResult, hvp_of, projected_hessian_eigs

F64 = torch.float64


# ---------------------------------------------------------------- fixtures and helpers
class TinyMLP:
    """A 4 -> 6 -> 3 tanh MLP with cross-entropy; 51 params, non-square weights."""

    shapes = [(6, 4), (6,), (3, 6), (3,)]

    def __init__(self, seed: int = 0, scale: float = 1.5):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(32, 4, generator=g, dtype=F64)  # [n, in]
        self.y = torch.randint(0, 3, (32,), generator=g)  # [n]
        self.sizes = [torch.Size(s).numel() for s in self.shapes]
        self.dim = sum(self.sizes)
        self.theta = scale * torch.randn(self.dim, generator=g, dtype=F64)  # [d]

    def loss(self, theta: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = (p.view(s) for p, s in zip(theta.split(self.sizes), self.shapes))
        x = self.x.to(theta.dtype)  # [n, in]
        logits = torch.tanh(x @ w1.T + b1) @ w2.T + b2  # [n, out]
        return F.cross_entropy(logits, self.y)


def orthonormal_rows(n_rows: int, dim: int, seed: int, dtype=F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, n_rows, generator=g, dtype=F64))  # [d, K]
    return q.T.contiguous().to(dtype)  # [K, d]


def dense_projected_eigh(H: torch.Tensor, B: torch.Tensor | None):
    """Eigenpairs of H restricted to the complement of B, descending, as [n] and [n, d]."""
    d = H.shape[0]
    if B is None:
        Q = torch.eye(d, dtype=H.dtype)
    else:  # orthonormal basis of the complement: last d-K columns of a full QR of Bᵀ
        Q_full, _ = torch.linalg.qr(B.T, mode="complete")  # [d, d]
        Q = Q_full[:, B.shape[0]:]  # [d, d-K]
    evals, evecs = torch.linalg.eigh(Q.T @ H @ Q)  # ascending
    return evals.flip(0), (Q @ evecs).T.flip(0)  # [d-K], [d-K, d]


def explicit_residuals(H, B, res: EigenResult) -> torch.Tensor:
    P = torch.eye(H.shape[0], dtype=H.dtype) - (0 if B is None else B.T @ B)
    X = res.eigenvectors.to(H.dtype)  # [k, d]
    return (X @ (P @ H @ P) - res.eigenvalues.to(H.dtype)[:, None] * X).norm(dim=1)  # [k]


class Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, v):
        self.calls += 1
        return self.fn(v)


@pytest.fixture(scope="module")
def mlp():
    m = TinyMLP()
    m.H = torch.autograd.functional.hessian(m.loss, m.theta)  # [d, d], independent reference
    return m


# ---------------------------------------------------------------- hvp_of
@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_hvp_of_matches_dense_hessian_and_finite_differences(mlp, method):
    hvp = hvp_of(mlp.loss, mlp.theta, method=method)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = torch.randn(mlp.dim, generator=g, dtype=F64)
        hv = hvp(v)
        torch.testing.assert_close(hv, mlp.H @ v, rtol=1e-10, atol=1e-12)
        # central finite differences of the gradient, float64
        eps = 1e-5
        grad = lambda t: torch.func.grad(mlp.loss)(t)
        fd = (grad(mlp.theta + eps * v) - grad(mlp.theta - eps * v)) / (2 * eps)
        torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-8)


def test_hvp_of_methods_agree_under_no_grad_and_keep_dtype(mlp):
    v = torch.randn(mlp.dim, dtype=torch.float32)
    with torch.no_grad():
        a = hvp_of(mlp.loss, mlp.theta, "double_backward")(v)
        b = hvp_of(mlp.loss, mlp.theta, "forward_over_reverse")(v)
    assert a.dtype == torch.float32 and b.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, (mlp.H @ v.double()).float(), rtol=1e-5, atol=1e-6)


def test_hvp_of_linear_loss_gives_zero():
    c = torch.arange(5.0, dtype=F64)
    hvp = hvp_of(lambda t: (c * t).sum(), torch.ones(5, dtype=F64))
    assert torch.equal(hvp(torch.ones(5, dtype=F64)), torch.zeros(5, dtype=F64))


def test_hvp_of_bad_inputs(mlp):
    with pytest.raises(ValueError, match="`method` must be one of"):
        hvp_of(mlp.loss, mlp.theta, method="gauss_newton")
    with pytest.raises(ValueError, match=r"`theta` must be a flat vector \[d\], got shape \(3, 17\)"):
        hvp_of(mlp.loss, mlp.theta.view(3, 17))
    with pytest.raises(TypeError, match="`theta` must be a floating-point Tensor"):
        hvp_of(mlp.loss, torch.arange(51))
    with pytest.raises(ValueError, match=r"`v` must have shape \(51,\), got \(50,\)"):
        hvp_of(mlp.loss, mlp.theta)(torch.ones(50, dtype=F64))
    with pytest.raises(ValueError, match="`loss_fn` must return a scalar Tensor, got \\(51,\\)"):
        hvp_of(lambda t: t**3, mlp.theta)(torch.ones(51, dtype=F64))


# ---------------------------------------------------------------- eigensolver on the MLP
@pytest.mark.parametrize("n_basis", [0, 4])
@pytest.mark.parametrize("method", ["double_backward", "forward_over_reverse"])
def test_mlp_top_eigs_match_dense(mlp, n_basis, method):
    k = 5
    B = orthonormal_rows(n_basis, mlp.dim, seed=2) if n_basis else None
    ref_vals, ref_vecs = dense_projected_eigh(mlp.H, B)
    # the test is only meaningful if the spectrum is indefinite, the most negative
    # eigenvalue beats the top ones in magnitude, and the top k+1 are separated
    assert ref_vals[-1] < 0 and -ref_vals[-1] > ref_vals[0]
    assert (ref_vals[:k] - ref_vals[1 : k + 1]).min() > 1e-3

    counter = Counter(hvp_of(mlp.loss, mlp.theta, method))
    res = projected_hessian_eigs(counter, mlp.dim, k, B, tol=1e-9, dtype=F64)
    assert res.n_hvp == counter.calls
    assert res.eigenvalues.shape == (k,) and res.eigenvectors.shape == (k, mlp.dim)
    torch.testing.assert_close(res.eigenvalues, ref_vals[:k], rtol=1e-4, atol=0)
    assert (res.eigenvalues > 0).all()  # largest algebraic, not largest magnitude
    cos = (res.eigenvectors * ref_vecs[:k]).sum(1).abs()
    assert (cos >= 0.999).all(), cos
    gram = res.eigenvectors @ res.eigenvectors.T
    torch.testing.assert_close(gram, torch.eye(k, dtype=F64), atol=1e-10, rtol=0)
    if B is not None:
        assert (res.eigenvectors @ B.T).abs().max() < 1e-12  # spec: 1e-5; float64 does far better
    torch.testing.assert_close(res.residuals, explicit_residuals(mlp.H, B, res), atol=1e-10, rtol=0)


def test_mlp_float32_orthogonal_to_basis_and_converged_to_tol(mlp):
    k, B = 5, orthonormal_rows(6, mlp.dim, seed=3, dtype=torch.float32)
    hvp = hvp_of(mlp.loss, mlp.theta.float())
    res = projected_hessian_eigs(hvp, mlp.dim, k, B, tol=1e-3)
    assert res.eigenvectors.dtype == torch.float32
    assert (res.eigenvectors @ B.T).abs().max() < 1e-6
    true_res = explicit_residuals(mlp.H, B.double(), res)
    assert (true_res <= 1.1e-3 * res.eigenvalues.abs().max() + 1e-5).all()
    ref_vals, _ = dense_projected_eigh(mlp.H, B.double())
    torch.testing.assert_close(res.eigenvalues.double(), ref_vals[:k], rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- synthetic operators
def test_diagonal_operator_with_dominant_negative_eigenvalue():
    diag = torch.tensor([-100.0, 7.0, -3.0, 5.0, 0.5, 6.0, 2.0, -50.0] + [0.1] * 32, dtype=F64)
    res = projected_hessian_eigs(lambda v: diag * v, diag.numel(), 4, tol=1e-10, dtype=F64)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([7.0, 6.0, 5.0, 2.0], dtype=F64))
    idx = res.eigenvectors.abs().argmax(1)
    assert idx.tolist() == [1, 5, 3, 6]
    assert (res.eigenvectors.abs().max(1).values > 1 - 1e-10).all()


@pytest.mark.parametrize("n_basis", [0, 3])
@pytest.mark.parametrize("noise", [0.0, 1e-10, 1e-7])
def test_rank_deficient_operator_returns_null_directions(n_basis, noise):
    d, k = 40, 7
    U = orthonormal_rows(4, d, seed=5)  # [4, d]
    lam = torch.tensor([5.0, 2.0, -7.0, -9.0], dtype=F64)
    H = U.T @ torch.diag(lam) @ U  # rank 4, eigenvalues 5, 2, 0 (x36), -7, -9
    E = torch.randn(d, d, generator=torch.Generator().manual_seed(8), dtype=F64)
    H = H + noise * (E + E.T)  # noise > 0: near (not exact) breakdown, no restart flagged
    B = orthonormal_rows(n_basis, d, seed=6) if n_basis else None
    counter = Counter(lambda v: H @ v)
    res = projected_hessian_eigs(counter, d, k, B, tol=1e-6, dtype=F64)
    ref_vals, _ = dense_projected_eigh(H, B)
    # the noise eigenvalues (|.| <~ 2.5e-6 at noise=1e-7) are only resolved to the tolerance
    torch.testing.assert_close(res.eigenvalues, ref_vals[:k], atol=1e-8 + 50 * noise, rtol=0)
    assert res.eigenvalues.min() > -1e-5  # -7 and -9 are never in the top 7
    X = res.eigenvectors
    torch.testing.assert_close(X @ X.T, torch.eye(k, dtype=F64), atol=1e-10, rtol=0)
    assert explicit_residuals(H, B, res).max() < 1e-5
    if B is not None:
        assert (X @ B.T).abs().max() < 1e-12
    assert res.n_hvp == counter.calls


def test_zero_operator_and_full_space():
    # all-breakdown: every step is an invariant subspace
    res = projected_hessian_eigs(lambda v: torch.zeros_like(v), 10, 3, dtype=F64)
    assert torch.equal(res.eigenvalues, torch.zeros(3, dtype=F64))
    torch.testing.assert_close(res.eigenvectors @ res.eigenvectors.T, torch.eye(3, dtype=F64))
    # k == dim - K: the whole complement is the answer
    diag = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], dtype=F64)
    B = torch.eye(6, dtype=F64)[[5, 0]]  # projects out eigenvalues 6 and 1
    res = projected_hessian_eigs(lambda v: diag * v, 6, 4, B, dtype=F64)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 4.0, 3.0, 2.0], dtype=F64))
    assert res.eigenvectors[:, [0, 5]].abs().max() < 1e-12


def test_seed_determinism_restarts_progress_and_budget_warning():
    g = torch.Generator().manual_seed(7)
    A = torch.randn(200, 200, generator=g, dtype=F64)
    H = (A + A.T) / 2  # semicircle spectrum: needs several thick restarts
    seen = []
    kw = dict(tol=1e-6, dtype=F64, krylov_dim=20, max_hvp=5000)
    r1 = projected_hessian_eigs(lambda v: H @ v, 200, 5, progress=lambda n, r: seen.append((n, r)), **kw)
    r2 = projected_hessian_eigs(lambda v: H @ v, 200, 5, **kw)
    assert torch.equal(r1.eigenvectors, r2.eigenvectors) and r1.n_hvp == r2.n_hvp
    assert len(seen) >= 3 and seen[-1][0] == r1.n_hvp
    assert [n for n, _ in seen] == sorted(n for n, _ in seen)
    assert seen[-1][1].max() <= 1e-6 < seen[0][1].max()  # relative residuals, against tol
    torch.testing.assert_close(r1.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:5], atol=1e-9, rtol=0)
    with pytest.warns(RuntimeWarning, match=r"max_hvp=25 exhausted .* relative residual reached"):
        r3 = projected_hessian_eigs(lambda v: H @ v, 200, 5, tol=1e-6, dtype=F64, max_hvp=25)
    assert r3.n_hvp == 25 and r3.eigenvectors.shape == (5, 200)


# ---------------------------------------------------------------- bad inputs
def test_bad_inputs():
    d = 8
    hvp = lambda v: 2 * v  # noqa: E731
    with pytest.raises(ValueError, match="`k` must be >= 1, got 0"):
        projected_hessian_eigs(hvp, d, 0)
    with pytest.raises(TypeError, match="`k` must be an int, got float"):
        projected_hessian_eigs(hvp, d, 2.0)
    with pytest.raises(ValueError, match=r"`k` must be <= dim - K = 8 - 3 = 5, got 6"):
        projected_hessian_eigs(hvp, d, 6, orthonormal_rows(3, d, 0, torch.float32))
    with pytest.raises(ValueError, match=r"`basis` must have shape \[K, dim\] = \[K, 8\], got \(2, 7\)"):
        projected_hessian_eigs(hvp, d, 2, torch.zeros(2, 7))
    with pytest.raises(ValueError, match=r"`basis` must have shape"):
        projected_hessian_eigs(hvp, d, 2, torch.zeros(8))
    with pytest.raises(TypeError, match="`basis` must be a Tensor"):
        projected_hessian_eigs(hvp, d, 2, [[1.0] * 8])
    with pytest.raises(ValueError, match=r"`basis` rows must be orthonormal: max \|B Bᵀ - I\|"):
        projected_hessian_eigs(hvp, d, 2, 2 * orthonormal_rows(2, d, 0))
    with pytest.raises(ValueError, match="`tol` must be a positive finite float"):
        projected_hessian_eigs(hvp, d, 2, tol=0.0)
    with pytest.raises(ValueError, match="`krylov_dim` must be > k = 3"):
        projected_hessian_eigs(hvp, d, 3, krylov_dim=3)
    with pytest.raises(ValueError, match="`max_hvp` must be >= 3, got 2"):
        projected_hessian_eigs(hvp, d, 3, max_hvp=2)
    with pytest.raises(TypeError, match="`dtype` must be torch.float32 or torch.float64"):
        projected_hessian_eigs(hvp, d, 2, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="`hvp` must be callable"):
        projected_hessian_eigs("hvp", d, 2)
    with pytest.raises(ValueError, match=r"`hvp` must return a Tensor of shape \(8,\), got \(7,\) on call 1"):
        projected_hessian_eigs(lambda v: v[:7], d, 2)
    diag = torch.arange(1.0, 9.0)
    calls = Counter(lambda v: diag * v if calls.calls < 3 else v * float("nan"))
    with pytest.raises(FloatingPointError, match="`hvp` returned non-finite values on call 3"):
        projected_hessian_eigs(calls, d, 2)
