"""Directional derivatives against float64 finite differences and across engines."""

import pytest
import torch
from torch import nn

from _tiny import TinyMLP, addition_batch, tiny_lm
from polca_lightning.engine import DirectionalDerivatives, EngineError, estimate_cost
from polca_lightning.functional import ParameterSpace
from polca_lightning.losses import causal_lm_token_loss, classifier_token_loss


def _orthonormal(k, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=torch.float64))
    return q.T.contiguous()  # [k, d]


def _finite_differences(dd, theta, batches, v, h=1e-5):
    """Central differences of every token's loss along v: first with step h, second with 100h."""
    lp, lm = dd(theta + h * v, batches).loss, dd(theta - h * v, batches).loss
    H = 100 * h
    Lp, L0, Lm = (dd(theta + s * v, batches).loss for s in (H, 0.0, -H))
    return (lp - lm) / (2 * h), (Lp - 2 * L0 + Lm) / H**2


CASES = {
    "transformer": lambda: (tiny_lm(), causal_lm_token_loss, [addition_batch(5, 0), addition_batch(3, 1)]),
    "classifier": lambda: (
        TinyMLP().double(),
        classifier_token_loss,
        [(torch.randn(6, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1, -100]))],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_engines_match_finite_differences_and_each_other(case):
    torch.manual_seed(1)
    model, token_loss, batches = CASES[case]()
    space = ParameterSpace.from_module(model)
    theta = space.flatten(model)
    V = _orthonormal(3, space.dim)
    results = {
        e: DirectionalDerivatives(model, token_loss, space, engine=e)(theta, batches, V, curvature=True)
        for e in ("forward", "reverse")
    }
    ref = DirectionalDerivatives(model, token_loss, space)
    for k in range(3):
        g_fd, c_fd = _finite_differences(ref, theta, batches, V[k])
        for name, r in results.items():
            assert r.engine == name
            scale_g, scale_c = g_fd.abs().max(), c_fd.abs().max()
            assert (r.g[k] - g_fd).abs().max() <= 1e-5 * scale_g, name
            assert (r.c[k] - c_fd).abs().max() <= 1e-4 * scale_c, name
    f, r = results["forward"], results["reverse"]
    assert torch.allclose(f.loss, r.loss, rtol=0, atol=1e-12)
    assert (f.g - r.g).abs().max() <= 1e-6 * f.g.abs().max()
    assert (f.c - r.c).abs().max() <= 1e-6 * f.c.abs().max()
    n_tokens = sum(int((b["labels"] != -100).sum()) if isinstance(b, dict) else int((b[1] != -100).sum()) for b in batches)
    assert f.g.shape == (3, n_tokens)


def test_layer_norm_curvature_is_exact():
    """Forward-over-forward through the fused F.layer_norm is wrong in torch 2.13; ours is not."""
    model = tiny_lm(seed=3)
    space = ParameterSpace.from_module(model, include=["blocks.0.ln1.*", "blocks.0.qkv.weight"])
    theta = space.flatten(model)
    v = _orthonormal(1, space.dim, seed=4)
    batches = [addition_batch(4)]
    dd = DirectionalDerivatives(model, causal_lm_token_loss, space, engine="forward")
    c = dd(theta, batches, v, curvature=True).c[0]
    _, c_fd = _finite_differences(dd, theta, batches, v[0])
    assert (c - c_fd).abs().max() <= 1e-4 * c_fd.abs().max()
    assert torch.nn.functional.layer_norm.__module__ == "torch.nn.functional"  # restored


def test_parameter_subset_equals_padded_full_directions():
    model = tiny_lm()
    full = ParameterSpace.from_module(model)
    sub = ParameterSpace.from_module(model, include=["blocks.0.mlp.*", "head.weight"])
    assert sub.names == ("blocks.0.mlp.0.weight", "blocks.0.mlp.0.bias", "blocks.0.mlp.2.weight", "blocks.0.mlp.2.bias", "head.weight")
    V_sub = _orthonormal(2, sub.dim)
    # embed the subset directions into the full space, zero elsewhere
    pieces = dict(zip(sub.names, torch.split(V_sub, sub.numels, dim=1)))
    V_full = torch.cat(
        [pieces.get(n, torch.zeros(2, size, dtype=torch.float64)) for n, size in zip(full.names, full.numels)], dim=1
    )
    batches = [addition_batch(4)]
    a = DirectionalDerivatives(model, causal_lm_token_loss, sub)(sub.flatten(model), batches, V_sub)
    b = DirectionalDerivatives(model, causal_lm_token_loss, full)(full.flatten(model), batches, V_full)
    assert torch.allclose(a.g, b.g, atol=1e-12)
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        ParameterSpace.from_module(model, include=["nope.*"])


@pytest.mark.parametrize("engine", ["forward", "reverse"])
def test_memory_cap_chunks_without_changing_results(engine):
    model = tiny_lm()
    space = ParameterSpace.from_module(model)
    theta, V, batches = space.flatten(model), _orthonormal(4, space.dim), [addition_batch(5)]
    big = DirectionalDerivatives(model, causal_lm_token_loss, space, engine=engine)(theta, batches, V, curvature=True)
    small = DirectionalDerivatives(model, causal_lm_token_loss, space, engine=engine, memory_cap=1)(
        theta, batches, V, curvature=True
    )
    assert torch.allclose(big.g, small.g, atol=1e-13) and torch.allclose(big.c, small.c, atol=1e-13)


def test_module_is_left_as_found():
    model = tiny_lm()
    model.train()
    model.blocks[0].mlp.eval()  # a mixed state must come back mixed
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    space = ParameterSpace.from_module(model)
    for engine in ("forward", "reverse"):
        DirectionalDerivatives(model, causal_lm_token_loss, space, engine=engine)(
            space.flatten(model), [addition_batch(3)], _orthonormal(2, space.dim), curvature=True
        )
    assert model.training and not model.blocks[0].mlp.training and model.blocks[0].ln1.training
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and torch.equal(p.grad, torch.full_like(p, 7.0))


class _NoForwardAD(torch.autograd.Function):
    """tanh with a backward and a vmap rule but no jvp: forward mode cannot go through it."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _Opaque(torch.autograd.Function):
    """An old-style Function: no jvp, no vmap rule. Neither engine can go through it."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _WithOp(TinyMLP):
    def __init__(self, op):
        super().__init__()
        self.op = op

    def forward(self, x):
        return self.net[2](self.op.apply(self.net[0](x)))


def test_engine_falls_back_when_forward_mode_cannot_differentiate():
    model = _WithOp(_NoForwardAD).double()
    space = ParameterSpace.from_module(model)
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3]))]
    dd = DirectionalDerivatives(model, classifier_token_loss, space, engine="auto")
    V = _orthonormal(8, space.dim)  # many directions on 1 position: the cost model picks... reverse anyway
    with pytest.raises(EngineError, match="forward mode"):
        DirectionalDerivatives(model, classifier_token_loss, space, engine="forward")(
            space.flatten(model), batches, V
        )
    dd.choose = lambda *a, **k: "forward"  # force the fallback path
    with pytest.warns(RuntimeWarning, match="forward engine cannot differentiate"):
        out = dd(space.flatten(model), batches, V)
    assert out.engine == "reverse"
    ref = DirectionalDerivatives(TinyMLP().double(), classifier_token_loss, space)
    ref.module.load_state_dict(model.state_dict(), strict=False)
    assert torch.allclose(out.g, ref(space.flatten(model), batches, V, curvature=False).g, atol=1e-12)


