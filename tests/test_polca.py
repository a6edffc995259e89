"""POLCA orders checked against complete bases, true loss changes and hand-made cases."""

import math

import pytest
import torch

from _tiny import TinyMLP, addition_batch, tiny_lm
from polca_lightning.core.engine import DirectionalDerivatives
from polca_lightning.core.functional import FunctionalTokenLoss, ParameterSpace
from polca_lightning.core.losses import causal_lm_token_loss, classifier_token_loss
from polca_lightning.core.polca import coverage, needs_curvature, polca_interval


def _complete_basis(d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return q.T.contiguous()  # [d, d], rows orthonormal


def _per_token_gradients(model, token_loss, space, theta, batch):
    """The naive reference: one autograd.grad per token, no engine involved."""
    fn = FunctionalTokenLoss(model, token_loss, space)
    t = theta.clone().requires_grad_(True)
    loss, mask, _ = fn(t, batch)
    return torch.stack([torch.autograd.grad(l, t, retain_graph=True)[0] for l in loss[mask]])  # [T, d]


def _mlp_case():
    torch.manual_seed(0)
    model = TinyMLP().double()
    batch = (torch.randn(7, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1, 2]))
    return model, classifier_token_loss, batch


def test_first_order_over_complete_basis_is_the_gradient_inner_product():
    model = tiny_lm(d_model=4)
    batch = addition_batch(3)
    space = ParameterSpace.from_module(model)
    theta0 = space.flatten(model)
    step = 1e-2 * torch.randn(space.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    B = _complete_basis(space.dim)
    out = DirectionalDerivatives(model, causal_lm_token_loss, space, engine="reverse")(theta0, [batch], B)
    delta = B @ step  # [K]
    first = polca_interval("first", out.g, delta).values.sum(0)  # [T]
    expected = _per_token_gradients(model, causal_lm_token_loss, space, theta0, batch) @ step
    assert (first - expected).abs().max() <= 1e-8 * max(1.0, expected.abs().max().item())


def _convergence_rate(errors, scales):
    """Fitted exponent p of error ~ scale^p."""
    x = torch.log(torch.tensor(scales, dtype=torch.float64))
    y = torch.log(torch.stack(errors))
    return (((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()).item()


def test_exact_order_error_shrinks_cubically_along_one_direction():
    model, token_loss, batch = _mlp_case()
    space = ParameterSpace.from_module(model)
    theta0 = space.flatten(model)
    b = _complete_basis(space.dim, seed=2)[:1]  # [1, d]
    dd = DirectionalDerivatives(model, token_loss, space)
    at0 = dd(theta0, [batch], b, curvature=True)
    scales = [0.2, 0.1, 0.05, 0.025]
    errors, first_errors = [], []
    for t in scales:
        real = dd(theta0 + t * b[0], [batch]).loss - at0.loss
        delta = torch.tensor([t], dtype=torch.float64)
        exact = polca_interval("exact", at0.g, delta, curvature=at0.c).values[0]
        first = polca_interval("first", at0.g, delta).values[0]
        errors.append((exact - real).abs().max())
        first_errors.append((first - real).abs().max())
    assert 2.7 < _convergence_rate(errors, scales) < 3.3
    assert 1.7 < _convergence_rate(first_errors, scales) < 2.3


def test_trapezoid_over_complete_basis_is_third_order_and_first_is_second_order():
    model, token_loss, batch = _mlp_case()
    space = ParameterSpace.from_module(model)
    theta0 = space.flatten(model)
    B = _complete_basis(space.dim, seed=3)
    direction = torch.randn(space.dim, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    dd = DirectionalDerivatives(model, token_loss, space)
    start = dd(theta0, [batch], B)
    scales = [0.2, 0.1, 0.05, 0.025]
    trap_err, first_err = [], []
    for t in scales:
        theta1 = theta0 + t * direction
        end = dd(theta1, [batch], B)
        delta = B @ (theta1 - theta0)
        real = end.loss - start.loss
        trap = polca_interval("trapezoid", start.g, delta, g_end=end.g).values.sum(0)
        first = polca_interval("first", start.g, delta).values.sum(0)
        trap_err.append((trap - real).abs().max())
        first_err.append((first - real).abs().max())
    assert 2.7 < _convergence_rate(trap_err, scales) < 3.3
    assert 1.7 < _convergence_rate(first_err, scales) < 2.3


def test_second_order_follows_eq5_and_guards_a_vanishing_denominator():
    g0 = torch.tensor([[1.0, 2.0, 3.0], [1.0, -1.0, 0.0]], dtype=torch.float64)
    g1 = torch.tensor([[2.0, 4.0, 3.0], [2.0, -2.0, 0.0]], dtype=torch.float64)  # row 1: mean change exactly 0
    delta = torch.tensor([0.5, 2.0], dtype=torch.float64)
    lam = torch.tensor([4.0, 3.0], dtype=torch.float64)
    out = polca_interval("second", g0, delta, g_end=g1, eigenvalue=lam, guard=0.01)
    # row 0 by hand: mean diff = (1 + 2 + 0)/3 = 1; term = 4/2 * 0.25 * diff / 1
    expected0 = g0[0] * 0.5 + 2.0 * 0.25 * torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    assert torch.allclose(out.values[0], expected0)
    assert out.guarded.tolist() == [False, True]
    # row 1: denominator clamped to +0.01 * mean|diff| = 0.01 * 2/3
    bound = 0.01 * 2 / 3
    expected1 = g0[1] * 2.0 + 1.5 * 4.0 * torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64) / bound
    assert torch.allclose(out.values[1], expected1)
    assert torch.isfinite(out.values).all()
    assert torch.equal(out.first, g0 * delta[:, None])


def test_orders_validate_their_inputs():
    g = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="order: expected one of"):
        polca_interval("third", g, torch.zeros(2))
    with pytest.raises(ValueError, match="needs `g_end`"):
        polca_interval("trapezoid", g, torch.zeros(2))
    with pytest.raises(ValueError, match="needs `curvature`"):
        polca_interval("exact", g, torch.zeros(2))
    with pytest.raises(ValueError, match="delta"):
        polca_interval("first", g, torch.zeros(3))
    assert needs_curvature("exact") and not needs_curvature("trapezoid")


def test_coverage_on_a_hand_made_case():
    real_start = torch.tensor([1.0, 1.0, 1.0, 1.0])
    real_end = torch.tensor([0.0, 0.5, 1.0, 0.5])  # changes -1, -0.5, 0, -0.5
    polca = torch.tensor([[-0.5, -0.25, 0.0, -0.25], [-0.25, -0.125, 0.0, -0.125]])  # sums 3/4 of each change
    cov = coverage(polca, real_start, real_end)
    assert math.isclose(cov["ratio"], 0.75, rel_tol=1e-9)
    assert math.isclose(cov["correlation"], 1.0, rel_tol=1e-9)
    assert math.isclose(cov["explained"], 1 - 0.0625, rel_tol=1e-9)
    assert math.isclose(cov["real"], -0.5) and math.isclose(cov["allocated"], -0.375)
