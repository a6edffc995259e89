"""Conformance: the callback, unchanged, on the models and training set-ups people actually use.

One case per family or set-up, tiny and on the CPU. Each trains a few steps with
``POLCACallback`` at its defaults (the analysis, the LCA baseline and the causal check run
after fit) and checks that

- the run finishes and the store is complete (no NaN in ``polca``, at least two basis vectors);
- the stored per-token losses are the model's own loss, computed independently (its own
  ``labels=`` loss for Hugging Face models, ``nn.CrossEntropyLoss`` on its logits otherwise,
  with the fast paths the model runs with), at the first and the last snapshot, to 1e-5;
- where both engines apply, forward and reverse mode agree with each other and with the
  stored ``directional_grad`` at the last snapshot, to 1e-5 of its scale.

The last tests break each engine path on purpose and show that these checks fail.
"""

import copy

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from _families import ConvNet, DecoderLM, EncoderLM, LogFeatureMLP, RecurrentLM, ZetaMLP, rnn_token_loss
from _tiny import batches as addition_batches
from _tiny import tiny_lm
from polca_lightning import POLCACallback, open_store
from polca_lightning.core.engine import DirectionalDerivatives, EngineError
from polca_lightning.core.functional import ParameterSpace
from polca_lightning.core.losses import causal_lm_token_loss, classifier_token_loss, masked_lm_token_loss

STEPS = 4


class Lit(L.LightningModule):
    """A LightningModule as a user writes one: the mean token loss, SGD; manual optimization on request."""

    def __init__(self, net, token_loss=causal_lm_token_loss, lr=0.05, manual=False):
        super().__init__()
        self.net, self._loss, self.lr = net, token_loss, lr
        self.automatic_optimization = not manual

    def forward(self, *args, **kwargs):
        return self.net(*args, **kwargs)

    def training_step(self, batch, _):
        loss, mask = self._loss(self, batch)[:2]
        loss = loss[mask].mean()
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr, momentum=0.9)


# ----------------------------------------------------------------------- data
def lm_batches(n, size, seed, vocab=12, length=8, padded=False, as_dict=True):
    """Random token sequences; ``padded``: right-padded with 0 (lengths 4..length) and an attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=gen)
    out = []
    for i in range(0, n, size):
        chunk = ids[i : i + size].clone()
        if not as_dict:
            out.append(chunk)
            continue
        batch = {"input_ids": chunk}
        if padded:
            lengths = torch.randint(4, length + 1, (len(chunk),), generator=gen)
            lengths[0] = length  # one full row: the batch keeps its length
            mask = (torch.arange(length) < lengths[:, None]).long()
            batch = {"input_ids": chunk.masked_fill(mask == 0, 0), "attention_mask": mask}
        out.append(batch)
    return out


def image_batches(n, size, seed, classes=3):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, classes, (n,), generator=gen)
    return [(x[i : i + size], y[i : i + size]) for i in range(0, n, size)]


def mlm_batches(n, size, seed, vocab=20, length=8, mask_id=1):
    """BERT-style: 2 positions per sequence replaced by [MASK], labels there only; right padding."""
    out = []
    for b in lm_batches(n, size, seed, vocab=vocab, length=length, padded=True):
        ids, am = b["input_ids"].clone(), b["attention_mask"]
        gen = torch.Generator().manual_seed(seed + len(out))
        labels = torch.full_like(ids, -100)
        for i in range(len(ids)):
            for p in torch.randperm(int(am[i].sum()), generator=gen)[:2].tolist():
                labels[i, p], ids[i, p] = ids[i, p], mask_id
        out.append({"input_ids": ids, "attention_mask": am, "labels": labels})
    return out


# ---------------------------------------------------- the model's own loss
def own_lm_loss(net, probe):
    """Next-token cross-entropy from the model's logits, at every non-padded position p >= 1."""
    out = []
    for b in probe:
        ids = b if isinstance(b, torch.Tensor) else b["input_ids"]
        am = None if isinstance(b, torch.Tensor) else b.get("attention_mask")
        logits = net(ids) if am is None else net(ids, attention_mask=am)
        logits = getattr(logits, "logits", logits)
        labels = ids[:, 1:] if am is None else ids[:, 1:].masked_fill(am[:, 1:] == 0, -100)
        per = nn.CrossEntropyLoss(reduction="none")(logits[:, :-1].transpose(1, 2), labels)  # [B, L-1]
        out.append(per[labels != -100])
    return torch.cat(out)


