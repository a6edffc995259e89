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
# Forming per-sample gradients is a batch of skinny matrix products (L rows each), which
# ran ~4.4x slower per multiply-add than the large product a V_Wᵀ on 2 CPU cores
# (benchmarks/engine.py shapes); the choice below weighs it so.
SKINNY_PRODUCT_PENALTY = 4.4


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
    positions = mask.any(0).nonzero().squeeze(1).tolist()
    projectors = [_Projector(mod, dirs, inp, len(positions)) for mod, dirs, inp, _ in calls]
    for p in positions:
        target = torch.where(mask[:, p], loss[:, p], torch.zeros_like(loss[:, p])).sum()
        grads = torch.autograd.grad(target, outputs, retain_graph=True, allow_unused=True)
        total = theta.new_zeros(B, K)
        for proj, e in zip(projectors, grads):
            if e is not None:
                total += proj(e)
        g[:, :, p] = total.T
    return loss.detach(), mask, g


class _Projector:
    """One module call's per-sample gradients, projected on the directions: ``e -> [B, K]``.

    What does not depend on the position (the gathered embedding rows, the normalised
    LayerNorm input, for a linear layer possibly ``a V_Wᵀ``) is computed once.
    """

    def __init__(self, mod: nn.Module, dirs: dict[str, Tensor], inp: Tensor, n_positions: int):
        self.mod, self.dirs = mod, dirs
        B = inp.shape[0]
        K = next(iter(dirs.values())).shape[0]
        self.B, self.K = B, K
        if isinstance(mod, nn.Linear):
            self.a = inp.reshape(B, -1, inp.shape[-1])  # [B, L, in]
            L, n_in, n_out = self.a.shape[1], mod.in_features, mod.out_features
            # two ways to <V_W, Σ_t e_t a_tᵀ>; pick the fewer multiply-adds:
            #  per-sample gradient G_b = e_bᵀ a_b, then G·V  -> per position L·in·out + K·in·out
            #  U = a V_Wᵀ once, then <e, U>             -> K·L·in·out once + per position K·L·out
            per_sample = n_positions * (SKINNY_PRODUCT_PENALTY * L * n_in * n_out + K * n_in * n_out)
            activations = K * L * n_in * n_out + n_positions * K * L * n_out
            self.U = None
            if "weight" in dirs and activations < per_sample:
                W = dirs["weight"].reshape(K * n_out, n_in)  # [K*out, in]
                # [B*L, in] @ [in, K*out] -> [B, L, K, out] -> [B, K, L*out]
                self.U = (self.a.reshape(-1, n_in) @ W.T).view(B, L, K, n_out).permute(0, 2, 1, 3).reshape(B, K, L * n_out)
            self.W = dirs["weight"].reshape(K, -1) if "weight" in dirs else None  # [K, out*in]
        elif isinstance(mod, nn.Embedding):
            ids = inp.reshape(B, -1)  # [B, L]
            keep = None if mod.padding_idx is None else (ids != mod.padding_idx)
            rows = dirs["weight"][:, ids]  # [K, B, L, D]
            if keep is not None:
                rows = rows * keep[None, :, :, None]
            self.rows = rows.permute(1, 0, 2, 3).reshape(B, K, -1)  # [B, K, L*D]
        else:  # LayerNorm
            xhat = F.layer_norm(inp, mod.normalized_shape, eps=mod.eps)  # normalised input, no affine
            self.xhat = xhat.reshape(B, -1, int(torch.Size(mod.normalized_shape).numel()))  # [B, L, D]

    def __call__(self, e: Tensor) -> Tensor:
        B, K, mod, dirs = self.B, self.K, self.mod, self.dirs
        out = e.new_zeros(B, K)
        if isinstance(mod, nn.Linear):
            e = e.reshape(B, -1, mod.out_features)  # [B, L, out]
            if self.W is not None:
                if self.U is not None:
                    out += torch.bmm(self.U, e.reshape(B, -1, 1)).squeeze(2)  # [B, K]
                else:
                    G = torch.bmm(e.transpose(1, 2), self.a)  # per-sample gradient [B, out, in]
                    out += G.reshape(B, -1) @ self.W.T  # [B, K]
            if "bias" in dirs:
                out += e.sum(1) @ dirs["bias"].T
        elif isinstance(mod, nn.Embedding):
            out += torch.bmm(self.rows, e.reshape(B, -1, 1)).squeeze(2)
        else:
            e = e.reshape(self.xhat.shape)
            if "weight" in dirs:
                out += (e * self.xhat).sum(1) @ dirs["weight"].reshape(K, -1).T
            if "bias" in dirs:
                out += e.sum(1) @ dirs["bias"].reshape(K, -1).T
        return out
