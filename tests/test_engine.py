"""Directional derivatives against float64 finite differences and across engines."""

import warnings

import pytest
import torch
from torch import nn

from _tiny import TinyMLP, addition_batch, tiny_lm
from polca_lightning.core.engine import DirectionalDerivatives, EngineError, estimate_cost
from polca_lightning.core.functional import ParameterSpace
from polca_lightning.core.losses import causal_lm_token_loss, classifier_token_loss


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


def test_engine_error_names_the_op_where_it_is_called_and_what_to_change():
    from _families import ZetaMLP

    model = ZetaMLP().double()
    space = ParameterSpace.from_module(model)
    batches = [(torch.rand(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3]))]
    with warnings.catch_warnings(), pytest.raises(EngineError) as info:
        warnings.simplefilter("error", RuntimeWarning)  # no warning about a fallback that did not happen
        DirectionalDerivatives(model, classifier_token_loss, space)(space.flatten(model), batches, _orthonormal(2, space.dim))
    text = str(info.value)
    assert "forward mode" in text and "reverse mode" in text
    assert "op special_zeta" in text and "op zeta" in text  # forward AD and autograd name it differently
    assert "_families.py" in text and "(forward)" in text  # the line of the model that calls it
    assert "no derivative in torch" in text and "parameters=" in text


def test_an_autograd_function_without_functorch_support_runs_in_reverse_mode_on_real_batches():
    """An old-style autograd.Function has no jvp and no vmap rule: forward mode and vmap fail, plain
    autograd on a real batch of one does not."""
    model = _WithOp(_Opaque).double()
    space = ParameterSpace.from_module(model)
    batch = (torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3]))
    V = _orthonormal(2, space.dim)
    with pytest.warns(RuntimeWarning, match="forward engine cannot differentiate"):
        dd = DirectionalDerivatives(model, classifier_token_loss, space)
        dd.choose = lambda *a, **k: "forward"
        out = dd(space.flatten(model), [batch], V)
    assert out.engine == "reverse"
    from _families import own_per_token_grads

    _, ref = own_per_token_grads(model, classifier_token_loss, batch, space.names, V)
    assert (out.g - ref).abs().max() <= 1e-12 * ref.abs().max()
    with pytest.raises(EngineError, match="setup_context"):
        DirectionalDerivatives(model, classifier_token_loss, space, engine="forward")(space.flatten(model), [batch], V)


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
    """Without the activation path (here a bare parameter; an nn.GRU's weights) reverse mode costs
    per-sample Jacobians, and ``auto`` must not price it as the activation path before it has
    measured anything (the LCA baseline after fit relies on it)."""
    with_path = estimate_cost(10, positions_per_sequence=4, sequence_length=12, curvature=False)
    without = estimate_cost(10, positions_per_sequence=4, sequence_length=12, curvature=False, activations=False)
    assert with_path["reverse"] < with_path["forward"] < without["reverse"]
    assert with_path["forward"] == without["forward"]
    class Scaled(nn.Module):  # the arithmetic transformer with a bare scale on its logits
        def __init__(self):
            super().__init__()
            self.net, self.scale = tiny_lm(), nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

        def forward(self, ids):
            return self.net(ids) * self.scale

    for model, pick in ((tiny_lm(), "reverse"), (Scaled(), "forward")):
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
    from polca_lightning.core._ghost import ghost_plan

    assert ghost_plan(tiny_lm(), ParameterSpace.from_module(tiny_lm()).names) is not None
    scaled = _WithScale()
    assert ghost_plan(scaled, ParameterSpace.from_module(scaled).names) is None
    tied = tiny_lm()
    tied.head.weight = tied.tok.weight  # a weight shared by two modules: both uses count
    assert ghost_plan(tied, ParameterSpace.from_module(tied).names)["tok.weight"] == [("tok", "weight"), ("head", "weight")]


class Conv1D(nn.Module):  # the name transformers gives it
    """transformers.pytorch_utils.Conv1D as it is written there: y = x W + b with W [in, out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


class _LlamaRMSNorm(nn.Module):
    """transformers' LlamaRMSNorm as it is written there (float32 inside)."""

    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden) + 0.1 * torch.randn(hidden))
        self.variance_epsilon = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class _GemmaRMSNorm(_LlamaRMSNorm):
    """Gemma's variant scales by 1 + w: the weight's gradient is the same."""

    def forward(self, x):
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return x * (1.0 + self.weight)


