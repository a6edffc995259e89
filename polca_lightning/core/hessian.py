"""Hessian-vector products and the projected Lanczos eigensolver (one step of Algorithm 1).

Given a symmetric operator ``H`` known only through ``v -> H v`` and an orthonormal basis
``B`` ([K, d]), :func:`projected_hessian_eigs` finds the top-k eigenpairs (largest
*algebraic* eigenvalue first) of ``P H P`` with ``P = I - Bᵀ B``, restricted to the
complement of ``B``. It runs thick-restart Lanczos (Wu & Simon, 2000) with full
reorthogonalisation against the Krylov basis and against ``B``; memory is
``(krylov_dim + 1 + k) * d`` numbers besides ``B`` (never a d×d matrix, nor a copy of
``B``), which may be in host memory: every product with them is formed a column chunk at
a time on the working device (:mod:`polca_lightning.core._streaming`).
:func:`orthonormalize_rows` orthonormalises new rows against a basis the same way.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from polca_lightning.core._streaming import RowStream, check_memory_cap, rows_on, orthonormalize_rows

__all__ = ["EigenResult", "projected_hessian_eigs", "orthonormalize_rows", "hvp_of"]


@dataclass(frozen=True)
class EigenResult:
    """Top-k eigenpairs of ``P H P`` restricted to the complement of the basis.

    Attributes:
        eigenvalues: [k], descending (largest algebraic first).
        eigenvectors: [k, d], rows orthonormal, each orthogonal to every row of the basis.
        residuals: [k], ``||P H P v - λ v||_2`` per pair (absolute; the Lanczos estimate
            ``|β y_last|``, equal to the explicit residual up to ~eps·||PHP||).
        n_hvp: number of ``hvp`` calls spent.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    residuals: Tensor
    n_hvp: int


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} ({value!r})")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return value


def _check_basis(basis: Tensor | None, dim: int, stream: RowStream) -> Tensor | None:
    """Validate that ``basis`` is [K, dim] with orthonormal rows (checked via ||B Bᵀ - I||, chunked)."""
    if basis is None:
        return None
    if not isinstance(basis, Tensor):
        raise TypeError(f"`basis` must be a Tensor of shape [K, {dim}] or None, got {type(basis).__name__}")
    if basis.ndim != 2 or basis.shape[1] != dim:
        raise ValueError(f"`basis` must have shape [K, dim] = [K, {dim}], got {tuple(basis.shape)}")
    if not basis.is_floating_point():
        raise TypeError(f"`basis` must be floating point, got dtype {basis.dtype}")
    if basis.shape[0] == 0:
        return None
    gram = stream.gram(basis, [basis])  # [K, K] in float64, a chunk of B at a time: no float64 copy of B
    err = (gram - torch.eye(basis.shape[0], dtype=gram.dtype, device=gram.device)).abs().max().item()
    limit = 1e-8 if basis.dtype == torch.float64 else 1e-4
    if not math.isfinite(err) or err > limit:
        raise ValueError(f"`basis` rows must be orthonormal: max |B Bᵀ - I| = {err:.3g} exceeds {limit:g}")
    return basis