def test_engine_error_says_what_to_change():
    model = _WithOp(_Opaque).double()
    space = ParameterSpace.from_module(model)
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3]))]
    with pytest.warns(RuntimeWarning), pytest.raises(EngineError, match='attn_implementation="eager"'):
        DirectionalDerivatives(model, classifier_token_loss, space)(space.flatten(model), batches, _orthonormal(2, space.dim))


def test_cost_model_prefers_reverse_for_few_positions_and_forward_for_many():
    arithmetic = estimate_cost(50, positions_per_sequence=4, sequence_length=12, curvature=False)
    language = estimate_cost(16, positions_per_sequence=128, sequence_length=128, curvature=False)
    assert arithmetic["reverse"] < arithmetic["forward"]
    assert language["forward"] < language["reverse"]
    model = tiny_lm()
    space = ParameterSpace.from_module(model)
    dd = DirectionalDerivatives(model, causal_lm_token_loss, space)
    assert dd.choose(space.flatten(model), [addition_batch(2)], 50, False) == "reverse"
    lm_batch = torch.randint(0, 12, (2, 12))  # every position after the first is a token
    assert dd.choose(space.flatten(model), [lm_batch], 1, False) == "forward"


def test_cost_model_knows_when_reverse_mode_needs_per_sample_jacobians():
    """Without the activation path (here a weight shared by two modules; transformers' GPT-2 Conv1D,
    Llama's RMSNorm) reverse mode costs per-sample Jacobians, and ``auto`` must not price it as the
    activation path before it has measured anything (the LCA baseline after fit relies on it)."""
    with_path = estimate_cost(10, positions_per_sequence=4, sequence_length=12, curvature=False)
    without = estimate_cost(10, positions_per_sequence=4, sequence_length=12, curvature=False, activations=False)
    assert with_path["reverse"] < with_path["forward"] < without["reverse"]
    assert with_path["forward"] == without["forward"]
    tied = tiny_lm()
    tied.head.weight = tied.tok.weight
    for model, pick in ((tiny_lm(), "reverse"), (tied, "forward")):
        space = ParameterSpace.from_module(model)
        dd = DirectionalDerivatives(model, causal_lm_token_loss, space)
        assert dd.choose(space.flatten(model), [addition_batch(2)], 10, False) == pick