class _NewLayersLM(nn.Module):
    """Token and broadcast position embeddings, Conv1D, three RMSNorms, an output layer tied to the
    token embedding: what GPT-2 and Llama need from the activation path, in float64 throughout."""

    def __init__(self, vocab=12, d=6, length=7):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(length, d)
        self.c_fc, self.c_proj = Conv1D(2 * d, d), Conv1D(d, 2 * d)
        self.norm1, self.norm2, self.norm3 = _GemmaRMSNorm(d), nn.RMSNorm(d, eps=1e-5), _LlamaRMSNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, ids):
        positions = torch.arange(ids.shape[1])[None]  # [1, L], broadcast over the batch as GPT-2 does
        x = self.tok(ids) + self.pos(positions)
        x = x + self.c_proj(torch.tanh(self.c_fc(self.norm1(x))))
        return self.head(self.norm3(self.norm2(x)))


def test_activation_path_for_conv1d_rms_norm_tied_and_broadcast_layers_equals_per_sample_jacobians():
    from polca_lightning.core._ghost import ghost_plan, ghost_reverse
    from polca_lightning.core._jacobians import PerSampleJacobians
    from polca_lightning.core.functional import FunctionalTokenLoss, evaluation_mode

    torch.manual_seed(0)
    model = _NewLayersLM().double()
    space = ParameterSpace.from_module(model)
    plan = ghost_plan(model, space.names)
    assert plan is not None and len(plan["tok.weight"]) == 2
    fn = FunctionalTokenLoss(model, causal_lm_token_loss, space)
    theta, V = space.flatten(model), _orthonormal(4, space.dim)
    batch = torch.randint(0, 12, (5, 7))
    with evaluation_mode(model):
        loss, mask, g = ghost_reverse(fn, model, space, plan, theta, batch, V)
        ref, _ = PerSampleJacobians(fn)._looped(theta, batch, loss, mask, V, False)  # real batches of one
    # the Llama norm computes in float32 inside this float64 model: agreement to float32 rounding
    assert (g[:, mask] - ref[:, mask]).abs().max() <= 1e-7 * ref[:, mask].abs().max()
    from _families import own_per_token_grads

    _, own = own_per_token_grads(model, causal_lm_token_loss, batch, space.names, V)
    assert (g[:, mask] - own).abs().max() <= 1e-7 * own.abs().max()
    model.norm3 = _GemmaRMSNorm(6).double()  # float64 throughout: agreement to float64 rounding
    space = ParameterSpace.from_module(model)
    fn = FunctionalTokenLoss(model, causal_lm_token_loss, space)
    theta, V = space.flatten(model), _orthonormal(4, space.dim)
    with evaluation_mode(model):
        loss, mask, g = ghost_reverse(fn, model, space, ghost_plan(model, space.names), theta, batch, V)
        ref, _ = PerSampleJacobians(fn)._looped(theta, batch, loss, mask, V, False)
    assert (g[:, mask] - ref[:, mask]).abs().max() <= 1e-12 * ref[:, mask].abs().max()
    dd = DirectionalDerivatives(model, causal_lm_token_loss, space, engine="reverse")
    dd(theta, [batch], V)
    assert dd._ghost is not None  # checked and kept


