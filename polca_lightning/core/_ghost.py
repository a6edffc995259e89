"""Reverse mode without per-sample gradients: projections formed from activations.

For a linear layer ``y = a Wᵀ + b`` the gradient of one sample's loss is
``Σ_t e_t a_tᵀ`` (``e`` the gradient at the layer's output, ``a`` its input), so its
inner product with a direction ``V_W`` is ``Σ_t e_tᵀ V_W a_t``: it can be formed per
sample from ``a`` and ``e`` without a per-sample copy of the whole parameter vector
(the trick differential-privacy libraries use for per-sample gradient norms). One
backward pass per loss-bearing position, over the whole batch, gives every sample's
``e`` at once, because samples do not interact.

Supported: ``nn.Linear``, ``nn.Embedding`` (no ``max_norm``), ``nn.LayerNorm``,
transformers' ``Conv1D`` (GPT-2's projections: ``y = a W + b``, ``W`` ``[in, out]``) and
RMSNorm (``nn.RMSNorm`` and the ``*RMSNorm`` modules of transformers, e.g. Llama's:
``y = w ⊙ x / rms(x)``, the weight's gradient ``Σ_t e_t ⊙ x̂_t`` whether the module
scales by ``w`` or by ``1 + w``). A weight shared by several of them (tied input and
output embeddings) gets the sum of every use. An output with a batch dimension of 1
while the batch has more (a position embedding looked up once for ``[1, L]`` and
broadcast) is expanded to the batch inside the forward pass, so that each sample's
gradient at it is its own. :func:`ghost_plan` returns ``None`` for a parameter no
supported module owns (a bare ``nn.Parameter``), and the engine then uses per-sample
Jacobians; the result is checked against them on the first batch before it is trusted.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Forming per-sample gradients is a batch of skinny matrix products (L rows each), which
# ran ~4.4x slower per multiply-add than the large product a V_Wᵀ on 2 CPU cores
# (benchmarks/engine.py shapes); the choice below weighs it so.
SKINNY_PRODUCT_PENALTY = 4.4


class Unsupported(Exception):
    """This forward pass cannot be projected from activations (the caller falls back)."""


def _kind(m: nn.Module) -> str | None:
    """Which projector handles ``m``: ``linear``, ``conv1d``, ``embedding``, ``layer_norm``, ``rms_norm`` or None."""
    if isinstance(m, nn.Linear):
        return "linear"
    if isinstance(m, nn.Embedding):
        return "embedding" if m.max_norm is None else None
    if isinstance(m, nn.LayerNorm):
        return "layer_norm"
    name = type(m).__name__
    weight = getattr(m, "weight", None)
    if name == "Conv1D" and isinstance(weight, Tensor) and weight.dim() == 2 and weight.shape[1] == getattr(m, "nf", None):
        return "conv1d"  # transformers.pytorch_utils.Conv1D
    if isinstance(m, nn.RMSNorm) or (name.endswith("RMSNorm") and isinstance(weight, Tensor) and weight.dim() == 1
                                     and _rms_eps(m) is not None):
        return "rms_norm"
    return None


def _rms_eps(m: nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(m, attr, None)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def ghost_plan(module: nn.Module, names: tuple[str, ...]) -> dict[str, list[tuple[str, str]]] | None:
    """``{param name: [(module name, 'weight' | 'bias'), ...]}``: every supported module that holds
    each selected parameter (several where a weight is shared), or ``None`` if a parameter has none."""
    wanted = set(names)
    by_id: dict[int, str] = {}
    for full, p in module.named_parameters():  # the names parameters go by (the first, for a shared one)
        by_id.setdefault(id(p), full)
    plan: dict[str, list[tuple[str, str]]] = {}
    seen: set[tuple[int, str]] = set()
    for mname, m in module.named_modules(remove_duplicate=False):
        if _kind(m) is None:
            continue
        for pname, p in m.named_parameters(recurse=False):
            full = by_id.get(id(p))
            if full in wanted and (id(m), pname) not in seen:  # a module registered twice is hooked once
                seen.add((id(m), pname))
                plan.setdefault(full, []).append((mname, pname))
    if set(plan) != wanted:
        return None  # a parameter no supported module holds
    return plan


def _batch_guess(batch: Any) -> int | None:
    """The leading size of the batch's first tensor (the batch size, checked after the forward pass)."""
    for leaf in torch.utils._pytree.tree_leaves(batch):
        if isinstance(leaf, Tensor) and leaf.dim() >= 1:
            return leaf.shape[0]
    return None


