"""Directional derivatives of every probe token's loss.

For parameters ``theta`` ``[d]``, probe batches and K directions ``V`` ``[K, d]``:

- ``loss[x]``   = ``l_x(theta)``,                         ``[T]``
- ``g[k, x]``   = ``<V_k, grad l_x(theta)>``,              ``[K, T]``
- ``c[k, x]``   = ``V_kᵀ (hess l_x(theta)) V_k`` (optional), ``[K, T]``

Two engines compute the same numbers:

- ``forward``: one JVP per direction gives ``g`` for every token at once (a nested JVP
  gives ``c``); vmapped over chunks of directions. Cost grows with K.
- ``reverse``: one backward pass per loss-bearing position, projected from activations
  (:mod:`polca_lightning.core._ghost`) where every selected parameter allows it, else
  per-sample Jacobians (:mod:`polca_lightning.core._jacobians`), projected on all K
  directions at once. Cost grows with loss-bearing positions per sequence.

The token loss always gets a real batch (the probe batch, or a batch of one sliced from
it); where an engine vmaps (over directions, or over samples as batches of one) and the
model fails under the vmap, the engine runs the same computation without it.
``engine="auto"`` chooses with :func:`estimate_cost`, or with measured costs after
:meth:`DirectionalDerivatives.calibrate`; an engine that fails on a model (while
calibrated or later) is dropped with one warning that names it, and if neither can run,
the error names the op, where the model calls it, and what to change.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.func import jvp, vmap

from polca_lightning.core._engine_errors import EngineError, engine_error, first_line, is_ad_gap
from polca_lightning.core._ghost import SKINNY_PRODUCT_PENALTY, Unsupported, ghost_plan, ghost_reverse
from polca_lightning.core._jacobians import PerSampleJacobians, agree, take
from polca_lightning.core._streaming import orthonormalize_rows
from polca_lightning.core._precision import PRECISIONS, check_compute_precision, is_reduced, precision_scope
from polca_lightning.core.functional import FunctionalTokenLoss, ParameterSpace, evaluation_mode
from polca_lightning.core.losses import TokenLoss

__all__ = ["DirectionalDerivatives", "DerivativeResult", "EngineError", "estimate_cost", "PRECISIONS", "ENGINES",
           "check_engine", "check_memory_cap"]

EngineError.__module__ = __name__  # public here

log = logging.getLogger(__name__)

ENGINES = ("auto", "forward", "reverse")


def check_engine(value: Any) -> str:
    """``value`` if it is one of :data:`ENGINES`.

    Raises:
        ValueError: anything else, naming the argument and the choices.
    """
    if not isinstance(value, str) or value not in ENGINES:
        raise ValueError(f"engine: expected one of {ENGINES}, got {value!r}")
    return value


def check_memory_cap(value: Any) -> int:
    """``value`` if it is a positive int (bytes).

    Raises:
        ValueError: anything else.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"memory_cap: expected a positive int (bytes), got {value!r}")
    return value

# Cost of each engine in plain forward passes over the probe set, measured by
# benchmarks/engine.py on 2 CPU cores (see the README's table). ``auto`` replaces them
# with measured costs once calibrate() has run, as the callback does before training.
FORWARD_PASSES_PER_DIRECTION = 3.0  # jvp: a forward pass carrying a tangent
REVERSE_PASSES_PER_POSITION = 2.0  # one backward pass over the batch per loss-bearing position
# Without the activation path (a parameter no module _ghost.py knows holds) reverse mode
# forms per-sample Jacobians: 7-20 forward passes per loss-bearing position vmapped,
# measured on 2 CPU cores (GPT-2 and Llama from transformers at d 64-128 before they had
# the activation path, the arithmetic transformer at d 128; 200 sequences of 12 tokens,
# 4 loss-bearing, K 1-16), and more on real batches of one (benchmarks/engine_families.py).
JACOBIAN_PASSES_PER_POSITION = 10.0


