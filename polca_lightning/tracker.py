"""One run's POLCA bookkeeping, without Lightning: snapshots, basis growth, backfill.

:class:`POLCATracker` is what :class:`~polca_lightning.POLCACallback` drives. At each
snapshot ``j`` (parameters ``theta_j``) it

1. computes every probe token's loss and ``g`` (and ``c`` where the order needs it)
   along the current basis;
2. allocates interval ``j-1`` with :func:`~polca_lightning.core.polca.polca_interval`;
3. writes the snapshot and the interval, then commits them;

and at each basis step it finds ``k`` new vectors with the projected Lanczos at
``theta_j``, then *backfills* them: ``g`` at every earlier snapshot (read back from the
store) and POLCA for every earlier interval, so the trajectories are as complete as if
the basis had been known from the start.

In a distributed run every rank holds a tracker: probe and Hessian batches are split
across ranks (rank ``r`` takes batches ``r, r+W, ...``), results are gathered and HVPs
summed, the Lanczos runs identically everywhere, and only rank 0 writes.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from polca_lightning.core.engine import DirectionalDerivatives
from polca_lightning.core.functional import FunctionalTokenLoss, ParameterSpace, evaluation_mode
from polca_lightning.core._streaming import RowStream, host_rows
from polca_lightning.core.hessian import orthonormalize_rows, projected_hessian_eigs
from polca_lightning.core.polca import coverage, needs_curvature, polca_interval

__all__ = ["POLCATracker", "Collective"]

log = logging.getLogger("polca_lightning")


class Collective:
    """The collectives a tracker needs; the default is a single process."""

    rank, world_size = 0, 1

    def gather(self, items: list) -> list[list]:
        """Every rank's ``items``, indexed by rank."""
        return [items]

    def all_reduce(self, tensor: Tensor) -> Tensor:
        return tensor

    def broadcast(self, tensor: Tensor) -> Tensor:
        return tensor


class TorchDistributed(Collective):
    """Collectives over an initialised ``torch.distributed`` process group."""

    def __init__(self):
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

    def gather(self, items: list) -> list[list]:
        out = [None] * self.world_size
        # items are tuples (loss, g, c): move tensors nested in them to the CPU too, or CUDA
        # tensors get pickled and land on the sender's GPU on every receiving rank
        def cpu(x):
            if isinstance(x, Tensor):
                return x.cpu()
            return type(x)(cpu(y) for y in x) if isinstance(x, (list, tuple)) else x

        self._dist.all_gather_object(out, cpu(list(items)))
        return out

    def all_reduce(self, tensor: Tensor) -> Tensor:
        self._dist.all_reduce(tensor)
        return tensor

    def broadcast(self, tensor: Tensor) -> Tensor:
        self._dist.broadcast(tensor, src=0)
        return tensor


def _orthonormalize(vectors: Tensor, basis: Tensor | None, what: str, memory_cap: int | None = None,
                    device=None) -> Tensor:
    """Rows of ``vectors`` made orthonormal to each other and to ``basis``, in place, with float64
    inner products formed a chunk of ``memory_cap`` bytes at a time on ``device``
    (:func:`~polca_lightning.core.hessian.orthonormalize_rows`: no float64 copy of either).

    Raises:
        ValueError: a row (nearly) in the span of the basis and the rows before it.
    """
    return orthonormalize_rows(vectors, basis, memory_cap=memory_cap, device=device, what=what)