def projected_hessian_eigs(
    hvp: Callable[[Tensor], Tensor],
    dim: int,
    k: int,
    basis: Tensor | None = None,
    *,
    tol: float = 1e-3,
    max_hvp: int | None = None,
    krylov_dim: int | None = None,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device=None,
    storage_device=None,
    memory_cap: int | None = None,
    progress: Callable[[int, Tensor], None] | None = None,
) -> EigenResult:
    """Top-k eigenpairs (largest algebraic first) of ``P H P``, ``P = I - Bᵀ B``, matrix-free.

    Eigenvectors are searched in the complement of ``basis`` only, so the K trivial zero
    eigenvalues of ``P H P`` on ``span(B)`` are never returned. If ``H`` has rank below k in
    that complement, Lanczos breaks down (invariant subspace); it restarts from a fresh
    random vector orthogonal to everything so far, so eigenvalue-0 directions are returned.
    After a (near) breakdown it does not stop before the next sequence shows that no
    further copy of an eigenvalue above the k-th is left. Like any single-vector Krylov
    method it can otherwise miss copies of a repeated eigenvalue.

    Memory: the Krylov vectors ``[krylov_dim + 1, d]`` and the result ``[k, d]`` live on
    ``storage_device``; ``basis`` stays where it is, in its own dtype. Every product with
    them (Gram-Schmidt, the projections ``P``, restarts) is formed a column chunk at a time on
    ``device``, in float64, each chunk's copies taking at most ``memory_cap`` bytes there;
    besides them ``device`` holds the few d-vectors an iteration works on (the vector ``H``
    is applied to, its image, a start vector). With ``storage_device="cpu"`` and a CUDA
    ``device`` the Krylov vectors are in pinned host memory and the GPU holds only those.

    Args:
        hvp: ``v [d] -> H v [d]``; H symmetric. Called with vectors of the working dtype on
            ``device``; its output is cast to them.
        dim: d, the length of the vectors.
        k: number of eigenpairs, ``1 <= k <= dim - K``.
        basis: [K, d] with orthonormal rows, or None (K = 0). Any device and float dtype.
        tol: stop when every residual <= ``tol * max(|eigenvalues|)`` (with a floor of
            ``100 eps ||PHP||`` so that an all-zero spectrum terminates).
        max_hvp: budget of ``hvp`` calls (default ``max(1000, 40 k)``); if exhausted, the
            best pairs so far are returned and a RuntimeWarning names the residual reached.
        krylov_dim: Krylov basis size m before a thick restart (default ``max(2k + 10, 20)``),
            capped by ``dim - K``; must exceed k unless it equals ``dim - K``.
        seed: seeds a CPU ``torch.Generator`` for the start vector (and breakdown restarts),
            so every process of a distributed run gets the same result.
        dtype: working dtype, float32 or float64 (default: basis dtype, else float32).
        device: working device (default: basis device, else CPU).
        storage_device: where the Krylov vectors and the eigenvectors are kept (default ``device``).
        memory_cap: bytes of one chunk's copies on ``device`` (default ``None``: 8 MiB on a
            CPU, 256 MiB elsewhere, :data:`polca_lightning.core._streaming.MAX_CHUNK_BYTES`).
        progress: called after each restart and at the end with ``(n_hvp, relative_residuals [k])``:
            each residual over ``max(|eigenvalues|)``, the quantity that ``tol`` bounds.

    Returns:
        :class:`EigenResult`; eigenvectors on ``storage_device``, the rest on ``device``, in ``dtype``.

    Raises:
        TypeError, ValueError: on invalid arguments (the message names the argument).
        FloatingPointError: if an ``hvp`` call returns NaN or inf.

    Example:
        >>> H = torch.diag(torch.tensor([3.0, -5.0, 1.0, 0.5]))
        >>> res = projected_hessian_eigs(lambda v: H @ v, dim=4, k=2)
        >>> res.eigenvalues.round(decimals=4)  # largest algebraic, not largest magnitude
        tensor([3., 1.])
    """
    if not callable(hvp):
        raise TypeError(f"`hvp` must be callable (v [d] -> H v [d]), got {type(hvp).__name__}")
    dim = _check_int("dim", dim, 1)
    k = _check_int("k", k, 1)
    memory_cap = check_memory_cap(memory_cap)
    if basis is not None and not isinstance(basis, Tensor):
        raise TypeError(f"`basis` must be a Tensor of shape [K, {dim}] or None, got {type(basis).__name__}")
    device = torch.device(device) if device is not None else (basis.device if basis is not None else torch.device("cpu"))
    storage = device if storage_device is None else torch.device(storage_device)
    stream = RowStream(dim, device, memory_cap)
    basis = _check_basis(basis, dim, stream)
    n_basis = 0 if basis is None else basis.shape[0]
    n_avail = dim - n_basis  # dimension of the complement of span(B)
    if k > n_avail:
        raise ValueError(f"`k` must be <= dim - K = {dim} - {n_basis} = {n_avail}, got {k}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < float("inf")):
        raise ValueError(f"`tol` must be a positive finite float, got {tol!r}")
    max_hvp = max(1000, 40 * k) if max_hvp is None else _check_int("max_hvp", max_hvp, k)
    if krylov_dim is None:
        m = min(max(2 * k + 10, 20), n_avail)
    else:
        m = min(_check_int("krylov_dim", krylov_dim, 1), n_avail)
        if m <= k and m < n_avail:
            raise ValueError(f"`krylov_dim` must be > k = {k} (or >= dim - K = {n_avail}), got {krylov_dim}")
    if dtype is None:
        dtype = basis.dtype if basis is not None and basis.dtype in (torch.float32, torch.float64) else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"`dtype` must be torch.float32 or torch.float64, got {dtype}")
    B = [] if basis is None else [basis]  # [K, d], used a chunk at a time, never copied whole
    eps = torch.finfo(dtype).eps
    gen = torch.Generator(device="cpu").manual_seed(int(seed))

    def orthogonalize(w: Tensor, V: Tensor) -> tuple[Tensor, Tensor, float]:
        """Classical Gram-Schmidt of w [d] (in place) against the rows of V [j, d] and B, twice.

        Returns w, its coefficients on V (summed over both passes, float64 [j]) and its norm.
        Three passes over [V; B]: the coefficients; the update with the next coefficients;
        the update with the norm.
        """
        blocks = [V, *B]
        c = stream.inner(blocks, w)  # [j + K]
        c2, _ = stream.subtract(w, blocks, c, then_inner=True)  # "twice is enough" (Kahan-Parlett)
        _, norm2 = stream.subtract(w, blocks, c2, then_norm=True)
        j = V.shape[0]
        return w, (c[:j] + c2[:j]).cpu(), math.sqrt(max(norm2, 0.0))

    n_hvp = 0

    def apply(row: Tensor) -> Tensor:
        """H v for the Krylov row v [d] (a new vector on ``device``); P H P v once orthogonalised.

        Every Krylov row is orthogonal to B already (Gram-Schmidt against [V; B] made it so),
        so P v = v, and the P on the left is the B part of the next Gram-Schmidt: no pass
        over B of its own.
        """
        nonlocal n_hvp
        n_hvp += 1
        out = hvp(row.to(device=device, dtype=dtype, copy=True))
        if not isinstance(out, Tensor) or out.shape != (dim,):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"`hvp` must return a Tensor of shape ({dim},), got {got} on call {n_hvp}")
        out = out.detach().to(device=device, dtype=dtype, copy=True)
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"`hvp` returned non-finite values on call {n_hvp} (of this solve)")
        return out

    def random_unit(V: Tensor) -> Tensor | None:
        """A seeded random unit vector orthogonal to V and B (None if none is left)."""
        for _ in range(3):  # a draw almost inside span(V, B) is retried, deterministically
            r = torch.randn(dim, generator=gen, dtype=dtype).to(device)  # [d], same on every process
            r0 = r.norm().item()
            r, _, norm = orthogonalize(r, V)
            if norm > 100 * eps * r0:
                return r / norm
        return None

    V = rows_on(storage, device, m + 1, dim, dtype)  # Lanczos vectors, rows
    T = torch.zeros(m + 1, m + 1, dtype=torch.float64)  # projected matrix Vᵀ (PHP) V
    start = random_unit(V[:0])
    if start is None:  # only possible when n_avail is ~0 numerically
        raise ValueError("`basis` leaves no room: no vector orthogonal to it could be drawn")
    V[0].copy_(start)
    j, beta, anorm, exhausted = 0, 0.0, 0.0, False
    seq_start, block_top, scale = 0, None, None  # start of the current Krylov sequence (see below)
    keep = max(k, min(m - 1, k + (m - k) // 2))  # Ritz vectors kept at a thick restart
    while True:
        w = apply(V[j])  # [d]
        w, h64, beta = orthogonalize(w, V[: j + 1])  # w <- P H P v_j, less its part on V
        anorm = max(anorm, math.sqrt(float(h64 @ h64) + beta**2))  # ||P H P v_j||
        T[: j + 1, j] = h64  # symmetric Arnoldi: column and row j from the same projections
        T[j, : j + 1] = h64
        j += 1
        if j >= n_avail:  # Krylov space is the whole complement: T is exact
            beta, exhausted = 0.0, True
        else:
            # span(V) invariant to within the tolerance: the next direction starts a new
            # sequence, so remember the top eigenvalue of the sequence that just ended
            if beta <= max(tol * (scale if scale is not None else anorm), 100 * eps * anorm):
                block_top = torch.linalg.eigvalsh(T[seq_start:j, seq_start:j]).max().item()
                seq_start = j
            else:
                block_top = None
            if beta <= 100 * eps * anorm:  # exact breakdown: continue from a fresh direction
                beta, nxt = 0.0, random_unit(V[:j])
                exhausted = nxt is None
                if nxt is not None:
                    V[j].copy_(nxt)
            else:
                V[j].copy_(w / beta)
        del w
        if j < k and not exhausted and n_hvp < max_hvp:
            continue
        if j < k:  # only if random draws kept landing in span(V, B): a badly scaled basis
            raise RuntimeError(f"Lanczos found only {j} directions orthogonal to `basis`, fewer than k={k}")
        theta, Y = torch.linalg.eigh(T[:j, :j])  # ascending
        theta, Y = theta.flip(0), Y.flip(1)  # descending: largest algebraic first
        res = beta * Y[j - 1, :].abs()  # [j] residual norms of all Ritz pairs
        scale = theta[:k].abs().max().item()
        threshold = max(tol * scale, 100 * eps * anorm)
        converged = bool((res[:k] <= threshold).all()) and j > k
        # Right after a (near) breakdown the new direction is unexplored. Later sequences
        # only hold further copies of eigenvalues already found (e.g. the null space of a
        # low-rank H), so the top k are final once the sequence just ended cannot enter them.
        if block_top is not None and block_top > theta[k - 1].item() + threshold:
            converged = False
        if converged or exhausted or n_hvp >= max_hvp:
            break
        if j == m:  # thick restart: keep the top `keep` Ritz vectors, then the residual vector
            stream.combine(Y[:, :keep].T, V[:m], V[:keep])  # V[:keep] <- Ykᵀ V[:m], chunk by chunk
            V[keep].copy_(V[m])
            T.zero_()
            T[:keep, :keep] = torch.diag(theta[:keep])
            T[keep, :keep] = T[:keep, keep] = beta * Y[m - 1, :keep]  # arrowhead coupling
            j, seq_start = keep, 0
            if progress is not None:
                progress(n_hvp, (res[:k] / max(scale, 1e-300)).to(dtype))
    vecs = stream.combine(Y[:, :k].T, V[:j], rows_on(storage, device, k, dim, dtype))  # [k, d] Ritz vectors
    del V
    if B:  # re-orthogonalise against B (twice) so orthogonality holds to roundoff
        c = stream.gram(vecs, B)
        c = stream.update_rows(vecs, minus=c, blocks=B, gram_with=B)
        gram = stream.update_rows(vecs, minus=c, blocks=B, gram_with=[vecs])
    else:
        gram = stream.gram(vecs, [vecs])
    stream.update_rows(vecs, transform=torch.diag(gram.diagonal().rsqrt()))  # unit rows
    residuals = res[:k].to(device=device, dtype=dtype)
    if progress is not None:
        progress(n_hvp, (res[:k] / max(scale, 1e-300)).to(dtype))
    if not converged and not exhausted:
        worst = (res[:k] / max(scale, 1e-300)).max().item()
        warnings.warn(
            f"projected_hessian_eigs: max_hvp={max_hvp} exhausted before convergence; "
            f"largest relative residual reached {worst:.3g} (tol {tol:g})",
            RuntimeWarning,
            stacklevel=2,
        )
    return EigenResult(theta[:k].to(device=device, dtype=dtype), vecs, residuals, n_hvp)


def hvp_of(
    loss_fn: Callable[[Tensor], Tensor], theta: Tensor, method: str = "double_backward"
) -> Callable[[Tensor], Tensor]:
    """Hessian-vector product ``v -> ∇²L(θ) v`` of a scalar loss of a flat parameter vector.

    Both methods give the same numbers. ``"double_backward"`` recomputes the forward pass
    and the gradient graph on every call (create_graph=True, then the gradient of
    ``<g, v>``) and keeps nothing between calls. ``"forward_over_reverse"``
    (``torch.func.jvp`` of ``torch.func.grad``) pushes a tangent through one
    forward+backward pass; it needs forward-mode AD for every op (not the fused attention
    kernels: docs/engines.md). Measured on CPU with ``benchmarks/hessian_lanczos.py`` (an MLP
    and a small transformer), one HVP costs about 1.6-3.2 loss+gradient evaluations with
    ``"double_backward"`` against 2.8-4.6 with ``"forward_over_reverse"``, so
    ``"double_backward"`` is the cheaper one there and the default; re-measure on GPU.

    Args:
        loss_fn: flat parameters [d] -> scalar loss.
        theta: [d] point at which the Hessian is taken (detached; never modified).
        method: ``"double_backward"`` or ``"forward_over_reverse"``.

    Returns:
        A callable ``v [d] -> H v [d]`` returning in ``v``'s dtype and device; it works
        under ``torch.no_grad()`` too.

    Raises:
        TypeError: ``theta`` not a floating Tensor. ValueError: ``theta`` not 1-D, unknown
        ``method``; when called, ``v`` of the wrong shape or ``loss_fn`` not returning a scalar.

    Example:
        >>> A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
        >>> hvp = hvp_of(lambda x: 0.5 * x @ A @ x, torch.zeros(2))
        >>> hvp(torch.tensor([1.0, 0.0]))
        tensor([2., 1.])
    """
    if not isinstance(theta, Tensor) or not theta.is_floating_point():
        raise TypeError(f"`theta` must be a floating-point Tensor, got {getattr(theta, 'dtype', type(theta).__name__)}")
    if theta.ndim != 1:
        raise ValueError(f"`theta` must be a flat vector [d], got shape {tuple(theta.shape)}")
    methods = ("double_backward", "forward_over_reverse")
    if method not in methods:
        raise ValueError(f"`method` must be one of {methods}, got {method!r}")
    theta = theta.detach()

    def scalar_loss(x: Tensor) -> Tensor:
        loss = loss_fn(x)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"`loss_fn` must return a scalar Tensor, got {got}")
        return loss.reshape(())

    def hvp(v: Tensor) -> Tensor:
        if v.shape != theta.shape:
            raise ValueError(f"hvp: `v` must have shape {tuple(theta.shape)}, got {tuple(v.shape)}")
        u = v.detach().to(device=theta.device, dtype=theta.dtype)
        with torch.enable_grad():
            if method == "forward_over_reverse":
                _, hv = torch.func.jvp(torch.func.grad(scalar_loss), (theta,), (u,))
            else:
                x = theta.clone().requires_grad_(True)
                (g,) = torch.autograd.grad(scalar_loss(x), x, create_graph=True)  # [d]
                if not g.requires_grad:  # loss linear in theta: zero Hessian
                    return torch.zeros_like(v)
                (hv,) = torch.autograd.grad(g, x, grad_outputs=u, allow_unused=True)  # ∇<g, u>
                hv = torch.zeros_like(u) if hv is None else hv
        return hv.detach().to(device=v.device, dtype=v.dtype)

    return hvp
