"""Reverse mode without per-sample gradients: projections formed from activations.

For a linear layer ``y = a Wᵀ + b`` the gradient of one sample's loss is
``Σ_t e_t a_tᵀ`` (``e`` the gradient at the layer's output, ``a`` its input), so its
inner product with a direction ``V_W`` is ``Σ_t e_tᵀ V_W a_t``: it can be formed per
sample from ``a`` and ``e`` without a per-sample copy of the whole parameter vector
(the trick differential-privacy libraries use for per-sample gradient norms). One
backward pass per loss-bearing position, over the whole batch, gives every sample's
``e`` at once, because samples do not interact.

Supported: ``nn.Linear``, ``nn.Embedding`` (no ``max_norm``), ``nn.LayerNorm``, with
outputs that keep the batch as their first dimension. :func:`ghost_plan` returns
``None`` for anything else (a parameter of another module, a weight shared between
modules, a position embedding broadcast over the batch), and the engine then uses
vmapped per-sample Jacobians instead.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SUPPORTED = (nn.Linear, nn.Embedding, nn.LayerNorm)


class Unsupported(Exception):
    """This forward pass cannot be projected from activations (the caller falls back)."""


def ghost_plan(module: nn.Module, names: tuple[str, ...]) -> dict[str, tuple[str, str]] | None:
    """``{param name: (module name, 'weight' | 'bias')}`` if every selected parameter is supported."""
    owners: dict[int, list[str]] = {}
    plan = {}
    for mname, m in module.named_modules(remove_duplicate=False):
        for pname, p in m.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(mname)
            full = f"{mname}.{pname}" if mname else pname
            if full in names:
                if not isinstance(m, SUPPORTED) or getattr(m, "max_norm", None) is not None:
                    return None
                plan[full] = (mname, pname)
    if len(plan) != len(names) or any(len(set(o)) > 1 for o in owners.values()):
        return None  # a parameter we cannot place, or one shared by several modules
    return plan


def ghost_reverse(fn, module: nn.Module, space, plan, theta: Tensor, batch: Any, directions: Tensor):
    """``loss [B, P]``, ``mask [B, P]``, ``g [K, B, P]`` by one backward per loss-bearing position.

    Raises:
        Unsupported: a hooked module's output does not keep the batch dimension.
    """
    # directions as parameter-shaped pieces: name -> [K, *shape]
    pieces = {n: v.view(directions.shape[0], *s) for n, v, s in
              zip(space.names, torch.split(directions, space.numels, dim=1), space.shapes)}
    by_module: dict[str, dict[str, Tensor]] = {}
    for name, (mname, pname) in plan.items():
        by_module.setdefault(mname, {})[pname] = pieces[name]
    modules = dict(module.named_modules())
    calls: list[tuple[nn.Module, dict[str, Tensor], Tensor, Tensor]] = []  # (module, dirs, input, output)

    def hook(mod, inputs, output, dirs):
        calls.append((mod, dirs, inputs[0].detach(), output))

    handles = [modules[m].register_forward_hook(lambda mod, i, o, d=d: hook(mod, i, o, d)) for m, d in by_module.items()]
    try:
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)  # so that every hooked output is in a graph
            loss, mask, _ = fn(leaf, batch)
    finally:
        for h in handles:
            h.remove()
    B, K = mask.shape[0], directions.shape[0]
    outputs = [out for _, _, _, out in calls]
    for _, _, inp, out in calls:
        if out.dim() < 2 or out.shape[0] != B or inp.shape[0] != B:
            raise Unsupported("an output without the batch dimension")
    g = theta.new_zeros(K, B, mask.shape[1])
    for p in mask.any(0).nonzero().squeeze(1).tolist():
        target = torch.where(mask[:, p], loss[:, p], torch.zeros_like(loss[:, p])).sum()
        grads = torch.autograd.grad(target, outputs, retain_graph=True, allow_unused=True)
        total = theta.new_zeros(K, B)
        for (mod, dirs, inp, _), e in zip(calls, grads):
            if e is not None:
                total += _project(mod, dirs, inp, e)
        g[:, :, p] = total
    return loss.detach(), mask, g


def _project(mod: nn.Module, dirs: dict[str, Tensor], inp: Tensor, e: Tensor) -> Tensor:
    """``[K, B]``: each sample's gradient of this module's parameters, projected on ``dirs``."""
    B = e.shape[0]
    out = e.new_zeros(next(iter(dirs.values())).shape[0], B)
    if isinstance(mod, nn.Linear):
        a = inp.reshape(B, -1, inp.shape[-1])  # [B, L, in]
        e = e.reshape(B, -1, e.shape[-1])  # [B, L, out]
        if "weight" in dirs:
            G = torch.einsum("blo,bli->boi", e, a)  # per-sample weight gradient [B, out, in]
            out += torch.einsum("boi,koi->kb", G, dirs["weight"])
        if "bias" in dirs:
            out += torch.einsum("blo,ko->kb", e, dirs["bias"])
    elif isinstance(mod, nn.Embedding):
        ids = inp.reshape(B, -1)  # [B, L]
        e = e.reshape(B, ids.shape[1], -1)  # [B, L, D]
        if mod.padding_idx is not None:
            e = e.masked_fill((ids == mod.padding_idx)[..., None], 0.0)
        rows = dirs["weight"][:, ids]  # [K, B, L, D]
        out += torch.einsum("bld,kbld->kb", e, rows)
    else:  # LayerNorm
        n = len(mod.normalized_shape)
        xhat = F.layer_norm(inp, mod.normalized_shape, eps=mod.eps)  # normalised input, no affine
        xhat = xhat.reshape(B, -1, *mod.normalized_shape).flatten(2)  # [B, L, D]
        e = e.reshape(B, -1, *mod.normalized_shape).flatten(2)
        if "weight" in dirs:
            out += torch.einsum("bld,kd->kb", e * xhat, dirs["weight"].flatten(1))
        if "bias" in dirs:
            out += torch.einsum("bld,kd->kb", e, dirs["bias"].flatten(1))
        del n
    return out
