"""Reverse mode by per-sample Jacobians, for models the activation path does not cover.

Each sample's loss-bearing positions are differentiated on their own and projected on
the K directions at once (``[K, positions]`` per sample, never a stored Jacobian of the
whole batch). Two ways to the same numbers:

- **vmapped**: ``torch.func.vmap`` over the samples of ``jacrev`` of one sample's losses.
  Each sample reaches the token loss as a batch of one, but a vmapped one: what the
  model creates itself (the hidden state ``nn.GRU``/``nn.LSTM`` make when none is passed,
  or one a token loss builds with ``init_hidden(x.shape[0])``) is not batched, and an
  in-place write of a batched value into it fails ("output with shape [1, 32] doesn't
  match the broadcast shape [32, 1, 32]"); so do ``.item()`` and data-dependent control
  flow. Fast where it runs.
- **looped**: each sample as a real batch of one (``x[i:i+1]``) through plain autograd,
  its loss-bearing positions in one backward pass vmapped over their cotangents (one
  backward per position where the model's backward cannot be vmapped). A forward pass
  per sample, so slow, but it runs whatever the training step runs.

:class:`PerSampleJacobians` uses the vmapped way and switches to the looped one for good
when it raises or, on the first sample with tokens (checked once), disagrees with it.
Both check every sample's loss alone against its loss in the batch: a token loss whose
per-token values depend on the rest of the batch (divided by the batch size, say) has no
per-sample Jacobian, and :class:`BatchDependent` says so.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import Tensor
from torch.func import jacrev, jvp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

log = logging.getLogger(__name__)


class BatchDependent(RuntimeError):
    """A sample's loss alone differs from its loss in the batch: per-sample Jacobians do not apply."""


def batch_leaves(batch: Any, n: int) -> tuple[list, Any, list[int]]:
    """``(leaves, spec, batched)``: the batch's pytree leaves and which of them are per-sample
    (tensors whose first dimension is the batch size ``n``; the others are passed as they are)."""
    leaves, spec = tree_flatten(batch)
    batched = [i for i, x in enumerate(leaves) if isinstance(x, Tensor) and x.dim() >= 1 and x.shape[0] == n]
    return leaves, spec, batched


def take(batch: Any, n: int, index: slice | Tensor) -> Any:
    """The samples ``index`` of a batch of ``n`` (a slice or a LongTensor), still a batch."""
    leaves, spec, batched = batch_leaves(batch, n)
    leaves = list(leaves)
    for i in batched:
        leaves[i] = leaves[i][index]
    return tree_unflatten(leaves, spec)