# Relative tolerance of the engines' self-checks (two computations of the same numbers, e.g.
# the activation path against per-sample Jacobians): float32 rounding, or bfloat16's
# (8-bit mantissa, ~4e-3 per op) under autocast, where the two differ by ~1e-2 of the scale.
_CHECK_RTOL = {"float32": 1e-4, "tf32": 1e-2, "bf16": 5e-2}
# ... and at least this many times eps sqrt(d) (eps: float32's unit roundoff): g = <grad l_x, v>
# is a sum over the d parameters, and along a random unit direction the rounding differences
# of two float32 computations of it, relative to g, grow like eps sqrt(d): the largest, relative
# to the largest g, measured 0.05-0.15 eps sqrt(d) from 0.1M to 12.6M parameters, where the fixed
# 1e-4 refused the activation path in 2 of 3 models (benchmarks/check_tolerance.py, docs/engines.md).
_EPS32, _DOT_SAFETY = 2.0**-24, 8.0


def check_rtol(precision: str, dim: int) -> float:
    """Relative tolerance of the checks that compare two computations of ``g`` over ``dim``
    parameters: the precision's own, or ``8 eps sqrt(dim)`` where that is larger (float32's
    rounding of a ``dim``-term dot product)."""
    return max(_CHECK_RTOL[check_compute_precision(precision)], _DOT_SAFETY * _EPS32 * math.sqrt(dim))


class _NoTokens(ValueError):
    """Every probe token is masked (the same for every engine: no fallback)."""


@dataclass
class DerivativeResult:
    """What :class:`DirectionalDerivatives` computes for one parameter vector.

    Attributes:
        loss: ``[T]`` per-token loss.
        g: ``[K, T]`` directional derivatives (``None`` when no directions were given).
        c: ``[K, T]`` second directional derivatives, when asked for.
        engine: the engine that computed ``g`` and ``c``.
    """

    loss: Tensor
    g: Tensor | None
    c: Tensor | None
    engine: str


def estimate_cost(n_directions: int, positions_per_sequence: float, sequence_length: int, curvature: bool,
                  activations: bool = True) -> dict:
    """Estimated cost of each engine, in plain forward passes over the probe set.

    ``forward``: ``FORWARD_PASSES_PER_DIRECTION`` per direction (twice that with curvature).
    ``reverse`` with ``activations`` (every selected parameter belongs to a module the
    activation path handles): a backward pass per loss-bearing position, plus the
    projection: either ``a V_Wᵀ`` once (about one forward pass per direction) or
    per-sample gradients at every position (``SKINNY_PRODUCT_PENALTY`` forward passes,
    plus ``K / sequence_length`` for the product with K directions), whichever is
    cheaper. Without: per-sample Jacobians, ``JACOBIAN_PASSES_PER_POSITION`` per
    loss-bearing position plus the same product. With curvature the reverse engine needs
    per-sample Jacobians and a JVP per direction.
    """
    k = max(n_directions, 1)
    p = positions_per_sequence
    forward = FORWARD_PASSES_PER_DIRECTION * k * (2.0 if curvature else 1.0)
    product = k / max(sequence_length, 1)  # per position: K directions times each per-sample gradient
    if activations:
        reverse = p * REVERSE_PASSES_PER_POSITION + min(k, p * (SKINNY_PRODUCT_PENALTY + product))
    else:
        reverse = p * (JACOBIAN_PASSES_PER_POSITION + product)
    if curvature:
        reverse = p * (6.0 + product) * (1.0 + k)
    return {"forward": forward, "reverse": reverse}