def ghost_reverse(fn, module: nn.Module, space, plan, theta: Tensor, batch: Any, directions: Tensor):
    """``loss [B, P]``, ``mask [B, P]``, ``g [K, B, P]`` by one backward per loss-bearing position.

    Raises:
        Unsupported: a hooked module's output does not keep the batch dimension.
    """
    # directions as parameter-shaped pieces: name -> [K, *shape]
    pieces = {n: v.view(directions.shape[0], *s) for n, v, s in
              zip(space.names, torch.split(directions, space.numels, dim=1), space.shapes)}
    modules = dict(module.named_modules(remove_duplicate=False))
    by_module: dict[int, tuple[nn.Module, dict[str, Tensor]]] = {}
    for name, owners in plan.items():
        for mname, pname in owners:
            m = modules[mname]
            by_module.setdefault(id(m), (m, {}))[1][pname] = pieces[name]
    guess = _batch_guess(batch)
    for _ in range(2):  # a second pass only if the batch size was guessed wrong
        loss, mask, calls = _forward(fn, by_module, theta, batch, guess)
        if mask.shape[0] == guess:
            break
        guess = mask.shape[0]
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


def _forward(fn, by_module, theta: Tensor, batch: Any, batch_size: int | None):
    """The loss with every supported module's calls recorded as ``(module, dirs, input, output)``.

    An output (and input) with a leading size of 1 where the batch has ``batch_size`` is
    expanded to the batch, the same values, so that the backward pass keeps each sample's part.
    """
    calls: list[tuple[nn.Module, dict[str, Tensor], Tensor, Tensor]] = []

    def hook(mod, inputs, output, dirs):
        if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
            raise Unsupported(f"{type(mod).__name__} called without a tensor input and output")
        inp = inputs[0].detach()
        if batch_size and batch_size > 1 and output.dim() >= 2 and output.shape[0] == 1 and inp.shape[:1] == (1,):
            output = output.expand(batch_size, *output.shape[1:])
            inp = inp.expand(batch_size, *inp.shape[1:])
        calls.append((mod, dirs, inp, output))
        return output

    handles = [m.register_forward_hook(lambda mod, i, o, d=d: hook(mod, i, o, d)) for m, d in by_module.values()]
    try:
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_(True)  # so that every hooked output is in a graph
            loss, mask, _ = fn(leaf, batch)
    except Unsupported:
        raise
    except Exception as err:  # noqa: BLE001 - an expanded output the model could not take
        raise Unsupported(f"the forward pass with recorded activations failed ({type(err).__name__}: {err})") from err
    finally:
        for h in handles:
            h.remove()
    return loss, mask, calls