def own_hf_loss(net, probe, shift=True):
    """Hugging Face's own ``labels=`` loss of each token alone (it shifts causal LM labels itself)."""
    out = []
    for b in probe:
        ids, am = b["input_ids"], b["attention_mask"]
        wanted = b["labels"] if "labels" in b else ids.masked_fill(am == 0, -100)
        for i in range(len(ids)):
            for p in range(ids.shape[1]):
                if wanted[i, p] == -100 or (shift and p == 0):
                    continue
                only = torch.full_like(ids[i : i + 1], -100)
                only[0, p] = wanted[i, p]
                out.append(net(input_ids=ids[i : i + 1], attention_mask=am[i : i + 1], labels=only).loss.reshape(1))
    return torch.cat(out)


def own_classifier_loss(net, probe):
    return torch.cat([nn.CrossEntropyLoss(reduction="none")(net(x), y) for x, y in probe])


# ----------------------------------------------------------------- the run
def fit(tmp_path, module, train, probe, hessian=None, token_loss=None, trainer_kw=None, **cb_kw):
    cb = POLCACallback(
        store=tmp_path / "polca.zarr", probe_data=probe, hessian_data=hessian if hessian is not None else train[:1],
        token_loss=token_loss, snapshot_every=2, basis_every=4, k=2, max_basis=2, progress=False,
        **cb_kw,
    )
    kw = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
              accelerator="cpu", devices=1, max_steps=STEPS)
    kw.update(trainer_kw or {})
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[cb], **kw)
    trainer.fit(module, DataLoader(train, batch_size=None, shuffle=False))
    assert trainer.global_step == STEPS
    return cb, open_store(cb.store).load()


def evaluated(module, fn, *args):
    """``fn(module, *args)`` in eval mode without gradients, the module's mode restored."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            return fn(module, *args)
    finally:
        for m, training in modes:
            m.training = training


def assert_conforms(cb, ds, initial, final, own_loss, *, both_engines=True, nan_tokens=None):
    """The store is complete, its losses are the model's own, and both engines give its directional_grad."""
    assert ds.attrs["complete"] and ds.sizes["basis"] >= 2 and ds.sizes["snapshot"] == STEPS // 2 + 1
    finite = np.ones(ds.sizes["token"], bool) if nan_tokens is None else ~nan_tokens
    assert not np.isnan(ds["polca"].values[:, :, finite]).any()
    for j, module in ((0, initial), (-1, final)):
        expected = evaluated(module, own_loss).double().numpy()
        stored = ds["loss"].values[j]
        assert np.array_equal(np.isnan(stored), np.isnan(expected)), "NaN tokens differ"
        np.testing.assert_allclose(stored[finite], expected[finite], rtol=1e-5, atol=1e-6, err_msg=f"loss[{j}]")
    if both_engines:
        stored = torch.from_numpy(ds["directional_grad"].values[-1][:, finite]).double()
        basis = torch.from_numpy(ds["basis_vectors"].values)
        assert_engines_agree(final, cb.tracker.token_loss, cb.probe_batches, basis, stored, finite)


def assert_engines_agree(module, token_loss, probe, basis, stored=None, finite=None):
    space = ParameterSpace.from_module(module)
    theta = space.flatten(module)
    g = {}
    for engine in ("forward", "reverse"):
        out = DirectionalDerivatives(module, token_loss, space, engine=engine)(theta, probe, basis.to(theta))
        assert out.engine == engine
        g[engine] = out.g.double() if finite is None else out.g.double()[:, finite]
    scale = g["forward"].abs().max()
    assert (g["forward"] - g["reverse"]).abs().max() <= 1e-5 * scale, "forward and reverse mode disagree"
    if stored is not None:
        assert (g["forward"] - stored).abs().max() <= 1e-5 * scale, "the stored directional_grad is not forward mode's"


# ------------------------------------------------------------ recurrent LMs
@pytest.mark.parametrize("kind,batch_first,token_loss", [
    ("gru", True, None),  # the default causal-LM token loss, no hidden state passed: nn.GRU makes its own
    ("gru", False, rnn_token_loss),  # init_hidden(x.shape[0]) in the token loss
    ("lstm", True, rnn_token_loss),
    ("lstm", False, rnn_token_loss),
])
def test_recurrent_language_models(tmp_path, kind, batch_first, token_loss):
    torch.manual_seed(0)
    module = Lit(RecurrentLM(kind, layers=2, batch_first=batch_first), token_loss or causal_lm_token_loss)
    initial = copy.deepcopy(module)
    probe = lm_batches(8, 4, seed=1, as_dict=False)
    cb, ds = fit(tmp_path, module, lm_batches(32, 8, seed=0, as_dict=False), probe, token_loss=token_loss)
    assert_conforms(cb, ds, initial, module, lambda m: own_lm_loss(m.net, probe))