class DirectionalDerivatives:
    """Per-token losses and their derivatives along K directions, by the cheaper engine.

    Args:
        module: the user's module; evaluated in eval mode and restored afterwards.
        token_loss: ``(module, batch) -> (loss, mask[, target])``.
        space: which parameters ``theta`` stands for.
        engine: ``"auto"`` (cost model), ``"forward"`` or ``"reverse"``.
        memory_cap: bytes of intermediate results one chunk may use (directions in forward
            mode, samples in reverse mode are chunked to fit). Directions given on another
            device than ``theta`` (a basis in host memory) are copied to ``theta``'s device a
            chunk of rows at a time, at most half of ``memory_cap`` (one row at least), and the
            work on each chunk gets what is left of the cap.
        compute_precision: ``"float32"`` (default), ``"tf32"`` (CUDA only; a no-op elsewhere)
            or ``"bf16"`` (autocast, CUDA and CPU): the arithmetic of ``g`` and ``c``
            (:mod:`polca_lightning.core._precision`). The loss is always computed in full float32,
            by a plain forward pass of its own when the precision is reduced.

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
        >>> space = ParameterSpace.from_module(model)
        >>> dd = DirectionalDerivatives(model, causal_lm_token_loss, space)
        >>> theta = space.flatten(model)
        >>> V = torch.linalg.qr(torch.randn(space.dim, 3)).Q.T   # [3, d] orthonormal
        >>> out = dd(theta, [torch.randint(0, 10, (4, 6))], V)
        >>> out.g.shape                                          # [K, tokens]: 4 sequences x 5 tokens
        torch.Size([3, 20])
    """

    def __init__(
        self,
        module: nn.Module,
        token_loss: TokenLoss,
        space: ParameterSpace,
        *,
        engine: str = "auto",
        memory_cap: int = 1 << 30,
        compute_precision: str = "float32",
    ):
        self.module = module
        self.space = space
        self.engine = check_engine(engine)
        self.memory_cap = check_memory_cap(memory_cap)
        self._work_cap = memory_cap  # what the engines' chunks may use (less while directions are streamed)
        self.compute_precision = check_compute_precision(compute_precision)
        self.fn = FunctionalTokenLoss(module, token_loss, space)
        self._disabled: dict[str, str] = {}  # engine -> why it cannot run this model (see `disabled`)
        self.calibration: dict | None = None  # measured costs, see calibrate()
        self._activation_cache: dict = {}
        # reverse mode from activations where every selected parameter allows it; checked
        # against per-sample Jacobians on the first batch before it is trusted
        self._ghost = ghost_plan(module, space.names)
        self._ghost_checked = False
        # reverse mode where the activation path does not apply; its consistency checks compare two
        # computations of the same numbers, which differ by bfloat16 rounding under autocast
        self._jacobians = PerSampleJacobians(self.fn, rtol=_CHECK_RTOL[self.compute_precision],
                                             g_rtol=check_rtol(self.compute_precision, space.dim))
        self._vmap_directions = True  # forward mode: False once the model failed under a vmap over directions

    # ------------------------------------------------------------------ public
    def __call__(
        self,
        theta: Tensor,
        batches: Iterable[Any],
        directions: Tensor | None = None,
        *,
        curvature: bool = False,
    ) -> DerivativeResult:
        """Compute ``loss`` ``[T]``, ``g`` ``[K, T]`` and optionally ``c`` ``[K, T]`` at ``theta``.

        Raises:
            ValueError: bad shapes, or no loss-bearing token in the probe batches.
            EngineError: neither engine can differentiate the model.
        """
        if theta.dim() != 1 or theta.shape[0] != self.space.dim:
            raise ValueError(f"theta: expected shape [{self.space.dim}], got {list(theta.shape)}")
        if directions is not None and (directions.dim() != 2 or directions.shape[1] != self.space.dim):
            raise ValueError(
                f"directions: expected shape [K, {self.space.dim}], got {list(directions.shape)}"
            )
        if directions is not None and directions.shape[0] == 0:
            directions = None
        theta = theta.detach()
        batches = list(batches)
        if not batches:
            raise ValueError("probe data: expected at least one batch, got none")
        with evaluation_mode(self.module, second_order=curvature):
            if directions is None:
                return self._loss_only(theta, batches)
            engine = self.choose(theta, batches, directions.shape[0], curvature)
            with precision_scope(self.compute_precision, theta.device.type):
                result = self._streamed(engine, theta, batches, directions, curvature)
            if is_reduced(self.compute_precision, theta.device.type):
                result.loss = self._loss_only(theta, batches).loss  # the loss itself in full float32
            return result

    @staticmethod
    def _on_other_device(directions: Tensor, theta: Tensor) -> bool:
        return directions.device != theta.device

    def _rows_per_chunk(self, theta: Tensor) -> int:
        return max(1, (self.memory_cap // 2) // (self.space.dim * theta.element_size()))

    def n_direction_chunks(self, directions: Tensor | None, theta: Tensor) -> int:
        """How many chunks :meth:`direction_chunks` yields for ``directions``."""
        if directions is None or not self._on_other_device(directions, theta):
            return 1
        return -(-directions.shape[0] // self._rows_per_chunk(theta))

    def direction_chunks(self, directions: Tensor | None, theta: Tensor) -> Iterator[Tensor | None]:
        """``directions`` on ``theta``'s device: as they are, or a chunk of rows at a time.

        Directions already there are yielded whole (``None`` is yielded as it is). Others (a
        basis in host memory) are copied a chunk of rows at a time, each at most half of
        ``memory_cap`` (one row at least); while a chunk is on the device, the engines' own
        chunks get what is left of the cap. A caller with several batches loops over them
        inside, so that each row is copied once.
        """
        if directions is None or not self._on_other_device(directions, theta):
            yield directions
            return
        rows = self._rows_per_chunk(theta)
        self._work_cap = max(1, self.memory_cap - rows * self.space.dim * theta.element_size())
        try:
            for start in range(0, directions.shape[0], rows):
                yield directions[start : start + rows].to(device=theta.device, dtype=theta.dtype, non_blocking=True)
        finally:
            self._work_cap = self.memory_cap

    def _streamed(self, engine: str, theta: Tensor, batches, directions: Tensor, curvature: bool) -> DerivativeResult:
        """:meth:`_run` over :meth:`direction_chunks`, the results concatenated along the directions."""
        if not self._on_other_device(directions, theta):
            return self._run(engine, theta, batches, directions.to(dtype=theta.dtype), curvature)
        parts = [self._run(engine, theta, batches, v, curvature) for v in self.direction_chunks(directions, theta)]
        return DerivativeResult(
            parts[0].loss, torch.cat([p.g for p in parts]),
            torch.cat([p.c for p in parts]) if curvature else None, parts[-1].engine,
        )

    def choose(self, theta: Tensor, batches: Sequence[Any], n_directions: int, curvature: bool) -> str:
        """The engine to use for this workload (the fixed one, or the cost model's pick).

        After :meth:`calibrate`, the pick uses the measured costs; before, :func:`estimate_cost`.
        """
        if self.engine != "auto":
            return self.engine
        k = max(n_directions, 1)
        if self.calibration is not None:
            c = self.calibration
            cost = {"forward": c["forward_per_direction"] * k * (2.0 if curvature else 1.0),
                    "reverse": (c["reverse_base"] + c["reverse_per_direction"] * k) * ((1.0 + k) if curvature else 1.0)}
        else:
            with torch.no_grad():
                _, mask, _ = self.fn(theta, batches[0])
            per_seq = float(mask.any(0).sum())  # positions the reverse engine differentiates
            cost = estimate_cost(k, per_seq, mask.shape[1], curvature, activations=self._ghost is not None)
        usable = {e: c for e, c in cost.items() if e not in self._disabled}
        return min(usable or cost, key=(usable or cost).get)

    @property
    def disabled(self) -> dict[str, str]:
        """Engines dropped from ``auto``'s choice on this model, with the first line of why."""
        return dict(self._disabled)

    def calibrate(self, theta: Tensor, batch: Any, max_directions: int = 16) -> dict:
        """Measure both engines on one batch, so that ``auto`` picks by measured cost.

        Times forward mode with a few directions (seconds per direction) and reverse mode
        with 1 and ``max_directions`` directions (a fixed part and a per-direction part),
        best of two runs each, and keeps the result in :attr:`calibration`. Reverse mode is
        first run twice on an eighth of the batch (two samples at least; a warm-up with its
        one-time checks, then timed); where that already costs, scaled to the batch, more
        than 4x forward mode with ``max_directions`` directions, the scaled time is kept
        (plus forward mode's cost per direction, so that no K picks it) instead of timing
        the batch. An engine that fails here is dropped from the choice,
        with one warning naming it; its cost is ``inf``. The random directions are d-vectors
        on the model's device: at most as many as ``memory_cap`` holds (two at least, so
        that a cost per direction can be told from a fixed one, unless ``max_directions`` is 1).

        Returns:
            ``{"forward_per_direction", "reverse_base", "reverse_per_direction"}`` in seconds.

        Raises:
            EngineError: neither engine can run on the batch.
        """
        import time

        gen = torch.Generator().manual_seed(0)
        work = theta.dtype if theta.dtype in (torch.float32, torch.float64) else torch.float32
        fits = self.memory_cap // (self.space.dim * torch.empty((), dtype=work).element_size())
        max_directions = min(max_directions, max(2, fits))
        big = torch.empty(max_directions, self.space.dim, dtype=work, device=theta.device)
        for row in big:  # a row at a time, orthonormalised in chunks: no [kmax, d] float64 copy
            row.copy_(torch.randn(self.space.dim, generator=gen, dtype=torch.float64))
        big = orthonormalize_rows(big, memory_cap=self.memory_cap).to(theta)  # [kmax, d]

        def seconds(engine: str, v: Tensor, part: Any = batch, repeat: int = 2) -> float:
            best = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                with evaluation_mode(self.module), precision_scope(self.compute_precision, theta.device.type):
                    self._compute(engine, theta.detach(), [part], v, False)
                if theta.is_cuda:
                    torch.cuda.synchronize(theta.device)
                best = min(best, time.perf_counter() - start)
            return best

        inf = float("inf")
        fwd, base, per_dir = inf, inf, inf
        errors: dict[str, BaseException] = {}
        few = min(4, max_directions)
        if "forward" not in self._disabled:
            try:
                fwd = seconds("forward", big[:few]) / few
            except _NoTokens:
                raise
            except Exception as err:  # noqa: BLE001 - whatever stops an engine drops it
                errors["forward"] = err
        if "reverse" not in self._disabled:
            try:
                with torch.no_grad(), evaluation_mode(self.module):
                    n = self.fn(theta, batch)[1].shape[0]
                m = min(n, max(2, n // 8))  # two samples at least: a batch, not a sample alone
                part = take(batch, n, slice(0, m))
                seconds("reverse", big[:1], part, repeat=1)  # warm-up: the one-time checks
                estimate = seconds("reverse", big[:1], part, repeat=1) * n / m
                if estimate > 4 * fwd * max_directions:  # hopeless at any K measured here
                    base, per_dir = estimate, fwd  # and at any K at all: never below forward mode
                else:
                    r1, rk = seconds("reverse", big[:1]), seconds("reverse", big)
                    per_dir = max(rk - r1, 0.0) / max(max_directions - 1, 1)
                    base = max(r1 - per_dir, 0.0)
            except _NoTokens:
                raise
            except Exception as err:  # noqa: BLE001
                errors["reverse"] = err
        if len(errors) + len(self._disabled) >= 2:
            raise engine_error({**errors}, None) from next(iter(errors.values()), None)
        for name, err in errors.items():
            self._drop(name, err, "while being calibrated")
        self.calibration = {"forward_per_direction": fwd, "reverse_base": base, "reverse_per_direction": per_dir}
        return self.calibration

    # ---------------------------------------------------------------- internal
    def _drop(self, name: str, err: BaseException, when: str = "") -> None:
        """Take an engine out of ``auto``'s choice, with one warning that names it."""
        if name in self._disabled:
            return
        self._disabled[name] = first_line(err)
        other = "reverse" if name == "forward" else "forward"
        warnings.warn(
            f"POLCA: the {name} engine cannot differentiate this model{' ' + when if when else ''} "
            f"({self._disabled[name]}); using the {other} engine",
            RuntimeWarning,
            stacklevel=4,
        )

    def _run(self, engine: str, theta, batches, directions, curvature) -> DerivativeResult:
        order = [engine] + ([e for e in ("forward", "reverse") if e != engine] if self.engine == "auto" else [])
        errors: dict[str, BaseException] = {}
        for name in order:
            if name in self._disabled and name != order[-1]:
                continue
            try:
                result = self._compute(name, theta, batches, directions, curvature)
            except _NoTokens:
                raise
            except Exception as err:  # noqa: BLE001 - an engine that fails falls back to the other
                errors[name] = err
                continue
            for failed, err in errors.items():  # said once the other engine has run
                self._drop(failed, err)
            return result
        first = next(iter(errors.values()))
        if not any(is_ad_gap(e) for e in errors.values()):
            raise first  # the same failure in every engine: the model's or the token loss's own error
        raise engine_error(errors, None if self.engine == "auto" else self.engine) from first

    def _loss_only(self, theta: Tensor, batches) -> DerivativeResult:
        losses = []
        with torch.no_grad():
            for batch in batches:
                loss, mask, _ = self.fn(theta, batch)
                losses.append(loss[mask])
        loss = torch.cat(losses)
        if loss.numel() == 0:
            raise _NoTokens("probe data: every token is masked; there is no loss-bearing token to decompose")
        return DerivativeResult(loss.detach(), None, None, "none")

    def _compute(self, engine, theta, batches, directions, curvature) -> DerivativeResult:
        step = self._forward_batch if engine == "forward" else self._reverse_batch
        losses, gs, cs = [], [], []
        for batch in batches:
            loss, g, c = step(theta, batch, directions, curvature)
            losses.append(loss)
            gs.append(g)
            cs.append(c)
        loss = torch.cat(losses)
        if loss.numel() == 0:
            raise _NoTokens("probe data: every token is masked; there is no loss-bearing token to decompose")
        g = torch.cat(gs, 1).detach().to(theta.dtype)  # autocast may leave bfloat16 tangents
        c = torch.cat(cs, 1).detach().to(theta.dtype) if curvature else None
        return DerivativeResult(loss.detach().to(theta.dtype), g, c, engine)

    def _activation_bytes(self, theta: Tensor, batch) -> int:
        """Bytes of every submodule's output in one plain forward pass (a memory estimate).

        Measured once per batch shape and remembered.
        """
        key = tuple((tuple(t.shape), t.dtype) for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, Tensor))
        if key in self._activation_cache:
            return self._activation_cache[key]
        total = 0

        def hook(_mod, _inp, out):
            nonlocal total
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, Tensor):
                    total += t.numel() * t.element_size()

        handles = [m.register_forward_hook(hook) for m in self.module.modules()]
        try:
            with torch.no_grad():
                self.fn(theta, batch)
        finally:
            for h in handles:
                h.remove()
        self._activation_cache[key] = max(total, 1)
        return self._activation_cache[key]

    def _over_directions(self, f, v: Tensor):
        """``f`` over the rows of ``v`` ``[kc, d]``: vmapped, or one at a time where the model fails under vmap.

        The model always gets the real batch; under the vmap only the tangents are batched, and
        a model that writes them into a tensor it created itself fails there.
        """
        if self._vmap_directions:
            try:
                return vmap(f)(v)
            except Exception as err:  # noqa: BLE001 - the loop runs what the model runs, or raises
                log.info("POLCA: forward mode vmapped over directions failed (%s); one direction at a time",
                         first_line(err))
                self._vmap_directions = False
        try:
            outs = [f(row) for row in v]
        except Exception:
            self._vmap_directions = True  # the loop fails too: not the vmap's fault
            raise
        return tuple(torch.stack(parts) for parts in zip(*outs))

    def _forward_batch(self, theta, batch, directions, curvature):
        """Forward mode: a chunk of directions at a time, each a (nested) JVP."""
        fn = self.fn

        def loss_and_mask(t):
            loss, mask, _ = fn(t, batch)
            return loss, mask

        def first(v):
            loss, g, mask = jvp(loss_and_mask, (theta,), (v,), has_aux=True)
            return loss, g, g, mask  # (g twice keeps one shape for both paths)

        def second(v):
            def g_of(t):
                loss, g, mask = jvp(loss_and_mask, (t,), (v,), has_aux=True)
                return g, (loss, mask)

            g, c, (loss, mask) = jvp(g_of, (theta,), (v,), has_aux=True)
            return loss, g, c, mask

        act = self._activation_bytes(theta, batch) * (6 if curvature else 3)
        chunk = max(1, min(directions.shape[0], self._work_cap // act))
        gs, cs = [], []
        for start in range(0, directions.shape[0], chunk):
            v = directions[start : start + chunk]  # [kc, d]
            loss, g, c, mask = self._over_directions(second if curvature else first, v)  # [kc, B, P] each
            loss, mask = loss[0], mask[0]  # the same for every direction
            gs.append(g[:, mask])  # [kc, tokens of this batch]
            if curvature:
                cs.append(c[:, mask])
        return loss[mask], torch.cat(gs), torch.cat(cs) if curvature else None

    def _reverse_batch(self, theta, batch, directions, curvature):
        """Reverse mode: from activations where possible, else per-sample Jacobians."""
        if self._ghost is not None and not curvature:
            try:
                loss, mask, g = ghost_reverse(self.fn, self.module, self.space, self._ghost, theta, batch, directions)
            except Unsupported as err:
                log.info("POLCA: activation-based reverse mode does not apply (%s); per-sample Jacobians", err)
                self._ghost = None
            else:
                if not self._ghost_checked and mask.any():  # trust it once it agrees with per-sample Jacobians
                    self._ghost_checked = True
                    if not self._ghost_agrees(theta, batch, mask, g, directions[:2]):
                        log.info("POLCA: activation-based reverse mode disagrees for this model; not used")
                        self._ghost = None
                        return self._jacobian_batch(theta, batch, directions, curvature)
                return loss[mask], g[:, mask], None
        return self._jacobian_batch(theta, batch, directions, curvature)

    def _ghost_agrees(self, theta, batch, mask, g, directions) -> bool:
        """The activation path's ``g [K, B, P]`` against per-sample Jacobians on up to 4 samples with tokens.

        Tokens whose loss is not finite are left out of the comparison (their ``g`` is NaN either way).
        """
        rows = mask.any(1).nonzero().squeeze(1)[:4]
        sub = take(batch, mask.shape[0], rows)
        with torch.no_grad():
            loss, sub_mask, _ = self.fn(theta, sub)  # [r, P]
        ref, _ = self._jacobians(theta, sub, loss, sub_mask, directions, False, self._work_cap)  # [K, r, P]
        ok = torch.isfinite(loss) & sub_mask
        rtol = check_rtol(self.compute_precision, self.space.dim)
        return agree(g[: directions.shape[0]][:, rows][:, ok], ref[:, ok], rtol=rtol, atol=rtol / 10)

    def _jacobian_batch(self, theta, batch, directions, curvature):
        """Reverse mode: per-sample Jacobians of the loss-bearing positions, projected at once."""
        with torch.no_grad():
            loss, mask, _ = self.fn(theta, batch)  # [B, P]
        if not mask.any():  # no loss-bearing token in this batch
            empty = theta.new_empty(directions.shape[0], 0)
            return loss[mask], empty, empty if curvature else None
        g, c = self._jacobians(theta, batch, loss, mask, directions, curvature, self._work_cap)  # [K, B, P]
        return loss[mask], g[:, mask], c[:, mask] if curvature else None
