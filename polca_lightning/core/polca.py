"""POLCA of one interval, in four orders, and the coverage diagnostic (pure tensor math).

Notation (docs/math.md): interval ``i`` runs from snapshot ``i`` to ``i+1``; for basis
vector ``b`` and token ``x``

- ``g_i(x,b) = <b, grad l_x(theta_i)>``, ``delta_i(b) = <b, theta_{i+1} - theta_i>``,
- ``c_i(x,b) = bᵀ hess l_x(theta_i) b``, ``lambda_b`` the eigenvalue found for ``b``.

Orders:

- ``first``:     ``g_i δ``  (paper Eq. 2)
- ``second``:    ``first + (λ_b/2) δ² (g_{i+1} - g_i) / (ḡ_{i+1} - ḡ_i)``  (paper Eq. 3-7);
  ``ḡ`` is the mean over probe tokens. The denominator can vanish; where
  ``|ḡ_{i+1} - ḡ_i| < guard * mean_x |g_{i+1}(x) - g_i(x)|`` it is clamped to that bound
  (keeping its sign) and the vector is counted as guarded.
- ``trapezoid``: ``½ (g_i + g_{i+1}) δ``, path-integrated allocation (LCA's rule with two
  points); over a complete basis it sums to the trapezoid rule for the real loss change.
- ``exact``:     ``first + ½ c_i δ²``, the true second-order Taylor term along ``b``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ORDERS", "PolcaInterval", "polca_interval", "coverage", "needs_curvature"]

ORDERS = ("first", "second", "trapezoid", "exact")


def needs_curvature(order: str) -> bool:
    """Whether an order needs the per-token curvature ``c``."""
    _check_order(order)
    return order == "exact"


def _check_order(order: str) -> None:
    if order not in ORDERS:
        raise ValueError(f"order: expected one of {ORDERS}, got {order!r}")


@dataclass
class PolcaInterval:
    """POLCA values of one interval.

    Attributes:
        values: ``[K, T]`` POLCA of the requested order.
        first: ``[K, T]`` first-order POLCA (always).
        guarded: ``[K]`` bool, vectors whose ``second``-order denominator was clamped.
    """

    values: Tensor
    first: Tensor
    guarded: Tensor


def polca_interval(
    order: str,
    g_start: Tensor,
    delta: Tensor,
    *,
    g_end: Tensor | None = None,
    eigenvalue: Tensor | None = None,
    curvature: Tensor | None = None,
    guard: float = 1e-2,
) -> PolcaInterval:
    """POLCA of every (vector, token) for one interval.

    Args:
        order: ``"first"``, ``"second"``, ``"trapezoid"`` or ``"exact"``.
        g_start: ``[K, T]`` ``g_i``.
        delta: ``[K]`` ``δ_i``.
        g_end: ``[K, T]`` ``g_{i+1}`` (``second`` and ``trapezoid``).
        eigenvalue: ``[K]`` ``λ_b`` (``second``; NaN rows give NaN).
        curvature: ``[K, T]`` ``c_i`` (``exact``).
        guard: relative size below which the ``second``-order denominator is clamped.

    Returns:
        :class:`PolcaInterval`.

    Raises:
        ValueError: an unknown order, a missing input for the order, or mismatched shapes.

    Example:
        >>> g0, g1 = torch.ones(2, 3), torch.zeros(2, 3)
        >>> polca_interval("trapezoid", g0, torch.tensor([1.0, -2.0]), g_end=g1).values
        tensor([[ 0.5000,  0.5000,  0.5000],
                [-1.0000, -1.0000, -1.0000]])
    """
    _check_order(order)
    if g_start.dim() != 2 or delta.shape != g_start.shape[:1]:
        raise ValueError(
            f"expected g_start [K, T] and delta [K], got {list(g_start.shape)} and {list(delta.shape)}"
        )
    need = {"second": ("g_end", "eigenvalue"), "trapezoid": ("g_end",), "exact": ("curvature",)}.get(order, ())
    given = {"g_end": g_end, "eigenvalue": eigenvalue, "curvature": curvature}
    for name in need:
        if given[name] is None:
            raise ValueError(f"order {order!r} needs `{name}`")
    for name in ("g_end", "curvature"):
        if given[name] is not None and given[name].shape != g_start.shape:
            raise ValueError(f"{name}: expected shape {list(g_start.shape)}, got {list(given[name].shape)}")

    d = delta[:, None]  # [K, 1]
    first = g_start * d  # [K, T]
    guarded = torch.zeros(delta.shape[0], dtype=torch.bool, device=delta.device)
    if order == "first":
        values = first
    elif order == "trapezoid":
        values = 0.5 * (g_start + g_end) * d
    elif order == "exact":
        values = first + 0.5 * curvature * d**2
    else:  # second: the paper's Eq. 5
        diff = g_end - g_start  # [K, T]
        mean_diff = diff.mean(1)  # [K]  ḡ_{i+1} - ḡ_i
        bound = guard * diff.abs().mean(1)  # [K]
        guarded = mean_diff.abs() < bound
        sign = torch.where(mean_diff < 0, -1.0, 1.0).to(diff.dtype)
        denom = torch.where(guarded, sign * bound, mean_diff)
        # all-equal g (diff == 0 everywhere): the term is 0 / 0 -> 0, nothing moved
        ratio = torch.where(denom[:, None] == 0, torch.zeros_like(diff), diff / denom[:, None])
        values = first + 0.5 * eigenvalue.to(diff.dtype)[:, None] * d**2 * ratio
    return PolcaInterval(values=values, first=first, guarded=guarded)


def coverage(polca: Tensor, loss_start: Tensor, loss_end: Tensor) -> dict[str, float]:
    """How much of the real loss change a basis explains, for one interval.

    Args:
        polca: ``[K, T]`` POLCA values of the interval.
        loss_start, loss_end: ``[T]`` per-token loss at both ends.

    Returns:
        ``ratio``: ``Σ_x Σ_b POLCA / Σ_x Δl_x`` (share of the mean loss change allocated);
        ``correlation``: Pearson correlation over tokens of ``Σ_b POLCA`` with ``Δl_x``;
        ``explained``: ``1 - Σ_x (Δl_x - Σ_b POLCA)² / Σ_x Δl_x²``;
        ``allocated`` and ``real``: the mean of ``Σ_b POLCA`` and of ``Δl_x``.
    """
    allocated = polca.sum(0).double()  # [T]
    real = (loss_end - loss_start).double()  # [T]
    a_c, r_c = allocated - allocated.mean(), real - real.mean()
    denom = (a_c.norm() * r_c.norm()).item()
    return {
        "ratio": (allocated.sum() / real.sum()).item() if real.sum() != 0 else float("nan"),
        "correlation": (a_c @ r_c).item() / denom if denom > 0 else float("nan"),
        "explained": 1.0 - ((real - allocated) ** 2).sum().item() / max((real**2).sum().item(), 1e-300),
        "allocated": allocated.mean().item(),
        "real": real.mean().item(),
    }