# ------------------------------------------------------------- transformers
@pytest.mark.parametrize("net", [EncoderLM, DecoderLM])
def test_torch_transformer_layers_with_padding_and_causal_masks(tmp_path, net):
    torch.manual_seed(0)
    assert torch.backends.mha.get_fastpath_enabled()  # as users leave it: on
    module = Lit(net())
    initial = copy.deepcopy(module)
    probe = lm_batches(8, 4, seed=1, padded=True)
    cb, ds = fit(tmp_path, module, lm_batches(32, 8, seed=0, padded=True), probe)
    assert torch.backends.mha.get_fastpath_enabled()  # restored
    assert_conforms(cb, ds, initial, module, lambda m: own_lm_loss(m.net, probe))


# -------------------------------------------------------------- classifiers
@pytest.mark.parametrize("norm", ["batch", "group"])
def test_convolutional_classifiers(tmp_path, norm):
    torch.manual_seed(0)
    module = Lit(ConvNet(norm), classifier_token_loss)
    initial = copy.deepcopy(module)  # BatchNorm's running statistics at snapshot 0
    probe = image_batches(8, 4, seed=1)
    cb, ds = fit(tmp_path, module, image_batches(32, 8, seed=0), probe, token_loss=classifier_token_loss)
    assert_conforms(cb, ds, initial, module, lambda m: own_classifier_loss(m.net, probe))
    if norm == "batch":
        assert not torch.equal(initial.net.features[1].running_mean, module.net.features[1].running_mean)


# ------------------------------------------------------------ Hugging Face
def hf_model(arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":  # Conv1D projections, the output layer tied to the token embedding
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=12, n_positions=8, n_embd=8, n_layer=1, n_head=2, bos_token_id=1, eos_token_id=1))
    if arch == "llama":  # RMSNorm, rotary position embeddings, grouped-query attention
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=12, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=8, bos_token_id=1, eos_token_id=1, pad_token_id=0))
    return transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        max_position_embeddings=8, pad_token_id=0))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hugging_face_causal_language_models_on_padded_batches(tmp_path, arch):
    net = hf_model(arch)
    assert net.config._attn_implementation == "sdpa"  # transformers' default, as users leave it
    module = Lit(net)
    initial = copy.deepcopy(module)
    probe = lm_batches(6, 3, seed=1, padded=True)
    cb, ds = fit(tmp_path, module, lm_batches(24, 6, seed=0, padded=True), probe)
    assert_conforms(cb, ds, initial, module, lambda m: own_hf_loss(m.net, probe))


def test_hugging_face_masked_language_model(tmp_path):
    module = Lit(hf_model("bert"), masked_lm_token_loss)
    initial = copy.deepcopy(module)
    probe = mlm_batches(6, 3, seed=1)
    cb, ds = fit(tmp_path, module, mlm_batches(24, 6, seed=0), probe, token_loss=masked_lm_token_loss)
    assert ds.sizes["token"] == 12  # two masked positions per sequence
    assert_conforms(cb, ds, initial, module, lambda m: own_hf_loss(m.net, probe, shift=False))


# --------------------------------------------------------- frozen parameters
def test_frozen_parameters_are_left_out_and_the_store_says_so(tmp_path):
    torch.manual_seed(0)
    module = Lit(tiny_lm(dtype=torch.float32))
    module.net.tok.weight.requires_grad_(False)
    initial = copy.deepcopy(module)
    probe = addition_batches(8, 4, seed=1)
    cb, ds = fit(tmp_path, module, addition_batches(32, 8, seed=0), probe)
    names = [n for n, _ in ds.attrs["parameters"]]
    assert "net.tok.weight" not in names and names[0] == "net.pos.weight"
    assert ds.attrs["config"]["frozen_parameters"] == ["net.tok.weight"]
    assert ds.sizes["param"] == sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert torch.equal(initial.net.tok.weight, module.net.tok.weight)
    assert_conforms(cb, ds, initial, module, lambda m: own_addition_loss(m, probe))