class _Projector:
    """One module call's per-sample gradients, projected on the directions: ``e -> [B, K]``.

    What does not depend on the position (the gathered embedding rows, the normalised
    input of a norm layer, for a linear layer possibly ``a V_Wᵀ``) is computed once.
    """

    def __init__(self, mod: nn.Module, dirs: dict[str, Tensor], inp: Tensor, n_positions: int):
        self.kind, self.dirs = _kind(mod), dict(dirs)
        B = inp.shape[0]
        K = next(iter(dirs.values())).shape[0]
        self.B, self.K = B, K
        if self.kind in ("linear", "conv1d"):
            if self.kind == "conv1d" and "weight" in dirs:  # Conv1D keeps W as [in, out]: y = a W + b
                self.dirs["weight"] = dirs["weight"].transpose(1, 2)  # [K, out, in], as nn.Linear's
            n_in, n_out = (mod.in_features, mod.out_features) if self.kind == "linear" else mod.weight.shape
            self.n_out = n_out
            self.a = inp.reshape(B, -1, n_in)  # [B, L, in]
            L = self.a.shape[1]
            # two ways to <V_W, Σ_t e_t a_tᵀ>; pick the fewer multiply-adds:
            #  per-sample gradient G_b = e_bᵀ a_b, then G·V  -> per position L·in·out + K·in·out
            #  U = a V_Wᵀ once, then <e, U>             -> K·L·in·out once + per position K·L·out
            per_sample = n_positions * (SKINNY_PRODUCT_PENALTY * L * n_in * n_out + K * n_in * n_out)
            activations = K * L * n_in * n_out + n_positions * K * L * n_out
            self.U = None
            if "weight" in dirs and activations < per_sample:
                W = self.dirs["weight"].reshape(K * n_out, n_in)  # [K*out, in]
                # [B*L, in] @ [in, K*out] -> [B, L, K, out] -> [B, K, L*out]
                self.U = (self.a.reshape(-1, n_in) @ W.T).view(B, L, K, n_out).permute(0, 2, 1, 3).reshape(B, K, L * n_out)
            self.W = self.dirs["weight"].reshape(K, -1) if "weight" in dirs else None  # [K, out*in]
        elif self.kind == "embedding":
            ids = inp.reshape(B, -1)  # [B, L]
            keep = None if mod.padding_idx is None else (ids != mod.padding_idx)
            rows = dirs["weight"][:, ids]  # [K, B, L, D]
            if keep is not None:
                rows = rows * keep[None, :, :, None]
            self.rows = rows.permute(1, 0, 2, 3).reshape(B, K, -1)  # [B, K, L*D]
        elif self.kind == "layer_norm":
            xhat = F.layer_norm(inp, mod.normalized_shape, eps=mod.eps)  # normalised input, no affine
            self.xhat = xhat.reshape(B, -1, int(torch.Size(mod.normalized_shape).numel()))  # [B, L, D]
        else:  # RMSNorm: x / sqrt(mean(x²) + eps) over the normalised dimensions
            shape = tuple(mod.normalized_shape) if isinstance(mod, nn.RMSNorm) else tuple(mod.weight.shape)
            eps = _rms_eps(mod)
            if eps is None:
                eps = torch.finfo(inp.dtype).eps
            # half-precision inputs in float32, as transformers' RMSNorms compute (a float64 model's
            # float32-inside norm differs from this by float32 rounding, far below the check's tolerance)
            x = inp.float() if inp.dtype in (torch.float16, torch.bfloat16) else inp
            dims = tuple(range(-len(shape), 0))
            xhat = (x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + eps)).to(inp.dtype)
            self.xhat = xhat.reshape(B, -1, int(torch.Size(shape).numel()))  # [B, L, D]

    def __call__(self, e: Tensor) -> Tensor:
        B, K, dirs = self.B, self.K, self.dirs
        out = e.new_zeros(B, K)
        if self.kind in ("linear", "conv1d"):
            e = e.reshape(B, -1, self.n_out)  # [B, L, out]
            if self.W is not None:
                if self.U is not None:
                    out += torch.bmm(self.U, e.reshape(B, -1, 1)).squeeze(2)  # [B, K]
                else:
                    G = torch.bmm(e.transpose(1, 2), self.a)  # per-sample gradient [B, out, in]
                    out += G.reshape(B, -1) @ self.W.T  # [B, K]
            if "bias" in dirs:
                out += e.sum(1) @ dirs["bias"].T
        elif self.kind == "embedding":
            out += torch.bmm(self.rows, e.reshape(B, -1, 1)).squeeze(2)
        else:  # the norms: weight ⊙ x̂ (+ bias)
            e = e.reshape(self.xhat.shape)
            if "weight" in dirs:
                out += (e * self.xhat).sum(1) @ dirs["weight"].reshape(K, -1).T
            if "bias" in dirs:
                out += e.sum(1) @ dirs["bias"].reshape(K, -1).T
        return out