def test_bad_inputs_are_named():
    model = tiny_lm()
    space = ParameterSpace.from_module(model)
    dd = DirectionalDerivatives(model, causal_lm_token_loss, space)
    theta = space.flatten(model)
    with pytest.raises(ValueError, match="directions: expected shape"):
        dd(theta, [addition_batch(2)], torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="theta: expected shape"):
        dd(theta[:-1], [addition_batch(2)])
    with pytest.raises(ValueError, match="at least one batch"):
        dd(theta, [])
    masked = addition_batch(2)
    masked["labels"][:] = -100
    with pytest.raises(ValueError, match="every token is masked"):
        dd(theta, [masked], _orthonormal(1, space.dim))
    with pytest.raises(ValueError, match="engine: expected one of"):
        DirectionalDerivatives(model, causal_lm_token_loss, space, engine="fast")


class _BroadcastPositions(torch.nn.Module):
    """nanoGPT-style: the position embedding is looked up for [L] and broadcast over the batch."""

    def __init__(self, vocab=12, d=8, length=6):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1]))  # [B, L, d] + [L, d]
        return self.head(self.ln(x))


class _WithScale(TinyMLP):
    """A bare nn.Parameter: no module to take activations from."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return super().forward(x) * self.scale


@pytest.mark.parametrize("batch_size", [6, 4])  # 6 == length: the broadcast output looks batch-first
def test_reverse_paths_agree_with_forward_mode(batch_size):
    cases = [
        (_BroadcastPositions().double(), causal_lm_token_loss, [torch.randint(0, 12, (batch_size, 6))]),
        (_WithScale().double(), classifier_token_loss, [(torch.randn(batch_size, 3, dtype=torch.float64), torch.arange(batch_size) % 4)]),
        (tiny_lm(), causal_lm_token_loss, [addition_batch(batch_size)]),
    ]
    for model, token_loss, batches in cases:
        space = ParameterSpace.from_module(model)
        theta, V = space.flatten(model), _orthonormal(3, space.dim)
        fwd = DirectionalDerivatives(model, token_loss, space, engine="forward")(theta, batches, V)
        rev = DirectionalDerivatives(model, token_loss, space, engine="reverse")(theta, batches, V)
        assert (fwd.g - rev.g).abs().max() <= 1e-10 * fwd.g.abs().max(), type(model).__name__


def test_activation_based_reverse_mode_is_used_where_it_applies():
    from polca_lightning._ghost import ghost_plan

    assert ghost_plan(tiny_lm(), ParameterSpace.from_module(tiny_lm()).names) is not None
    scaled = _WithScale()
    assert ghost_plan(scaled, ParameterSpace.from_module(scaled).names) is None
    tied = tiny_lm()
    tied.head.weight = tied.tok.weight  # a weight shared by two modules
    assert ghost_plan(tied, ParameterSpace.from_module(tied).names) is None