def own_addition_loss(module, probe):
    """The addition task's loss: cross-entropy of each sum digit from the logits before it."""
    out = []
    for b in probe:
        logits = module(b["input_ids"])
        per = nn.CrossEntropyLoss(reduction="none")(logits[:, :-1].transpose(1, 2), b["labels"][:, 1:])
        out.append(per[b["labels"][:, 1:] != -100])
    return torch.cat(out)


# -------------------------------------------------------- training set-ups
SETUPS = {
    "gradient accumulation": dict(trainer_kw={"accumulate_grad_batches": 2}),
    "bf16-mixed": dict(trainer_kw={"precision": "bf16-mixed"}),
    "manual optimization": dict(manual=True),
    "torch.compile": dict(compiled=True),
    "float64": dict(trainer_kw={"precision": "64-true"}),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_training_setups(tmp_path, setup):
    spec = SETUPS[setup]
    torch.manual_seed(0)
    module = Lit(tiny_lm(dtype=torch.float32), manual=spec.get("manual", False))
    initial = copy.deepcopy(module)
    probe = addition_batches(8, 4, seed=1)
    # the backend does not matter to the callback (it runs compiled code eagerly); inductor would
    # spend minutes compiling the training step on two CPU cores
    trained = torch.compile(module, backend="eager") if spec.get("compiled") else module
    cb, ds = fit(tmp_path, trained, addition_batches(64, 8, seed=0), probe, trainer_kw=spec.get("trainer_kw"))
    config = ds.attrs["config"]
    if setup == "float64":
        assert module.net.head.weight.dtype == torch.float64 and config["compute_dtype"] == "float64"
        initial = initial.double()
    else:
        assert config["compute_dtype"] == "float32"  # whatever the training precision
    assert config["training_precision"] == spec.get("trainer_kw", {}).get("precision", "32-true")
    if setup == "gradient accumulation":
        assert ds["step"].values.tolist() == [0, 2, 4]  # optimizer steps, not micro-batches
    assert_conforms(cb, ds, initial, module, lambda m: own_addition_loss(m, probe))


# ------------------------------------------------------------------ failures
def test_a_model_no_engine_can_differentiate_fails_before_the_first_step(tmp_path):
    torch.manual_seed(0)
    module = Lit(ZetaMLP(), classifier_token_loss)
    before = [p.detach().clone() for p in module.parameters()]
    data = [(torch.rand(8, 3), torch.randint(0, 4, (8,))) for _ in range(4)]
    with pytest.raises(EngineError) as info:
        fit(tmp_path, module, data, data[:1], token_loss=classifier_token_loss)
    text = str(info.value)
    assert "op zeta" in text and "_families.py" in text  # which op, and where the model calls it
    assert "replace zeta" in text and "parameters=" in text  # what to change
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))  # no step taken
    assert not (tmp_path / "polca.zarr").exists()


def test_probe_tokens_with_a_nan_loss_from_the_first_step(tmp_path):
    """Log-features: a probe example with a negative feature has a NaN loss at every snapshot."""
    torch.manual_seed(0)
    module = Lit(LogFeatureMLP(), classifier_token_loss)
    initial = copy.deepcopy(module)
    gen = torch.Generator().manual_seed(0)
    train = [(torch.rand(8, 3, generator=gen) + 0.1, torch.randint(0, 4, (8,), generator=gen)) for _ in range(4)]
    x = torch.rand(8, 3, generator=gen) + 0.1
    x[2, 0], x[5, 1] = -1.0, -0.5
    probe = [(x[:4], torch.arange(4)), (x[4:], torch.arange(4))]
    with pytest.warns(RuntimeWarning, match="not finite") as record:
        cb, ds = fit(tmp_path, module, train, probe, token_loss=classifier_token_loss)
    assert sum("not finite" in str(w.message) for w in record) == 1  # warned once
    nan_tokens = np.zeros(8, bool)
    nan_tokens[[2, 5]] = True
    assert np.isnan(ds["loss"].values).any(0).tolist() == nan_tokens.tolist()
    assert np.isnan(ds["polca"].values[:, :, nan_tokens]).all()
    assert_conforms(cb, ds, initial, module, lambda m: own_classifier_loss(m.net, probe), nan_tokens=nan_tokens)