@pytest.mark.parametrize("kind,batch_first,own_hidden", [("gru", True, False), ("lstm", False, True), ("gru", False, True)])
def test_recurrent_models_get_real_batches_in_every_engine(kind, batch_first, own_hidden):
    """nn.GRU/nn.LSTM create their hidden state (or the token loss does, from the batch size): under a
    vmap over samples that fails, so per-sample Jacobians run on real batches of one."""
    from _families import RecurrentLM, own_per_token_grads, rnn_token_loss

    torch.manual_seed(0)
    model = RecurrentLM(kind, batch_first=batch_first).double()
    token_loss = rnn_token_loss if own_hidden else causal_lm_token_loss
    space = ParameterSpace.from_module(model)
    theta, V, batch = space.flatten(model), _orthonormal(3, space.dim), torch.randint(0, 12, (3, 5))
    loss, ref = own_per_token_grads(model, token_loss, batch, space.names, V)
    for engine in ("forward", "reverse"):
        dd = DirectionalDerivatives(model, token_loss, space, engine=engine)
        out = dd(theta, [batch], V, curvature=True)
        assert out.engine == engine
        assert torch.allclose(out.loss, loss, rtol=1e-12, atol=0)
        assert (out.g - ref).abs().max() <= 1e-10 * ref.abs().max(), engine
    _, c_fd = _finite_differences(dd, theta, [batch], V[0])
    assert (out.c[0] - c_fd).abs().max() <= 1e-4 * c_fd.abs().max()
    assert not dd._jacobians.vmapped  # the vmapped way failed and was dropped
    small = DirectionalDerivatives(model, token_loss, space, engine="reverse", memory_cap=1)(theta, [batch], V)
    assert (small.g - ref).abs().max() <= 1e-10 * ref.abs().max()  # one position per backward pass


def test_calibration_drops_an_engine_that_fails_with_one_warning():
    model = _WithOp(_NoForwardAD).double()
    space = ParameterSpace.from_module(model)
    batch = (torch.randn(8, 3, dtype=torch.float64), torch.arange(8) % 4)
    dd = DirectionalDerivatives(model, classifier_token_loss, space)
    with pytest.warns(RuntimeWarning, match="forward engine cannot differentiate this model while being calibrated") as rec:
        cost = dd.calibrate(space.flatten(model), batch, max_directions=4)
        dd.calibrate(space.flatten(model), batch, max_directions=4)  # once only
    assert len([w for w in rec if "POLCA" in str(w.message)]) == 1
    assert cost["forward_per_direction"] == float("inf") and cost["reverse_base"] < float("inf")
    assert dd.choose(space.flatten(model), [batch], 100, False) == "reverse"
    from _families import ZetaMLP

    zeta = ZetaMLP().double()
    space = ParameterSpace.from_module(zeta)
    with pytest.raises(EngineError, match="forward mode.*reverse mode"):
        DirectionalDerivatives(zeta, classifier_token_loss, space).calibrate(space.flatten(zeta), batch, max_directions=4)


def test_tokens_with_a_nan_loss_are_nan_and_the_others_exact_in_every_path():
    """A NaN loss on some probe tokens (log of a negative feature) must not stop the activation path's
    check against per-sample Jacobians (its scale was NaN) nor touch other tokens."""
    from _families import LogFeatureMLP, own_per_token_grads

    torch.manual_seed(0)
    model = LogFeatureMLP().double()
    space = ParameterSpace.from_module(model)
    x = torch.rand(8, 3, dtype=torch.float64) + 0.1
    x[2, 0], x[5, 1] = -1.0, -2.0
    batch = (x, torch.arange(8) % 4)
    V = _orthonormal(3, space.dim)
    loss, ref = own_per_token_grads(model, classifier_token_loss, batch, space.names, V)
    bad = torch.tensor([False, False, True, False, False, True, False, False])
    assert torch.equal(~torch.isfinite(loss), bad)
    for engine in ("forward", "reverse", "auto"):
        dd = DirectionalDerivatives(model, classifier_token_loss, space, engine=engine)
        out = dd(space.flatten(model), [batch], V)
        assert torch.equal(torch.isnan(out.g).any(0), bad), engine
        assert (out.g[:, ~bad] - ref[:, ~bad]).abs().max() <= 1e-12 * ref[:, ~bad].abs().max(), engine
    assert dd._ghost is not None  # the activation path was checked and kept
    dd.calibrate(space.flatten(model), batch, max_directions=2)


