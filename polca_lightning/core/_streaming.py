"""Blocks of d-vectors (a basis, Krylov vectors) used chunk by chunk over the d dimension.

A 1B-parameter model with K = 30 basis vectors has a 120 GB float32 basis: more than
one GPU holds. Such blocks live in host memory (pinned where CUDA is available, so that
copies to the device are fast and asynchronous) and every product with them is formed a
column chunk at a time: the chunk's columns of every block go to the compute device, are
multiplied there in float64, and the small results (inner products ``[R]``, Gram
matrices ``[R, R']``) are accumulated in float64 over the chunks. A chunk is sized so
that what it brings to the device (its copy in the block's dtype and in float64) fits
in ``memory_cap`` bytes, and at most :data:`MAX_CHUNK_BYTES` (for speed; also the width
with ``memory_cap=None``).

Every operation here computes the same numbers whatever the chunking, up to the order
of float64 summation over chunks.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

F64 = torch.float64

# The widest chunk, whatever memory_cap allows: on a CPU a chunk whose copies stay in cache
# through the fused steps (copy, float64, product, update) ran 5-7x faster than 1 GiB chunks
# (benchmarks/memory_cap.py, 3.7M parameters, 35 rows); on a GPU a chunk must be large enough
# that each kernel outlasts its launch (256 MiB: ~0.1 ms at 3 TB/s).
MAX_CHUNK_BYTES = {"cpu": 8 << 20}
DEFAULT_MAX_CHUNK_BYTES = 256 << 20


def host_rows(n_rows: int, dim: int, dtype: torch.dtype, pin: bool = True) -> Tensor:
    """An empty ``[n_rows, dim]`` CPU tensor, pinned where CUDA is available and ``pin``."""
    pin = pin and torch.cuda.is_available()
    return torch.empty(n_rows, dim, dtype=dtype, pin_memory=pin)


class RowStream:
    """Products of row blocks ``[r, d]`` (on any device) with d-vectors and with each other.

    Args:
        dim: d.
        device: where the chunks are multiplied (the model's device).
        memory_cap: bytes of one chunk's copies on ``device`` (``None``: the device's
            :data:`MAX_CHUNK_BYTES`).
    """

    def __init__(self, dim: int, device: torch.device | str, memory_cap: int | None = None):
        if memory_cap is not None and (isinstance(memory_cap, bool) or not isinstance(memory_cap, int)
                                       or memory_cap < 1):
            raise ValueError(f"memory_cap: expected a positive int (bytes) or None, got {memory_cap!r}")
        self.dim, self.device, self.memory_cap = dim, torch.device(device), memory_cap

    # ------------------------------------------------------------- chunking
    def chunks(self, blocks: Sequence[Tensor], vectors: int = 1) -> list[slice]:
        """Column slices such that one chunk of every block (and of ``vectors`` d-vectors), each
        copied to the device in its dtype and in float64, takes at most ``memory_cap`` bytes
        (and at most :data:`MAX_CHUNK_BYTES` for the device, for speed)."""
        budget = MAX_CHUNK_BYTES.get(self.device.type, DEFAULT_MAX_CHUNK_BYTES)
        if self.memory_cap is not None:
            budget = min(budget, self.memory_cap)
        per_column = sum(b.shape[0] * (b.element_size() + 8) for b in blocks) + 16 * vectors
        cols = max(1, budget // max(per_column, 1))
        return [slice(s, min(s + cols, self.dim)) for s in range(0, self.dim, cols)]

    def load(self, block: Tensor, cols: slice) -> Tensor:
        """``block[:, cols]`` on the device in float64 ``[r, c]``."""
        return block[:, cols].to(self.device, non_blocking=True).to(F64)

    def _vec(self, w: Tensor, cols: slice) -> Tensor:
        return w[cols].to(self.device, non_blocking=True).to(F64)

    # ------------------------------------------------------ with d-vectors
    def inner(self, blocks: Sequence[Tensor], w: Tensor, minus: Tensor | None = None) -> Tensor:
        """``[A_1; A_2; ...] (w - minus)`` in float64 ``[R]`` on the device."""
        blocks = [b for b in blocks if b is not None and b.shape[0]]
        out = torch.zeros(sum(b.shape[0] for b in blocks), dtype=F64, device=self.device)
        for cols in self.chunks(blocks, 2):
            wc = self._vec(w, cols)  # [c]
            if minus is not None:
                wc = wc - self._vec(minus, cols)
            row = 0
            for b in blocks:
                out[row : row + b.shape[0]] += self.load(b, cols) @ wc  # [r]
                row += b.shape[0]
        return out

    def subtract(self, w: Tensor, blocks: Sequence[Tensor], coef: Tensor, then_inner: bool = False,
                 then_norm: bool = False) -> tuple[Tensor | None, float | None]:
        """``w -= coefᵀ [A_1; A_2; ...]`` in place, chunk by chunk (each chunk formed in float64).

        With ``then_inner``, also returns ``[A_1; ...] w`` of the updated ``w`` (the next
        Gram-Schmidt pass's coefficients) and with ``then_norm`` its squared norm, both formed
        from the same chunks, so one pass over the blocks does both.
        """
        blocks = [b for b in blocks if b is not None and b.shape[0]]
        coef = coef.to(self.device, F64)
        nxt = torch.zeros_like(coef) if then_inner else None
        norm2 = torch.zeros((), dtype=F64, device=self.device)
        for cols in self.chunks(blocks, 2):
            loaded = [self.load(b, cols) for b in blocks]  # [r_i, c] each
            wc, row = self._vec(w, cols), 0
            for b, a in zip(blocks, loaded):
                wc = wc - coef[row : row + b.shape[0]] @ a
                row += b.shape[0]
            w[cols] = wc.to(w.dtype)
            wc = w[cols].to(F64)  # as stored: the next pass sees what is there
            if then_inner:
                row = 0
                for b, a in zip(blocks, loaded):
                    nxt[row : row + b.shape[0]] += a @ wc
                    row += b.shape[0]
            if then_norm:
                norm2 += wc @ wc
        return nxt, (norm2.item() if then_norm else None)

    # -------------------------------------------------------- with blocks
    def gram(self, left: Tensor, right: Sequence[Tensor]) -> Tensor:
        """``left [r, d] @ [A_1; ...]ᵀ`` in float64 ``[r, R]`` on the device."""
        right = [b for b in right if b is not None and b.shape[0]]
        out = torch.zeros(left.shape[0], sum(b.shape[0] for b in right), dtype=F64, device=self.device)
        for cols in self.chunks([left, *right]):
            lc, col = self.load(left, cols), 0
            for b in right:
                out[:, col : col + b.shape[0]] += lc @ self.load(b, cols).T
                col += b.shape[0]
        return out

    def update_rows(self, rows: Tensor, transform: Tensor | None = None, minus: Tensor | None = None,
                    blocks: Sequence[Tensor] = (), gram_with: Sequence[Tensor] | None = None) -> Tensor | None:
        """``rows <- transform @ rows - minus @ [A_1; ...]`` in place, chunk by chunk.

        Args:
            rows: ``[r, d]``, overwritten.
            transform: ``[r', r]`` (``None``: identity); ``r' <= r``, the first ``r'`` rows are written.
            minus: ``[r', R]`` coefficients on the rows of ``blocks`` (``None``: nothing subtracted).
            gram_with: also return ``rows_new @ [B_1; ...]ᵀ`` ``[r', R']`` from the same chunks
                (``[]`` or a block list that may include ``rows`` itself, meaning its new values).

        Returns:
            The Gram matrix asked for, else ``None``.
        """
        blocks = [b for b in blocks if b is not None and b.shape[0]]
        n_out = rows.shape[0] if transform is None else transform.shape[0]
        transform = None if transform is None else transform.to(self.device, F64)
        minus = None if minus is None else minus.to(self.device, F64)
        others = None if gram_with is None else [b for b in gram_with if b is not None and b.shape[0]]
        widths = [] if others is None else [n_out if b is rows else b.shape[0] for b in others]
        gram = None if others is None else torch.zeros(n_out, sum(widths), dtype=F64, device=self.device)
        extra = [b for b in (others or []) if b is not rows]
        for cols in self.chunks([rows, rows, *blocks, *extra]):
            new = self.load(rows, cols)  # [r, c]
            if transform is not None:
                new = transform @ new  # [r', c]
            if minus is not None:
                row = 0
                for b in blocks:
                    new = new - minus[:, row : row + b.shape[0]] @ self.load(b, cols)
                    row += b.shape[0]
            stored = new.to(rows.dtype)
            rows[:n_out, cols].copy_(stored)  # across devices where rows live in host memory
            if others is not None:
                new = stored.to(F64)  # [r', c] as stored
                col = 0
                for b, width in zip(others, widths):
                    part = new if b is rows else self.load(b, cols)  # [width, c]
                    gram[:, col : col + width] += new @ part.T
                    col += width
        return gram

    def combine(self, coef: Tensor, block: Tensor, out: Tensor) -> Tensor:
        """``out [r', d] <- coef [r', r] @ block [r, d]``, chunk by chunk (``out`` may be ``block``'s first rows)."""
        coef = coef.to(self.device, F64)
        for cols in self.chunks([block, out]):
            out[:, cols].copy_((coef @ self.load(block, cols)).to(out.dtype))
        return out


def check_memory_cap(memory_cap) -> int | None:
    if memory_cap is not None and (isinstance(memory_cap, bool) or not isinstance(memory_cap, int) or memory_cap < 1):
        raise ValueError(f"`memory_cap` must be a positive int (bytes) or None, got {memory_cap!r}")
    return memory_cap


def rows_on(storage: torch.device, device: torch.device, n_rows: int, dim: int, dtype: torch.dtype) -> Tensor:
    """``[n_rows, dim]`` on ``storage``: pinned host memory when the work is on a CUDA device."""
    if storage.type == "cpu":
        return host_rows(n_rows, dim, dtype, pin=device.type == "cuda")
    return torch.empty(n_rows, dim, dtype=dtype, device=storage)


def orthonormalize_rows(
    vectors: Tensor,
    basis: Tensor | None = None,
    *,
    memory_cap: int | None = None,
    device=None,
    what: str = "new",
) -> Tensor:
    """Make the rows of ``vectors`` orthonormal to each other and to the rows of ``basis``, in place.

    Block Gram-Schmidt against ``basis`` (twice: the basis is orthonormal only to its own
    precision), then Cholesky QR of the Gram matrix (twice where once falls short of the
    storage precision). Every inner product is accumulated in float64 a column chunk at a
    time (:class:`~polca_lightning.core._streaming.RowStream`), and the rows are updated a chunk at
    a time, so nothing of size ``[k, d]`` or ``[K, d]`` is ever copied, in float64 or at all:
    ``vectors`` and ``basis`` may live in host memory while the chunks are multiplied on
    ``device``. The result equals ``Q`` of the QR factorisation ``vectorsᵀ = Q R`` (after
    projecting out the basis) with ``R``'s diagonal positive, so each row keeps its orientation.

    Args:
        vectors: ``[k, d]``, overwritten with the result.
        basis: ``[K, d]`` orthonormal rows, or ``None``.
        memory_cap: bytes of one chunk's copies on ``device`` (``None``: the device's
            :data:`MAX_CHUNK_BYTES`).
        device: where the chunks are multiplied (default: ``vectors``' device).
        what: names the vectors in the error.

    Returns:
        ``vectors``.

    Raises:
        ValueError: a row (nearly) in the span of the basis and of the rows before it.

    Example:
        >>> v = torch.tensor([[3.0, 4.0, 0.0], [1.0, 1.0, 1.0]])
        >>> orthonormalize_rows(v, torch.tensor([[0.0, 0.0, 1.0]])).round(decimals=4)
        tensor([[ 0.6000,  0.8000,  0.0000],
                [ 0.8000, -0.6000,  0.0000]])
    """
    k, dim = vectors.shape
    stream = RowStream(dim, vectors.device if device is None else device, check_memory_cap(memory_cap))
    blocks = [basis] if basis is not None and basis.shape[0] else []
    first = stream.gram(vectors, [vectors, *blocks])  # [k, k + K]
    scale = first[:, :k].diagonal().max().clamp_min(1e-300).sqrt()  # largest row norm before projection
    gram = first[:, :k]
    if blocks:
        c = first[:, k:]  # [k, K]
        c = stream.update_rows(vectors, minus=c, blocks=blocks, gram_with=blocks)  # [k, K] of the result
        gram = stream.update_rows(vectors, minus=c, blocks=blocks, gram_with=[vectors])  # [k, k]
    eps = torch.finfo(vectors.dtype).eps
    for attempt in range(2):
        L, info = torch.linalg.cholesky_ex(gram)  # gram = L Lᵀ, L's diagonal = |R|'s
        if attempt == 0 and (info.item() != 0 or (L.diagonal() < 1e-4 * scale).any()):
            raise ValueError(f"basis: the {what} directions are linearly dependent on each other or on the basis")
        if info.item() != 0:  # only reachable on a second pass: the first one left the rows orthonormal
            break
        inv = torch.linalg.solve_triangular(L, torch.eye(k, dtype=L.dtype, device=L.device), upper=False)
        gram = stream.update_rows(vectors, transform=inv, gram_with=[vectors])  # rows <- L⁻¹ rows
        if (gram - torch.eye(k, dtype=gram.dtype, device=gram.device)).abs().max().item() <= 1e3 * eps:
            break
    return vectors