# ---------------------------------------- the checks fail on a broken engine
def _broken(path, skip):
    """``path`` with its directional derivatives off by 1e-3 (relative); outputs before ``skip`` kept."""
    def wrapper(*args, **kwargs):
        out = path(*args, **kwargs)
        return tuple(o * (1 + 1e-3) if i >= skip and isinstance(o, torch.Tensor) and o.is_floating_point() else o
                     for i, o in enumerate(out))
    return wrapper


BROKEN = {  # engine path -> (where it lives, what to break, outputs to keep, a model that takes that path)
    "forward": ("engine", "DirectionalDerivatives._forward_batch", 1, "lm"),
    "reverse, activations": ("engine", "ghost_reverse", 1, "lm"),
    "reverse, vmapped per-sample Jacobians": ("_jacobians", "PerSampleJacobians._vmapped", 0, "conv"),
    "reverse, per-sample Jacobians on batches of one": ("_jacobians", "PerSampleJacobians._looped", 0, "gru"),
}


@pytest.mark.parametrize("path", list(BROKEN))
def test_the_engine_check_fails_when_an_engine_path_is_broken(monkeypatch, path):
    """Each path broken, and the engine's own checks between its paths with it (they would catch a
    broken path and fall back): the suite's comparison of the two engines fails."""
    import importlib

    where, target, skip, model = BROKEN[path]
    torch.manual_seed(0)
    net, token_loss, probe = {
        "lm": lambda: (tiny_lm(dtype=torch.float32), causal_lm_token_loss, addition_batches(8, 4, seed=1)),
        "conv": lambda: (ConvNet("group"), classifier_token_loss, image_batches(8, 4, seed=1)),
        "gru": lambda: (RecurrentLM("gru"), rnn_token_loss, lm_batches(4, 4, seed=1, as_dict=False)),
    }[model]()
    space = ParameterSpace.from_module(net)
    basis = torch.linalg.qr(torch.randn(space.dim, 2)).Q.T.contiguous()
    assert_engines_agree(net, token_loss, probe, basis)  # intact, the check passes
    module = importlib.import_module(f"polca_lightning.core.{where}")
    owner, _, name = target.rpartition(".")
    holder = getattr(module, owner) if owner else module
    monkeypatch.setattr(holder, name, _broken(getattr(holder, name), skip))
    for checked in ("polca_lightning.core.engine", "polca_lightning.core._jacobians"):
        monkeypatch.setattr(importlib.import_module(checked), "agree", lambda *a, **k: True)
    with pytest.raises(AssertionError, match="disagree"):
        assert_engines_agree(net, token_loss, probe, basis)


def test_the_loss_check_fails_on_a_token_loss_that_looks_at_the_batch_size(tmp_path):
    """A token loss divided by ``batch.shape[0]``: the run goes on (auto falls back to forward mode, said
    once), and the stored losses are not the model's own, which the suite says."""
    def per_batch(module, batch):
        loss, mask, target = classifier_token_loss(module, batch)
        return loss / batch[0].shape[0], mask, target

    torch.manual_seed(0)
    module = Lit(ConvNet("group"), per_batch)
    initial = copy.deepcopy(module)
    probe = image_batches(8, 4, seed=1)
    with pytest.warns(RuntimeWarning, match="reverse engine cannot differentiate.*batch"):
        cb, ds = fit(tmp_path, module, image_batches(32, 8, seed=0), probe, token_loss=per_batch)
    with pytest.raises(AssertionError, match="loss"):
        assert_conforms(cb, ds, initial, module, lambda m: own_classifier_loss(m.net, probe), both_engines=False)


def test_without_real_batches_of_one_the_recurrent_case_fails(tmp_path, monkeypatch):
    """The engine as it was (per-sample Jacobians vmapped only): nn.GRU stops the run at set-up."""
    import polca_lightning.core._jacobians as jacobians

    def vmapped_only(self, theta, batch, loss, mask, directions, curvature, memory_cap):
        return self._vmapped(theta, batch, loss, mask, directions, curvature, memory_cap)

    monkeypatch.setattr(jacobians.PerSampleJacobians, "__call__", vmapped_only)
    torch.manual_seed(0)
    module = Lit(RecurrentLM("gru"))
    with pytest.raises(RuntimeError, match="broadcast shape"):
        fit(tmp_path, module, lm_batches(32, 8, seed=0, as_dict=False), lm_batches(8, 4, seed=1, as_dict=False),
            engine="reverse")
