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
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from polca_lightning.core.engine import DirectionalDerivatives
from polca_lightning.core.functional import ParameterSpace, evaluation_mode
from polca_lightning.core._streaming import RowStream, host_rows
from polca_lightning.core.hessian import orthonormalize_rows, projected_hessian_eigs
from polca_lightning.core.polca import coverage, needs_curvature, polca_interval
from polca_lightning.config import POLCAConfig
from polca_lightning.store import NullWriter, TokenIndex

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

    def barrier(self) -> None:
        """Wait until every rank is here."""


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

    def barrier(self) -> None:
        self._dist.barrier()


class POLCATracker:
    """Snapshots, basis growth, interval POLCA and backfill for one training run.

    Construction prepares the run before anything is written: it indexes the probe tokens
    (validating the probe data and the token labels), checks on one probe batch that an
    engine can differentiate the model and, with ``engine="auto"``, measures both engines'
    costs; only then does it open the writer.

    Args:
        module: the model being trained (read, never modified).
        token_loss: the token-loss contract.
        space: the selected parameters.
        probe_batches, hessian_batches: lists of batches, already on the model's device.
        config: the run's :class:`~polca_lightning.config.POLCAConfig`.
        open_writer: ``open_writer(tokens) -> writer``, called once the checks pass with the
            :class:`~polca_lightning.store.TokenIndex` of the probe tokens: a
            :class:`~polca_lightning.store.StoreWriter` where this process writes, a
            :class:`~polca_lightning.store.NullWriter` where it does not (``None``: a
            ``NullWriter``, for a tracker that writes nothing: it cannot backfill a basis step
            over earlier snapshots, whose weights it reads back from the store).
        collective: :class:`Collective` (single process) or :class:`TorchDistributed`.
        token_labels: optional ``batch -> {name: tensor[batch, positions]}``, each name a
            token coordinate.
        calibration: engine costs measured by an earlier run (a resumed run's checkpoint),
            used instead of measuring them again, so that a resumed run makes the same choices.
        log_metrics: ``callable(dict, step)`` for scalars; progress: show bars on long work
            (a snapshot's derivatives get one only where they take more than two seconds).
    """

    #: seconds a snapshot's derivatives run before their progress bar shows
    bar_delay = 2.0

    def __init__(
        self,
        module: nn.Module,
        token_loss,
        space: ParameterSpace,
        probe_batches: Sequence[Any],
        hessian_batches: Sequence[Any],
        config: POLCAConfig,
        *,
        open_writer: Callable[[TokenIndex], Any] | None = None,
        collective: Collective | None = None,
        token_labels: Callable[[Any], Mapping[str, Tensor]] | None = None,
        calibration: Mapping[str, float] | None = None,
        log_metrics: Callable[[dict, int], None] | None = None,
        progress: bool = True,
    ):
        if not isinstance(config, POLCAConfig):
            raise TypeError(f"config: expected a POLCAConfig, got {type(config).__name__}")
        self.config = config
        self.module, self.space = module, space
        self.coll = collective or Collective()
        self.log_metrics = log_metrics or (lambda metrics, step: None)
        self.progress = progress
        self.curvature = needs_curvature(config.order)
        self.token_loss = token_loss
        self.dd = DirectionalDerivatives(module, token_loss, space, engine=config.engine,
                                         memory_cap=config.memory_cap, compute_precision=config.compute_precision)
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
        # before the store exists: bad probe data, or a model no engine can differentiate,
        # leave nothing behind
        self.tokens = self._index_tokens(token_labels)
        with self._timed("setup"):
            self._check_engine(calibration)
        self.writer = open_writer(self.tokens) if open_writer is not None else NullWriter()

    @property
    def calibration(self) -> dict | None:
        """The engine costs measured at the start (``None`` unless ``engine="auto"``)."""
        return self.dd.calibration

    def _index_tokens(self, token_labels) -> TokenIndex:
        """Which positions of the probe data are tokens, with their coordinates; validates the
        probe data and the labels on the way."""
        fn = self.dd.fn
        theta = self._theta()
        seq, pos, tgt, labels, offset = [], [], [], {}, 0
        with evaluation_mode(self.module), torch.no_grad():
            for batch in self.probe:
                loss, mask, target = fn(theta, batch)
                b, p = mask.nonzero(as_tuple=True)
                seq.append(b + offset)
                pos.append(p)
                tgt.append(target[mask] if target is not None else torch.full_like(b, -1))
                if token_labels is not None:
                    for name, value in dict(token_labels(batch)).items():
                        if not isinstance(value, Tensor) or value.shape != mask.shape:
                            raise ValueError(
                                f"token_labels: expected {name!r} as a tensor of shape {list(mask.shape)} "
                                f"(like the loss), got {type(value).__name__}"
                                f"{list(value.shape) if isinstance(value, Tensor) else ''}"
                            )
                        labels.setdefault(name, []).append(value[mask])
                offset += mask.shape[0]
        if sum(len(s) for s in seq) == 0:
            raise ValueError("probe_data: every token is masked; there is no loss-bearing token to decompose")
        cat = lambda parts: torch.cat(parts).cpu().numpy()  # noqa: E731
        return TokenIndex(cat(seq), cat(pos), cat(tgt), {k: cat(v) for k, v in labels.items()})

    def _check_engine(self, calibration: Mapping[str, float] | None) -> None:
        """One direction on one probe batch, so that an op neither engine handles fails here;
        with ``engine="auto"``, the engines' costs (``calibration``, or measured)."""
        theta = self._theta()
        v = torch.zeros(1, self.space.dim, dtype=theta.dtype, device=theta.device)
        v[0, 0] = 1.0
        self.dd(theta, self.probe[:1], v, curvature=self.curvature)
        if self.config.engine != "auto":
            return
        if calibration:
            self.dd.calibration = dict(calibration)
        elif not self.dd.disabled:
            # measured costs make the engine choice right on this machine and model; rank 0's
            # measurement is used everywhere so that every rank computes the same way
            with evaluation_mode(self.module):
                cost = self.dd.calibrate(theta, self.probe[0], max_directions=min(16, self.config.max_basis))
            keys = sorted(cost)
            shared = self.coll.broadcast(torch.tensor([cost[k] for k in keys], dtype=torch.float64, device=theta.device))
            cost = self.dd.calibration = dict(zip(keys, shared.tolist()))
            log.info("POLCA: engine costs per probe batch (s): %s", {k: f"{v:.3g}" for k, v in cost.items()})

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
        return like.device if self.config.basis_on_device else torch.device("cpu")

    def _new_rows(self, n: int, like: Tensor) -> Tensor:
        """``[n, d]`` where the basis lives (pinned host memory when it is off a CUDA device)."""
        if self.config.basis_on_device:
            return torch.empty(n, self.space.dim, dtype=like.dtype, device=like.device)
        return host_rows(n, self.space.dim, like.dtype, pin=like.device.type == "cuda")

    def _append_basis(self, vecs: Tensor, like: Tensor) -> None:
        """Rows ``vecs`` after the basis, in storage allocated once for ``max_basis`` rows."""
        if self._rows is None:
            self._rows = self._new_rows(min(self.config.max_basis, self.space.dim), like)
        K0 = self.n_basis
        self._rows[K0 : K0 + vecs.shape[0]].copy_(vecs)  # across devices where the basis is in host memory
        self.basis = self._rows[: K0 + vecs.shape[0]]

    def derivatives(self, theta: Tensor, directions: Tensor | None,
                    desc: str | None = None) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Loss ``[T]``, ``g`` and ``c`` ``[K, T]`` over all probe tokens (gathered in probe order).

        ``desc``: the title of a progress bar over the probe batches, shown where the work
        takes more than :attr:`bar_delay` seconds.
        """
        curvature = self.curvature and directions is not None
        results = [[] for _ in self.my_probe]
        bar = None
        if desc is not None:
            total = len(self.my_probe) * self.dd.n_direction_chunks(directions, theta)
            bar = self._bar(desc, total, unit=" batches", delay=self.bar_delay)
        # a basis in host memory comes to the device a chunk of rows at a time, each copied once
        for chunk in self.dd.direction_chunks(directions, theta):
            for i, batch in enumerate(self.my_probe):  # one batch at a time, so ranks interleave in probe order
                results[i].append(self.dd(theta, [batch], chunk, curvature=curvature))
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
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
            self.config.order,
            start["g"][local],
            delta,
            g_end=end["g"][local],
            eigenvalue=eigen.to(delta),
            curvature=None if start["c"] is None else start["c"][local],
        )
        self.guarded += int(out.guarded.sum())
        with self._timed("io"):
            self.writer.write_interval(index, rows.start, delta, out.values, out.first)
        return {"values": out.values, "first": out.first}

    # -------------------------------------------------------------- lifecycle
    def snapshot(self, step: int) -> dict:
        """Record snapshot ``n_snapshots`` at ``step`` and allocate the interval it closes."""
        with self._timed("snapshot"):
            theta = self._theta()
            self._theta_device = theta.device
        j = self.n_snapshots
        with self._timed("interval"), evaluation_mode(self.module):
            loss, g, c = self.derivatives(theta, self.basis, desc=f"POLCA snapshot {j} at step {step}")
        now = {"theta": theta, "loss": loss, "g": g, "c": c}
        metrics = {}
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
        if self.config.order == "second":
            metrics["polca/second_order_guarded"] = self.guarded  # Eq. 5 denominators clamped so far
        self._commit(j + 1, self.n_basis)
        self.n_snapshots = j + 1
        self.prev = now
        if metrics:
            self.log_metrics(metrics, step)
        return metrics

    def _commit(self, n_snapshots: int, n_basis: int) -> None:
        with self._timed("io"):
            self.writer.commit(n_snapshots, n_basis)

    def _new_directions(self, step: int, k: int) -> tuple[Tensor, Tensor, dict]:
        theta = self.prev["theta"]
        existing = self.basis
        if self.config.basis == "hessian":
            fn = self.dd.fn
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
                    bar.set_postfix_str(f"relative residual {relative.max().item():.1e} (tol {self.config.lanczos_tol:g})")

                # half-precision models: the eigensolver works in float32
                work = theta.dtype if theta.dtype in (torch.float32, torch.float64) else torch.float32
                res = projected_hessian_eigs(
                    lambda v: hvp(v.to(theta.dtype)).to(work), self.space.dim, k,
                    existing, tol=self.config.lanczos_tol, seed=self.config.seed + self.n_basis, dtype=work, device=theta.device,
                    storage_device=self._storage(theta), memory_cap=self.dd.memory_cap,
                    progress=shown if bar is not None else None,
                )
                if bar is not None:
                    bar.close()
            info = {"n_hvp": res.n_hvp, "residual": (res.residuals / res.eigenvalues.abs().max()).max().item()}
            return res.eigenvectors.to(theta.dtype), res.eigenvalues, info
        if self.config.basis == "random":
            gen = torch.Generator().manual_seed(self.config.seed + self.n_basis)
            vecs = self._new_rows(k, theta)
            for i in range(k):  # a row at a time: no [k, d] float64 draw
                vecs[i].copy_(torch.randn(self.space.dim, generator=gen, dtype=torch.float64))
            vecs = orthonormalize_rows(vecs, existing, memory_cap=self.dd.memory_cap, device=theta.device, what="random")
        else:
            raw = self.config.basis(self.module, step, existing)
            if not isinstance(raw, Tensor) or raw.dim() != 2 or raw.shape[1] != self.space.dim:
                raise ValueError(
                    f"basis: expected the callable to return a tensor [k, {self.space.dim}], got "
                    f"{type(raw).__name__}{list(raw.shape) if isinstance(raw, Tensor) else ''}"
                )
            vecs = self._new_rows(raw.shape[0], theta)
            vecs.copy_(raw.detach())  # a copy: the callable's tensor is left as it was
            vecs = orthonormalize_rows(vecs, existing, memory_cap=self.dd.memory_cap, device=theta.device, what="returned")
        return vecs.to(theta.dtype), torch.full((vecs.shape[0],), float("nan"), dtype=torch.float64), {}

    def _bar(self, desc: str, total: int | None, unit: str = "it", delay: float = 0.0):
        """A tqdm bar on rank 0 with ``progress`` (else ``None``); ``delay``: seconds before it shows."""
        if not self.progress or self.coll.rank != 0:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True, delay=delay)

    def grow_basis(self, step: int) -> dict:
        """Add up to ``k`` vectors at the last snapshot and backfill them over every earlier snapshot."""
        k = min(self.config.k, self.config.max_basis - self.n_basis, self.space.dim - self.n_basis)
        if k <= 0 or self.prev is None:
            return {}
        start_time = time.perf_counter()
        with self._timed("eigensolve"):
            try:
                vecs, eigen, info = self._new_directions(step, k)
            except FloatingPointError as err:
                warnings.warn(f"POLCA: basis step at {step} skipped: {err}", RuntimeWarning, stacklevel=2)
                return {}
            if self.config.basis == "hessian":
                # Lanczos vectors are orthogonal to the basis only to the working precision,
                # and float32 errors accumulate over basis steps: re-orthonormalise in float64
                vecs = orthonormalize_rows(vecs, self.basis, memory_cap=self.dd.memory_cap, device=self.prev["theta"].device,
                                           what="eigen")
        solve_time = time.perf_counter() - start_time
        K0 = self.n_basis
        rows = slice(K0, K0 + vecs.shape[0])
        self._append_basis(vecs, self.prev["theta"])
        self.eigenvalues += eigen.tolist()
        self.basis_steps += [step] * vecs.shape[0]
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
        if not self.writer.writes and self.coll.world_size == 1:
            raise RuntimeError(
                "POLCA: a basis step after the first snapshot needs the earlier snapshots' weights, which only "
                "the store holds; this tracker writes no store (open_writer=None)"
            )
        with self._timed("io"):
            out = torch.empty_like(like)
            if self.writer.writes:
                out.copy_(torch.from_numpy(np.asarray(self.writer.read_weights(snapshot))).to(like))
            return self.coll.broadcast(out)

    def _backfill(self, rows: slice, vecs: Tensor, eigen: Tensor) -> None:
        """``g`` of the new vectors at every snapshot, and POLCA of every interval, in order."""
        last = self.n_snapshots - 1
        theta_last = self.prev["theta"]
        if last > 0:
            with self._timed("io"):
                self.writer.flush()
        bar = self._bar(f"POLCA backfill of {vecs.shape[0]} vector(s)", last + 1)
        previous = None
        for i in range(last + 1):
            theta = theta_last if i == last else self._weights(i, theta_last)
            with evaluation_mode(self.module):
                loss, g, c = self.derivatives(theta, vecs)
            current = {"theta": theta, "loss": loss, "g": g, "c": c}
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
        if self.writer.writes:
            vectors, eigen, steps = self.writer.read_basis()
            K = len(eigen)
        K = int(self.coll.broadcast(torch.tensor([K], device=like.device)).item())
        if K:
            self._rows, self.basis = None, None
            row = torch.zeros(self.space.dim, dtype=like.dtype, device=like.device)
            for i in range(K):  # a row at a time through the model's device (NCCL broadcasts CUDA tensors only)
                if self.writer.writes:
                    row.copy_(torch.from_numpy(np.asarray(vectors[i])).to(row))
                self._append_basis(self.coll.broadcast(row)[None], like)
            meta = torch.zeros(2, K, dtype=torch.float64, device=like.device)
            if self.writer.writes:
                meta[0] = torch.from_numpy(np.asarray(eigen, dtype=np.float64))
                meta[1] = torch.from_numpy(np.asarray(steps, dtype=np.float64))
            meta = self.coll.broadcast(meta)
            self.eigenvalues = meta[0].tolist()
            self.basis_steps = [int(s) for s in meta[1].tolist()]
        self.n_snapshots = n_snapshots
        theta = self._weights(n_snapshots - 1, like)
        with evaluation_mode(self.module):
            loss, g, c = self.derivatives(theta, self.basis, desc=f"POLCA resume at snapshot {n_snapshots - 1}")
        self.prev = {"theta": theta, "loss": loss, "g": g, "c": c}
