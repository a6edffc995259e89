"""The token-loss contract: built-ins against hand-computed cross-entropies, and its errors."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _tiny import TinyMLP, tiny_lm
from polca_lightning.core.engine import DirectionalDerivatives
from polca_lightning.core.functional import FunctionalTokenLoss, ParameterSpace
from polca_lightning.core.losses import (
    causal_lm_token_loss,
    check_token_loss_output,
    classifier_token_loss,
    masked_lm_token_loss,
    resolve_token_loss,
)


class _HFStyle(nn.Module):
    """Returns an output object with `.logits` and takes an attention mask, like Hugging Face models."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_lm(d_model=8)

    def forward(self, input_ids, attention_mask=None):
        return type("Output", (), {"logits": self.inner(input_ids)})()


def test_causal_lm_with_padding_matches_hand_computed_cross_entropy():
    model = _HFStyle()
    ids = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 8, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = ids.clone()
    labels[0, 2] = -100
    loss, mask, target = causal_lm_token_loss(model, {"input_ids": ids, "attention_mask": attention, "labels": labels})
    logits = model.inner(ids)
    expected_mask = torch.tensor([[0, 1, 0, 1, 1], [0, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(mask, expected_mask)
    for b, p in expected_mask.nonzero().tolist():
        ce = F.cross_entropy(logits[b, p - 1][None], ids[b, p][None])
        assert torch.allclose(loss[b, p], ce)
        assert target[b, p] == ids[b, p]
    assert (target[~mask] == -1).all()


def test_causal_lm_accepts_plain_tensors_and_pairs():
    model = tiny_lm()
    ids = torch.randint(0, 12, (2, 6))
    a = causal_lm_token_loss(model, ids)
    b = causal_lm_token_loss(model, (ids, ids))
    assert torch.equal(a[0], b[0]) and a[1][:, 1:].all() and not a[1][:, 0].any()


def test_a_one_element_batch_is_read_as_the_batch_it_holds():
    from torch.utils.data import DataLoader, TensorDataset

    model = tiny_lm()
    ids = torch.randint(0, 12, (4, 6))
    (batch,) = DataLoader(TensorDataset(ids), batch_size=4)  # [input_ids], a one-element list
    assert isinstance(batch, list) and len(batch) == 1
    expected = causal_lm_token_loss(model, ids)
    for wrapped in (batch, (ids,)):
        for got, want in zip(causal_lm_token_loss(model, wrapped), expected):
            assert torch.equal(got, want)
    # the masked-LM loss reads its batches with the same parser
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    mapping = {"input_ids": ids, "labels": labels}
    for got, want in zip(masked_lm_token_loss(model, [mapping]), masked_lm_token_loss(model, mapping)):
        assert torch.equal(got, want)
    with pytest.raises(TypeError, match="masked_lm_token_loss: expected a batch that is an \\(input_ids, labels\\) pair"):
        masked_lm_token_loss(model, [ids])  # a masked LM needs labels: a lone tensor is not enough
    with pytest.raises(TypeError, match="causal_lm_token_loss: expected a batch"):
        causal_lm_token_loss(model, [ids, ids, ids])


def test_classifier_one_token_per_example():
    torch.manual_seed(0)
    model = TinyMLP()
    x, y = torch.randn(4, 3), torch.tensor([0, 3, -100, 2])
    loss, mask, target = classifier_token_loss(model, {"x": x, "y": y})
    assert loss.shape == (4, 1) and mask[:, 0].tolist() == [True, True, False, True]
    keep = y != -100
    assert torch.allclose(loss[keep, 0], F.cross_entropy(model(x)[keep], y[keep], reduction="none"))
    assert target[:, 0].tolist() == [0, 3, -1, 2]


@pytest.mark.parametrize(
    "output, error, message",
    [
        (torch.zeros(2, 3), TypeError, "expected a tuple"),
        ((torch.zeros(2, 3),), TypeError, "of length 1"),
        ((torch.zeros(2, 3), [True]), TypeError, "`mask` to be a torch.Tensor, got list"),
        ((torch.zeros(6), torch.ones(6, dtype=torch.bool)), ValueError, r"\[batch, positions\], got shape \[6\]"),
        ((torch.zeros(2, 3), torch.ones(2, 4, dtype=torch.bool)), ValueError, r"same shape as `loss` \[2, 3\], got \[2, 4\]"),
        ((torch.zeros(2, 3), torch.ones(2, 3)), TypeError, "bool tensor, got dtype torch.float32"),
        ((torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool)), TypeError, "float tensor"),
    ],
)
def test_contract_errors_name_what_came(output, error, message):
    with pytest.raises(error, match=message):
        check_token_loss_output(output)


def test_wrong_model_outputs_are_errors():
    with pytest.raises(ValueError, match=r"logits of shape \[batch, length, vocab\]"):
        causal_lm_token_loss(nn.Identity(), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="logits tensor or an output with `.logits`"):
        causal_lm_token_loss(lambda ids: "text", torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="expected an \\(inputs, labels\\) pair"):
        classifier_token_loss(TinyMLP(), torch.zeros(2, 3))


def test_a_classifier_under_the_default_language_model_loss_is_told_to_use_classifier_token_loss():
    model = TinyMLP()
    batch = (torch.randn(4, 3), torch.randint(0, 4, (4,)))  # 3 features, 4 classes
    assert resolve_token_loss(model, None) is causal_lm_token_loss
    with pytest.raises(ValueError, match="pass token_loss=classifier_token_loss") as error:
        resolve_token_loss(model, None)(model, batch)
    assert "[4, 3, V], got [4, 4]" in str(error.value)
    loss, mask, _ = classifier_token_loss(model, batch)  # what the message suggests works
    assert loss.shape == mask.shape == (4, 1)


def test_all_masked_batch_is_an_error():
    model = tiny_lm()
    space = ParameterSpace.from_module(model)
    ids = torch.randint(0, 12, (2, 6))
    with pytest.raises(ValueError, match="every token is masked"):
        DirectionalDerivatives(model, causal_lm_token_loss, space)(space.flatten(model), [(ids, torch.full_like(ids, -100))])


def test_module_method_is_used_and_reaches_submodules():
    class WithMethod(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 4)
            self.scale = nn.Parameter(torch.tensor(2.0))

        def token_loss(self, batch):  # calls a submodule directly, not forward
            x, y = batch
            logits = self.body(x) * self.scale
            return F.cross_entropy(logits, y, reduction="none")[:, None], torch.ones(len(y), 1, dtype=torch.bool)

    model = WithMethod().double()
    fn = resolve_token_loss(model, None)
    space = ParameterSpace.from_module(model)
    theta = space.flatten(model)
    batch = (torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0]))
    call = FunctionalTokenLoss(model, fn, space)
    assert space.names == ("scale", "body.weight", "body.bias")  # own parameters first
    moved = call(theta + 0.5 * (torch.arange(space.dim) == 0), batch)[0]  # scale 2 -> 2.5
    with torch.no_grad():
        expected = F.cross_entropy(model.body(batch[0]) * 2.5, batch[1], reduction="none")
    assert torch.allclose(moved[:, 0], expected)
    assert model.scale.item() == 2.0  # the module itself was not touched
    assert resolve_token_loss(nn.Linear(2, 2), None) is causal_lm_token_loss
    with pytest.raises(TypeError, match="token_loss: expected a callable"):
        resolve_token_loss(model, "ce")