def test_a_token_loss_that_depends_on_the_batch_size_has_no_per_sample_jacobian():
    """Per-sample Jacobians need each sample's loss alone to be its loss in the batch; a token loss
    divided by the batch size breaks that, reverse mode says so and auto uses forward mode."""
    def per_batch(module, batch):
        loss, mask = classifier_token_loss(module, batch)[:2]
        return loss / batch[0].shape[0], mask

    model = _WithScale().double()  # a bare parameter: no activation path, per-sample Jacobians
    space = ParameterSpace.from_module(model)
    batch = (torch.randn(4, 3, dtype=torch.float64), torch.arange(4))
    V = _orthonormal(2, space.dim)
    with pytest.raises(RuntimeError, match="differs from its loss in the batch"):
        DirectionalDerivatives(model, per_batch, space, engine="reverse")(space.flatten(model), [batch], V)
    dd = DirectionalDerivatives(model, per_batch, space)
    dd.choose = lambda *a, **k: "reverse"
    with pytest.warns(RuntimeWarning, match="reverse engine cannot differentiate"):
        out = dd(space.flatten(model), [batch], V)
    from _families import own_per_token_grads

    _, alone = own_per_token_grads(model, per_batch, batch, space.names, V)  # each sample as a batch of one
    ref = alone / 4  # ... is 4x its derivative in the batch of 4
    assert out.engine == "forward" and (out.g - ref).abs().max() <= 1e-12 * ref.abs().max()


class _NoVmapRule(torch.autograd.Function):
    """tanh with a backward and a jvp but no vmap rule: each engine runs it, neither under vmap."""

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)
        ctx.save_for_forward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)

    @staticmethod
    def jvp(ctx, tangent):
        (y,) = ctx.saved_tensors
        return tangent * (1 - y * y)


def test_an_op_without_a_vmap_rule_runs_one_direction_and_one_sample_at_a_time():
    from _families import own_per_token_grads

    model = _WithOp(_NoVmapRule).double()
    space = ParameterSpace.from_module(model)
    batch = (torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1]))
    V = _orthonormal(3, space.dim)
    _, ref = own_per_token_grads(model, classifier_token_loss, batch, space.names, V)
    for engine in ("forward", "reverse"):
        dd = DirectionalDerivatives(model, classifier_token_loss, space, engine=engine)
        dd._ghost = None  # the per-sample Jacobians, not the activation path, in reverse mode
        out = dd(space.flatten(model), [batch], V)
        assert (out.g - ref).abs().max() <= 1e-12 * ref.abs().max(), engine
    assert not dd._jacobians.vmapped
    forward = DirectionalDerivatives(model, classifier_token_loss, space, engine="forward")
    forward(space.flatten(model), [batch], V)
    assert not forward._vmap_directions  # the vmap over directions failed, one at a time did not


@pytest.mark.parametrize("curvature", [False, True])
def test_vmapped_per_sample_jacobians_hold_only_what_memory_cap_allows(monkeypatch, curvature):
    from polca_lightning.core._jacobians import PerSampleJacobians
    from polca_lightning.core.functional import FunctionalTokenLoss, evaluation_mode

    model = tiny_lm()  # float64
    space = ParameterSpace.from_module(model)
    fn = FunctionalTokenLoss(model, causal_lm_token_loss, space)
    theta, V, batch = space.flatten(model), _orthonormal(3, space.dim), addition_batch(6)
    seen = []
    original = PerSampleJacobians._vmapped_positions

    def spy(self, theta, leaves, spec, batched, n, cols, directions, curvature, samples_per_chunk, *out):
        seen.append((cols.numel(), max(1, min(n, samples_per_chunk))))
        return original(self, theta, leaves, spec, batched, n, cols, directions, curvature, samples_per_chunk, *out)

    monkeypatch.setattr(PerSampleJacobians, "_vmapped_positions", spy)
    with evaluation_mode(model):
        loss, mask, _ = fn(theta, batch)
        p = int(mask.any(0).sum())
        whole = PerSampleJacobians(fn)._vmapped(theta, batch, loss, mask, V, curvature, 1 << 30)
        assert seen == [(p, 6)]  # everything fits: every position of every sample in one go
        # g against real batches of one; c under vmap is not this model's (forward-over-reverse through its
        # attention: 6e-3 off finite differences), which PerSampleJacobians' own check against them catches
        ref = PerSampleJacobians(fn)._looped(theta, batch, loss, mask, V, False)[0]
        assert torch.allclose(whole[0][:, mask], ref[:, mask], rtol=1e-9, atol=1e-12)
        row = space.dim * 8 * (2 + (3 if curvature else 0))  # one position's Jacobian row and its copies
        for cap, group in ((3 * row, 3), (1, 1), (2 * p * row, p)):
            seen.clear()
            parts = PerSampleJacobians(fn)._vmapped(theta, batch, loss, mask, V, curvature, cap)
            assert sum(c for c, _ in seen) == p and max(c for c, _ in seen) == group, cap
            assert all(c * s * row <= max(cap, row) for c, s in seen), (cap, seen)  # rows in flight
            assert torch.allclose(parts[0][:, mask], ref[:, mask], rtol=1e-9, atol=1e-12), cap
            for a, b in zip(parts, whole):
                if a is not None:  # the same numbers as in one go
                    assert torch.allclose(a[:, mask], b[:, mask], rtol=1e-12, atol=1e-14), cap