class POLCATracker:
    """Snapshots, basis growth, interval POLCA and backfill for one training run.

    Args:
        module: the model being trained (read, never modified).
        token_loss: the token-loss contract.
        space: the selected parameters.
        probe_batches, hessian_batches: lists of batches, already on the model's device.
        order: POLCA order of the ``polca`` variable.
        k, max_basis: vectors per basis step, and at most this many in all.
        basis: ``"hessian"``, ``"random"`` or ``callable(module, step, basis [K, d]) -> [k, d]``.
        writer: the :class:`~polca_lightning.store.StoreWriter` (``None`` on ranks > 0).
        collective: :class:`Collective` (single process) or :class:`TorchDistributed`.
        engine, memory_cap, compute_precision: passed to
            :class:`~polca_lightning.core.engine.DirectionalDerivatives`; ``memory_cap`` also bounds
            the chunks of the eigensolver's and the orthonormalisation's products.
        basis_on_device: keep the basis and the eigensolver's Krylov vectors on the model's
            device; else in host memory (pinned where CUDA is available), streamed to the
            device a chunk of at most ``memory_cap`` bytes at a time.
        lanczos_tol, seed: eigensolver tolerance and seed (deterministic across ranks).
        log_metrics: ``callable(dict, step)`` for scalars; progress: show bars on long work.
    """

    def __init__(
        self,
        module: nn.Module,
        token_loss,
        space: ParameterSpace,
        probe_batches: Sequence[Any],
        hessian_batches: Sequence[Any],
        *,
        order: str,
        k: int,
        max_basis: int,
        basis: str | Callable = "hessian",
        writer=None,
        collective: Collective | None = None,
        engine: str = "auto",
        memory_cap: int = 1 << 30,
        basis_on_device: bool = True,
        compute_precision: str = "float32",
        lanczos_tol: float = 1e-3,
        seed: int = 0,
        log_metrics: Callable[[dict, int], None] | None = None,
        progress: bool = True,
    ):
        self.module, self.space, self.order = module, space, order
        self.k, self.max_basis, self.basis_kind = k, max_basis, basis
        self.writer = writer
        self.coll = collective or Collective()
        self.basis_on_device, self.lanczos_tol, self.seed = basis_on_device, lanczos_tol, seed
        self.log_metrics = log_metrics or (lambda metrics, step: None)
        self.progress = progress
        self.curvature = needs_curvature(order)
        self.token_loss = token_loss
        self.dd = DirectionalDerivatives(module, token_loss, space, engine=engine, memory_cap=memory_cap,
                                         compute_precision=compute_precision)
        r, w = self.coll.rank, self.coll.world_size
        self.probe = list(probe_batches)
        self.my_probe = self.probe[r::w]
        self.my_hessian = list(hessian_batches)[r::w]
        self.timings: dict[str, float] = defaultdict(float)
        self._nested: list[float] = []  # time of timers nested in the open ones
        self.guarded = 0  # second-order denominators clamped so far
        self._warned_nonfinite = False
        # state: the basis and the last snapshot
        self.basis: Tensor | None = None  # [K, d], the first K rows of _rows
        self._rows: Tensor | None = None  # [max_basis, d], allocated at the first basis step
        self.eigenvalues: list[float] = []
        self.basis_steps: list[int] = []
        self.n_snapshots = 0
        self.prev: dict | None = None  # theta, loss, g, c at the last snapshot

    # ----------------------------------------------------------------- helpers
    @contextmanager
    def _timed(self, name: str):
        """Add the time spent to ``timings[name]``, less what nested timers took (counted once)."""
        start = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.timings[name] += elapsed - self._nested.pop()
            if self._nested:
                self._nested[-1] += elapsed

    @property
    def n_basis(self) -> int:
        return 0 if self.basis is None else self.basis.shape[0]

    def _theta(self) -> Tensor:
        return self.space.flatten(self.module)

    def _stream(self, device) -> RowStream:
        """Products with the basis, a chunk of ``memory_cap`` bytes at a time on ``device``."""
        return RowStream(self.space.dim, device, self.dd.memory_cap)

    def _storage(self, like: Tensor) -> torch.device:
        """Where the basis lives: the model's device, or the host."""
        return like.device if self.basis_on_device else torch.device("cpu")

    def _new_rows(self, n: int, like: Tensor) -> Tensor:
        """``[n, d]`` where the basis lives (pinned host memory when it is off a CUDA device)."""
        if self.basis_on_device:
            return torch.empty(n, self.space.dim, dtype=like.dtype, device=like.device)
        return host_rows(n, self.space.dim, like.dtype, pin=like.device.type == "cuda")

    def _append_basis(self, vecs: Tensor, like: Tensor) -> None:
        """Rows ``vecs`` after the basis, in storage allocated once for ``max_basis`` rows."""
        if self._rows is None:
            self._rows = self._new_rows(min(self.max_basis, self.space.dim), like)
        K0 = self.n_basis
        self._rows[K0 : K0 + vecs.shape[0]].copy_(vecs)  # across devices where the basis is in host memory
        self.basis = self._rows[: K0 + vecs.shape[0]]

    def derivatives(self, theta: Tensor, directions: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Loss ``[T]``, ``g`` and ``c`` ``[K, T]`` over all probe tokens (gathered in probe order)."""
        curvature = self.curvature and directions is not None
        results = [[] for _ in self.my_probe]
        # a basis in host memory comes to the device a chunk of rows at a time, each copied once
        for chunk in self.dd.direction_chunks(directions, theta):
            for i, batch in enumerate(self.my_probe):  # one batch at a time, so ranks interleave in probe order
                results[i].append(self.dd(theta, [batch], chunk, curvature=curvature))
        def cat(parts, name):  # one chunk (the basis on the device): no copy
            if getattr(parts[0], name) is None or len(parts) == 1:
                return getattr(parts[0], name)
            return torch.cat([getattr(p, name) for p in parts])
        out = [(r[0].loss, cat(r, "g"), cat(r, "c")) for r in results]
        parts = self.coll.gather(out)
        ordered = [parts[i % self.coll.world_size][i // self.coll.world_size] for i in range(len(self.probe))]
        loss = torch.cat([o[0].to(theta.device) for o in ordered])
        g = torch.cat([o[1].to(theta.device) for o in ordered], 1) if directions is not None else None
        c = torch.cat([o[2].to(theta.device) for o in ordered], 1) if g is not None and self.curvature else None
        bad = ~torch.isfinite(loss)
        if bad.any():  # a token whose loss is not finite has no meaningful allocation
            loss = loss.masked_fill(bad, float("nan"))
            g = None if g is None else g.masked_fill(bad, float("nan"))
            c = None if c is None else c.masked_fill(bad, float("nan"))
        if not self._warned_nonfinite and bad.any():
            self._warned_nonfinite = True
            warnings.warn(
                f"POLCA: {int(bad.sum())} probe token losses are not finite; they are "
                "recorded as NaN and training goes on (warned once)",
                RuntimeWarning,
                stacklevel=2,
            )
        return loss, g, c

    def _interval(self, index: int, start: dict, end: dict, rows: slice, local: slice, eigen: Tensor) -> dict:
        """POLCA of interval ``index`` for basis ``rows`` (``local``: those rows in ``start``/``end``'s g); writes it."""
        theta = end["theta"]
        delta = self._stream(theta.device).inner([self.basis[rows]], theta, minus=start["theta"]).to(theta.dtype)  # [kb]
        out = polca_interval(
            self.order,
            start["g"][local],
            delta,
            g_end=end["g"][local],
            eigenvalue=eigen.to(delta),
            curvature=None if start["c"] is None else start["c"][local],
        )
        self.guarded += int(out.guarded.sum())
        if self.writer is not None:
            with self._timed("io"):
                self.writer.write_interval(index, rows.start, delta, out.values, out.first)
        return {"values": out.values, "first": out.first}

    # -------------------------------------------------------------- lifecycle
    def snapshot(self, step: int) -> dict:
        """Record snapshot ``n_snapshots`` at ``step`` and allocate the interval it closes."""
        with self._timed("snapshot"):
            theta = self._theta()
            self._theta_device = theta.device
        with self._timed("interval"), evaluation_mode(self.module):
            loss, g, c = self.derivatives(theta, self.basis)
        now = {"theta": theta, "loss": loss, "g": g, "c": c}
        metrics = {}
        j = self.n_snapshots
        if self.writer is not None:
            with self._timed("io"):
                self.writer.write_snapshot(j, step, loss, theta)
                if g is not None:
                    self.writer.write_directional_grad(j, 0, g)
                    if c is not None:
                        self.writer.write_curvature(j, 0, c)
        if j > 0 and self.n_basis:
            with self._timed("interval"):
                eigen = torch.tensor(self.eigenvalues, dtype=torch.float64)
                every = slice(0, self.n_basis)
                res = self._interval(j - 1, self.prev, now, every, every, eigen)
                for name, values in (("", res["values"]), ("_first", res["first"])):
                    cov = coverage(values, self.prev["loss"], loss)
                    metrics[f"polca/coverage{name}"] = cov["ratio"]
                    metrics[f"polca/explained{name}"] = cov["explained"]
        if j > 0:
            metrics["polca/probe_loss"] = loss.nanmean().item()
        if self.order == "second":
            metrics["polca/second_order_guarded"] = self.guarded  # Eq. 5 denominators clamped so far
        self._commit(j + 1, self.n_basis)
        self.n_snapshots = j + 1
        self.prev = now
        if metrics:
            self.log_metrics(metrics, step)
        return metrics

    def _commit(self, n_snapshots: int, n_basis: int) -> None:
        if self.writer is not None:
            with self._timed("io"):
                self.writer.commit(n_snapshots, n_basis)

    def _new_directions(self, step: int, k: int) -> tuple[Tensor, Tensor, dict]:
        theta = self.prev["theta"]
        existing = self.basis
        if self.basis_kind == "hessian":
            fn = FunctionalTokenLoss(self.module, self.token_loss, self.space)
            with evaluation_mode(self.module):
                with torch.no_grad():
                    local = sum(int(fn(theta, b)[1].sum()) for b in self.my_hessian)
                n_tokens = int(self.coll.all_reduce(torch.tensor([local], device=theta.device)).item())
                hvp_local = fn.mean_loss_hvp(theta, self.my_hessian, n_tokens=n_tokens) if self.my_hessian else None

                def hvp(v: Tensor) -> Tensor:
                    out = hvp_local(v) if hvp_local is not None else torch.zeros_like(v)
                    return self.coll.all_reduce(out)

                bar = self._bar(f"POLCA eigensolve at step {step}", None, unit=" HVPs")

                def shown(n: int, relative: Tensor) -> None:  # HVPs so far, and the residual against tol
                    bar.update(n - bar.n)
                    bar.set_postfix_str(f"relative residual {relative.max().item():.1e} (tol {self.lanczos_tol:g})")

                # half-precision models: the eigensolver works in float32
                work = theta.dtype if theta.dtype in (torch.float32, torch.float64) else torch.float32
                res = projected_hessian_eigs(
                    lambda v: hvp(v.to(theta.dtype)).to(work), self.space.dim, k,
                    existing, tol=self.lanczos_tol, seed=self.seed + self.n_basis, dtype=work, device=theta.device,
                    storage_device=self._storage(theta), memory_cap=self.dd.memory_cap,
                    progress=shown if bar is not None else None,
                )
                if bar is not None:
                    bar.close()
            info = {"n_hvp": res.n_hvp, "residual": (res.residuals / res.eigenvalues.abs().max()).max().item()}
            return res.eigenvectors.to(theta.dtype), res.eigenvalues, info
        if self.basis_kind == "random":
            gen = torch.Generator().manual_seed(self.seed + self.n_basis)
            vecs = self._new_rows(k, theta)
            for i in range(k):  # a row at a time: no [k, d] float64 draw
                vecs[i].copy_(torch.randn(self.space.dim, generator=gen, dtype=torch.float64))
            vecs = _orthonormalize(vecs, existing, "random", self.dd.memory_cap, theta.device)
        else:
            raw = self.basis_kind(self.module, step, existing)
            if not isinstance(raw, Tensor) or raw.dim() != 2 or raw.shape[1] != self.space.dim:
                raise ValueError(
                    f"basis: expected the callable to return a tensor [k, {self.space.dim}], got "
                    f"{type(raw).__name__}{list(raw.shape) if isinstance(raw, Tensor) else ''}"
                )
            vecs = self._new_rows(raw.shape[0], theta)
            vecs.copy_(raw.detach())  # a copy: the callable's tensor is left as it was
            vecs = _orthonormalize(vecs, existing, "returned", self.dd.memory_cap, theta.device)
        return vecs.to(theta.dtype), torch.full((vecs.shape[0],), float("nan"), dtype=torch.float64), {}

    def _bar(self, desc: str, total: int | None, unit: str = "it"):
        if not self.progress or self.coll.rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)

    def grow_basis(self, step: int) -> dict:
        """Add up to ``k`` vectors at the last snapshot and backfill them over every earlier snapshot."""
        k = min(self.k, self.max_basis - self.n_basis, self.space.dim - self.n_basis)
        if k <= 0 or self.prev is None:
            return {}
        start_time = time.perf_counter()
        with self._timed("eigensolve"):
            try:
                vecs, eigen, info = self._new_directions(step, k)
            except FloatingPointError as err:
                warnings.warn(f"POLCA: basis step at {step} skipped: {err}", RuntimeWarning, stacklevel=2)
                return {}
            if self.basis_kind == "hessian":
                # Lanczos vectors are orthogonal to the basis only to the working precision,
                # and float32 errors accumulate over basis steps: re-orthonormalise in float64
                vecs = _orthonormalize(vecs, self.basis, "eigen", self.dd.memory_cap, self.prev["theta"].device)
        solve_time = time.perf_counter() - start_time
        K0 = self.n_basis
        rows = slice(K0, K0 + vecs.shape[0])
        self._append_basis(vecs, self.prev["theta"])
        self.eigenvalues += eigen.tolist()
        self.basis_steps += [step] * vecs.shape[0]
        if self.writer is not None:
            with self._timed("io"):
                self.writer.write_basis(K0, vecs, eigen, np.full(vecs.shape[0], step))
        with self._timed("backfill"):
            self._backfill(rows, vecs, eigen)
        self._commit(self.n_snapshots, self.n_basis)
        # one series, not one a vector: the largest new eigenvalue at each basis step (with k > 1
        # also the smallest); every vector's is in the store's `eigenvalue` and the report's summary
        values = [float(e) for e in eigen.tolist()]
        metrics = {"polca/eigenvalue": values[0]} if values else {}
        if len(values) > 1:
            metrics["polca/eigenvalue_smallest_new"] = values[-1]
        metrics.update({f"polca/{k_}": v for k_, v in info.items()})
        metrics["polca/basis_size"] = self.n_basis
        metrics["polca/eigensolve_seconds"] = solve_time
        metrics["polca/backfill_seconds"] = time.perf_counter() - start_time - solve_time
        log.info(
            "POLCA: basis step at %d: %d vector(s), eigenvalues %s, %.1fs eigensolve, %.1fs backfill over %d snapshots",
            step, vecs.shape[0], [f"{e:.4g}" for e in eigen.tolist()], solve_time,
            metrics["polca/backfill_seconds"], self.n_snapshots,
        )
        self.log_metrics(metrics, step)
        return metrics

    def _weights(self, snapshot: int, like: Tensor) -> Tensor:
        """Parameters of an earlier snapshot, read from the store on rank 0 and broadcast."""
        with self._timed("io"):
            out = torch.empty_like(like)
            if self.writer is not None:
                out.copy_(torch.from_numpy(np.asarray(self.writer.read_weights(snapshot))).to(like))
            return self.coll.broadcast(out)

    def _backfill(self, rows: slice, vecs: Tensor, eigen: Tensor) -> None:
        """``g`` of the new vectors at every snapshot, and POLCA of every interval, in order."""
        last = self.n_snapshots - 1
        theta_last = self.prev["theta"]
        if self.writer is not None and last > 0:
            with self._timed("io"):
                self.writer.flush()
        bar = self._bar(f"POLCA backfill of {vecs.shape[0]} vector(s)", last + 1)
        previous = None
        for i in range(last + 1):
            theta = theta_last if i == last else self._weights(i, theta_last)
            with evaluation_mode(self.module):
                loss, g, c = self.derivatives(theta, vecs)
            current = {"theta": theta, "loss": loss, "g": g, "c": c}
            if self.writer is not None:
                with self._timed("io"):
                    self.writer.write_directional_grad(i, rows.start, g)
                    if c is not None:
                        self.writer.write_curvature(i, rows.start, c)
            if previous is not None:  # g, c here hold the new vectors only: rows 0.. locally
                self._interval(i - 1, previous, current, rows, slice(0, vecs.shape[0]), eigen)
            previous = current
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        self.prev["g"] = g if self.prev["g"] is None else torch.cat([self.prev["g"], g])
        if self.curvature:
            self.prev["c"] = c if self.prev["c"] is None else torch.cat([self.prev["c"], c])

    # ----------------------------------------------------------------- resume
    def restore(self, n_snapshots: int) -> None:
        """Continue a store whose first ``n_snapshots`` snapshots and basis are committed."""
        if n_snapshots == 0:
            return
        like = self._theta()
        self._theta_device = like.device
        K = 0
        if self.writer is not None:
            vectors, eigen, steps = self.writer.read_basis()
            K = len(eigen)
        K = int(self.coll.broadcast(torch.tensor([K], device=like.device)).item())
        if K:
            self._rows, self.basis = None, None
            row = torch.zeros(self.space.dim, dtype=like.dtype, device=like.device)
            for i in range(K):  # a row at a time through the model's device (NCCL broadcasts CUDA tensors only)
                if self.writer is not None:
                    row.copy_(torch.from_numpy(np.asarray(vectors[i])).to(row))
                self._append_basis(self.coll.broadcast(row)[None], like)
            meta = torch.zeros(2, K, dtype=torch.float64, device=like.device)
            if self.writer is not None:
                meta[0] = torch.from_numpy(np.asarray(eigen, dtype=np.float64))
                meta[1] = torch.from_numpy(np.asarray(steps, dtype=np.float64))
            meta = self.coll.broadcast(meta)
            self.eigenvalues = meta[0].tolist()
            self.basis_steps = [int(s) for s in meta[1].tolist()]
        self.n_snapshots = n_snapshots
        theta = self._weights(n_snapshots - 1, like)
        with evaluation_mode(self.module):
            loss, g, c = self.derivatives(theta, self.basis)
        self.prev = {"theta": theta, "loss": loss, "g": g, "c": c}