def agree(a: Tensor, b: Tensor, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """``|a - b| <= rtol |b| + atol max|b|`` where both are finite, and finite at the same places."""
    if a.shape != b.shape:
        return False
    fa, fb = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(fa, fb):
        return False
    if not fa.any():
        return True
    a, b = a[fa].double(), b[fb].double()
    scale = float(b.abs().max())
    return bool(((a - b).abs() <= rtol * b.abs() + atol * scale + 1e-300).all())


class PerSampleJacobians:
    """``g [K, B, P]`` (and ``c``) of one batch by per-sample Jacobians, vmapped or looped.

    Args:
        fn: the :class:`~polca_lightning.core.functional.FunctionalTokenLoss`.
        rtol: relative tolerance of the checks (a sample alone against the batch, vmapped against
            looped); ``atol`` is a tenth of it, relative to the largest value.
        g_rtol: the tolerance of the vmapped-against-looped check of ``g`` and ``c`` (default
            ``rtol``): dot products over every parameter, whose float32 rounding grows with
            their length (see :func:`~polca_lightning.core.engine.check_rtol`).
    """

    def __init__(self, fn, rtol: float = 1e-4, g_rtol: float | None = None):
        self.fn = fn
        self.rtol = rtol
        self.g_rtol = rtol if g_rtol is None else g_rtol
        self.vmapped = True  # False once the vmapped way failed or disagreed
        self.checked = False  # the vmapped way was compared with the looped one
        self.batched_backward = True  # looped: every position of a sample in one vmapped backward pass

    def __call__(self, theta: Tensor, batch: Any, loss: Tensor, mask: Tensor, directions: Tensor, curvature: bool,
                 memory_cap: int) -> tuple[Tensor, Tensor | None]:
        """``g [K, B, P]`` and ``c [K, B, P]`` (``None`` without curvature); meaningful on the mask only.

        ``loss``, ``mask`` ``[B, P]``: the batch's own, to check each sample's against.

        Raises:
            BatchDependent: a sample's loss alone is not its loss in the batch.
        """
        if self.vmapped:
            try:
                out = self._vmapped(theta, batch, loss, mask, directions, curvature, memory_cap)
            except BatchDependent:
                raise
            except Exception as err:  # noqa: BLE001 - the looped way runs what the model runs, or raises
                log.info("POLCA: vmapped per-sample Jacobians failed (%s: %s); samples one at a time from now on",
                         type(err).__name__, str(err).splitlines()[0] if str(err) else "")
                self.vmapped = False
            else:
                if self.checked:
                    return out
                self.checked = True
                first = int(mask.any(1).nonzero()[0, 0])  # a sample with tokens
                ref = self._looped(theta, batch, loss, mask, directions, curvature, samples=[first],
                                   memory_cap=memory_cap)
                if all(agree(o[:, first][:, mask[first]], r[:, first][:, mask[first]], self.g_rtol, self.g_rtol / 10)
                       for o, r in zip(out, ref) if o is not None):
                    return out
                log.info("POLCA: vmapped per-sample Jacobians disagree with a real batch of one; "
                         "samples one at a time from now on")
                self.vmapped = False
        return self._looped(theta, batch, loss, mask, directions, curvature, memory_cap=memory_cap)

    def _check_alone(self, alone: Tensor, loss: Tensor, mask: Tensor) -> None:
        """Raise :class:`BatchDependent` where a sample's losses alone (``[B, P]``) are not its batch losses."""
        if not agree(alone[mask], loss[mask], rtol=self.rtol, atol=self.rtol / 10):
            raise BatchDependent(
                "token_loss: a sample's per-token loss alone (a batch of one) differs from its loss in the batch, "
                "so it has no per-sample gradient; make the per-token loss independent of the rest of the batch "
                "(not divided by the batch size, say) or use engine='forward'"
            )

    def _vmapped(self, theta, batch, loss, mask, directions, curvature, memory_cap):
        """Per-sample Jacobians, vmapped over samples. Each sample's Jacobian rows (``[p, d]``)
        exist only for a group of positions at a time, so that a chunk of samples' rows fits in
        ``memory_cap`` (one position of one sample at least: a model whose ``[p, d]`` Jacobian
        does not fit runs a forward pass per group of positions instead)."""
        n, K = mask.shape[0], directions.shape[0]
        cols = mask.any(0).nonzero().squeeze(1)  # positions any sample differentiates, [p]
        leaves, spec, batched = batch_leaves(batch, n)
        per_row = theta.numel() * theta.element_size() * (2 + (K if curvature else 0))  # one position's row and its copy
        group = max(1, min(max(1, cols.numel()), memory_cap // per_row))
        g = theta.new_zeros(K, n, mask.shape[1])
        c = torch.zeros_like(g) if curvature else None
        alone = torch.full_like(loss, float("nan"))
        for first in range(0, max(1, cols.numel()), group):
            part_cols = cols[first : first + group]
            self._vmapped_positions(theta, leaves, spec, batched, n, part_cols, directions, curvature,
                                    memory_cap // max(1, part_cols.numel() * per_row), g, c, alone)
        self._check_alone(alone, loss, mask)
        return g, c

    def _vmapped_positions(self, theta, leaves, spec, batched, n, cols, directions, curvature, samples_per_chunk,
                           g, c, alone) -> None:
        """``g``, ``c`` and ``alone`` at positions ``cols`` of every sample, ``samples_per_chunk``
        samples at a time (one at least)."""
        fn = self.fn

        def sample_loss(t, *sample):  # sample: the per-sample leaves, each without its batch dimension
            full = list(leaves)
            for i, x in zip(batched, sample):
                full[i] = x.unsqueeze(0)  # a batch of one
            out = fn(t, tree_unflatten(full, spec))[0][0, cols]  # [p]
            return out, out

        jac = jacrev(sample_loss, has_aux=True)  # (t, *sample) -> ([p, d], [p])

        def project(*sample):
            J, value = jac(theta, *sample)
            return torch.einsum("pd,kd->kp", J, directions), value  # [K, p], [p]

        def project_curvature(*sample):
            def both(v):
                def gv(t):
                    J, value = jac(t, *sample)
                    return J @ v, value  # [p], [p]

                g, c, value = jvp(gv, (theta,), (v,), has_aux=True)
                return g, c, value

            g, c, value = vmap(both)(directions)  # [K, p] each
            return g, c, value[0]

        chunk = max(1, min(n, samples_per_chunk))
        for start in range(0, n, chunk):
            part = [leaves[i][start : start + chunk] for i in batched]
            if curvature:
                gp, cp, value = vmap(project_curvature, out_dims=(1, 1, 0))(*part)  # [K, bc, p], [K, bc, p], [bc, p]
                c[:, start : start + chunk, cols] = cp.to(c.dtype)  # bfloat16 under autocast
            else:
                gp, value = vmap(project, out_dims=(1, 0))(*part)  # [K, bc, p], [bc, p]
            g[:, start : start + chunk, cols] = gp.to(g.dtype)
            alone[start : start + chunk, cols] = value.to(alone.dtype)

    def _looped(self, theta, batch, loss, mask, directions, curvature, samples=None, memory_cap=1 << 30):
        fn = self.fn
        n, K = mask.shape[0], directions.shape[0]
        g = theta.new_zeros(K, n, mask.shape[1])
        c = torch.zeros_like(g) if curvature else None
        alone = torch.full_like(loss, float("nan"))
        samples = samples if samples is not None else mask.any(1).nonzero().squeeze(1).tolist()
        rows_per_backward = max(1, memory_cap // max(1, theta.numel() * theta.element_size()))
        for i in samples:
            one = take(batch, n, slice(i, i + 1))  # a real batch of one
            with torch.enable_grad():
                t = theta.detach().requires_grad_(True)
                value = fn(t, one)[0][0]  # [P]
                alone[i] = value.detach().to(alone.dtype)
                if not value.requires_grad:  # no selected parameter reaches this sample's loss
                    continue
                positions = mask[i].nonzero().squeeze(1)
                if not curvature and self._batched_backward(value, t, positions, directions, g[:, i],
                                                            rows_per_backward):
                    continue
                for p in positions.tolist():
                    (grad,) = torch.autograd.grad(value[p], t, retain_graph=True, create_graph=curvature,
                                                  allow_unused=True)
                    if grad is None:
                        continue
                    g[:, i, p] = directions @ grad.detach()
                    if curvature:
                        for k in range(K):
                            gv = grad @ directions[k]
                            if gv.requires_grad:
                                (hv,) = torch.autograd.grad(gv, t, retain_graph=True, allow_unused=True)
                                c[k, i, p] = 0.0 if hv is None else hv.detach() @ directions[k]
        rows = torch.zeros_like(mask)
        rows[samples] = mask[samples]
        self._check_alone(alone, loss, rows)
        return g, c

    def _batched_backward(self, value, t, positions, directions, out, rows) -> bool:
        """One backward pass vmapped over the cotangents of ``positions`` (``rows`` at a time) into
        ``out`` ``[K, P]``; False (and not tried again) where the model's backward cannot be vmapped."""
        if not self.batched_backward:
            return False
        try:
            for start in range(0, positions.numel(), rows):
                chunk = positions[start : start + rows]
                cotangents = value.new_zeros(chunk.numel(), value.shape[0])
                cotangents[torch.arange(chunk.numel()), chunk] = 1.0
                with warnings.catch_warnings():  # torch's notice of ops without a batching rule
                    warnings.filterwarnings("ignore", message="There is a performance drop")
                    (J,) = torch.autograd.grad(value, t, grad_outputs=cotangents, is_grads_batched=True,
                                               retain_graph=True, allow_unused=True)
                if J is not None:
                    out[:, chunk] = directions @ J.detach().T  # [K, c]
            return True
        except RuntimeError as err:
            log.info("POLCA: a vmapped backward pass failed (%s); one backward per position", err)
            self.batched_backward = False
            return False