def test_the_check_tolerance_grows_with_the_float32_rounding_of_a_dot_product_over_d():
    from polca_lightning.core.engine import check_rtol

    eps = 2.0**-24
    assert check_rtol("float32", 10_000) == 1e-4  # small models: the fixed float32 tolerance
    assert check_rtol("float32", 10**8) == pytest.approx(8 * eps * 1e4)  # 4.8e-3 at 100M parameters
    assert check_rtol("float32", 4 * 10**8) == pytest.approx(2 * check_rtol("float32", 10**8))  # sqrt(d)
    assert check_rtol("bf16", 10**8) == 5e-2  # bfloat16's own is larger still
    with pytest.raises(ValueError, match="compute_precision"):
        check_rtol("fp8", 10)


@pytest.mark.parametrize("error", [1e-2, -3e-3])
def test_an_activation_path_that_is_off_by_more_than_rounding_is_refused(monkeypatch, error):
    from polca_lightning.core import engine as engine_module
    from polca_lightning.core._jacobians import PerSampleJacobians
    from polca_lightning.core.functional import FunctionalTokenLoss, evaluation_mode

    honest = engine_module.ghost_reverse

    def off(*args, **kwargs):  # a planted error of `error` of each value
        loss, mask, g = honest(*args, **kwargs)
        return loss, mask, g * (1 + error)

    model = tiny_lm(dtype=torch.float32)
    space = ParameterSpace.from_module(model)
    theta, V, batch = space.flatten(model), _orthonormal(3, space.dim).float(), addition_batch(6)
    kept = DirectionalDerivatives(model, causal_lm_token_loss, space, engine="reverse")
    kept(theta, [batch], V)
    assert kept._ghost is not None  # the honest path agrees to float32 rounding
    monkeypatch.setattr(engine_module, "ghost_reverse", off)
    dd = DirectionalDerivatives(model, causal_lm_token_loss, space, engine="reverse")
    out = dd(theta, [batch], V)
    assert dd._ghost is None  # refused: per-sample Jacobians from then on
    fn = FunctionalTokenLoss(model, causal_lm_token_loss, space)
    with evaluation_mode(model):
        loss, mask, _ = fn(theta, batch)
        ref, _ = PerSampleJacobians(fn)._looped(theta, batch, loss, mask, V, False)
    assert (out.g - ref[:, mask]).abs().max() <= 1e-5 * ref[:, mask].abs().max()


def test_the_calibration_holds_as_many_random_directions_as_memory_cap_allows(monkeypatch):
    from polca_lightning.core import engine as engine_module

    rows = []
    original = engine_module.orthonormalize_rows

    def spy(vectors, *args, **kwargs):  # the calibration's random directions pass through here once
        rows.append(vectors.shape[0])
        return original(vectors, *args, **kwargs)

    monkeypatch.setattr(engine_module, "orthonormalize_rows", spy)
    model = tiny_lm()  # float64: a direction is 8 d bytes
    space = ParameterSpace.from_module(model)
    theta, batch, row = space.flatten(model), addition_batch(8), space.dim * 8
    # (memory_cap, max_directions asked, directions held): 2 the fewest that give a cost per direction
    for cap, asked, held in ((1 << 30, 8, 8), (1, 8, 2), (5 * row, 8, 5), (1, 1, 1)):
        dd = DirectionalDerivatives(model, causal_lm_token_loss, space, memory_cap=cap)
        cost = dd.calibrate(theta, batch, max_directions=asked)
        assert rows[-1] == held and all(0 <= v < float("inf") for v in cost.values()), cap
