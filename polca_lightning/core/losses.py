"""The per-token loss contract and its built-ins.

POLCA decomposes the loss of every *probe token*. What a token is depends on the model,
so the user describes it with one callable::

    token_loss(module, batch) -> (loss, mask)            # or (loss, mask, target)

- ``loss``: float tensor ``[batch, positions]``, the unreduced loss of every position;
- ``mask``: bool tensor of the same shape, True where a position is a loss-bearing token;
- ``target`` (optional): integer tensor of the same shape, the token id each position
  predicts (``-1`` where there is none). It becomes the store's ``target`` coordinate.

``module`` is the user's own module (a ``LightningModule`` or any ``nn.Module``); the
callable may call anything on it. The mask must not depend on the parameters: it is
read once per batch and reused for every derivative.

A ``LightningModule`` may define the same as a method ``token_loss(self, batch)``;
:func:`resolve_token_loss` prefers an explicit callable, then that method, then the
causal-LM built-in.

Tokens are numbered in probe-data order, row-major over (sequence, position), masked
positions skipped: exactly the order of ``loss[mask]``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TokenLoss",
    "causal_lm_token_loss",
    "classifier_token_loss",
    "masked_lm_token_loss",
    "check_token_loss_output",
    "resolve_token_loss",
]

TokenLoss = Callable[[nn.Module, Any], Sequence[Tensor]]

IGNORE_INDEX = -100


def _first_present(batch: Mapping, keys: Sequence[str], what: str) -> Tensor:
    for key in keys:
        if key in batch:
            return batch[key]
    raise KeyError(f"{what}: expected the batch mapping to hold one of {list(keys)}, got keys {list(batch)}")


def _logits_of(output: Any) -> Tensor:
    """The logits of a model output: a tensor, or an object/mapping with ``logits``."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if not isinstance(logits, Tensor):
        raise TypeError(
            "token_loss: expected the model to return a logits tensor or an output with `.logits`, "
            f"got {type(output).__name__}"
        )
    return logits


def _sequence_logits(module: nn.Module, input_ids: Tensor, attention_mask: Tensor | None, who: str) -> Tensor:
    """``module(input_ids[, attention_mask=...])``'s logits, checked to be ``[batch, length, vocab]``."""
    output = module(input_ids) if attention_mask is None else module(input_ids, attention_mask=attention_mask)
    logits = _logits_of(output)
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        hint = ""
        if logits.dim() == 2:  # [batch, classes]: a classifier under a language-model loss
            hint = (". The model returns one row of logits per example, as a classifier does: pass "
                    "token_loss=classifier_token_loss (POLCACallback's default token loss is "
                    "causal_lm_token_loss, the next-token cross-entropy of a language model), "
                    "or your own token_loss(module, batch) -> (loss [B, P], mask [B, P])")
        raise ValueError(
            f"{who}: expected logits of shape [batch, length, vocab] = [{input_ids.shape[0]}, "
            f"{', '.join(map(str, input_ids.shape[1:]))}, V], got {list(logits.shape)}{hint}"
        )
    return logits


def _lm_batch(batch: Any, who: str, *, labels_required: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(input_ids, labels, attention_mask)`` of a language-model batch: a mapping with
    ``input_ids`` (and ``labels``, ``attention_mask``), an ``(input_ids, labels)`` pair, or,
    where labels are not required, a tensor of ``input_ids`` that is its own labels. A
    one-element sequence is read as the batch it holds: ``DataLoader(TensorDataset(input_ids))``
    yields ``[input_ids]``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 1:
        batch = batch[0]
    if isinstance(batch, Tensor) and not labels_required:
        return batch, batch, None
    if isinstance(batch, Mapping):
        input_ids = _first_present(batch, ["input_ids"], who)
        labels = _first_present(batch, ["labels"], who) if labels_required else batch.get("labels", input_ids)
        return input_ids, labels, batch.get("attention_mask")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1], None
    accepted = ("an (input_ids, labels) pair or a mapping with 'input_ids' and 'labels'" if labels_required else
                "a tensor of input_ids, an (input_ids, labels) pair or a mapping with 'input_ids'")
    raise TypeError(f"{who}: expected a batch that is {accepted}, got {type(batch).__name__}")


def causal_lm_token_loss(module: nn.Module, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token next-token cross-entropy of a causal language model.

    The batch is a tensor of ``input_ids`` ``[batch, length]`` (or a one-element list or
    tuple holding it, as ``DataLoader(TensorDataset(input_ids))`` yields), a ``(input_ids,
    labels)`` pair, or a mapping with ``input_ids`` and optionally ``labels`` and
    ``attention_mask`` (a Hugging Face batch). Labels default to the inputs; a label of -100 or a zero
    attention mask excludes a position. The model is called as ``module(input_ids)``
    (plus ``attention_mask=`` when the batch has one) and must return logits
    ``[batch, length, vocab]`` or an output with ``.logits``.

    Position ``p`` of the result is the loss of predicting token ``p`` from tokens
    ``< p``, so ``loss[:, 0]`` is never a token and ``target[:, p] = labels[:, p]``.

    Returns:
        ``(loss, mask, target)``, each ``[batch, length]``.

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
        >>> loss, mask, target = causal_lm_token_loss(model, torch.randint(0, 10, (2, 5)))
        >>> loss.shape, mask[:, 0].any().item()
        (torch.Size([2, 5]), False)
    """
    input_ids, labels, attention_mask = _lm_batch(batch, "causal_lm_token_loss", labels_required=False)
    logits = _sequence_logits(module, input_ids, attention_mask, "causal_lm_token_loss")  # [B, L, V]
    target = labels[:, 1:]  # [B, L-1]: token p+1 is predicted at logit p
    valid = target != IGNORE_INDEX
    if attention_mask is not None:
        valid = valid & attention_mask[:, 1:].bool()
    step_loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),  # [B*(L-1), V]
        target.masked_fill(~valid, 0).reshape(-1),
        reduction="none",
    ).view_as(target)
    # realign so that position p holds the loss of predicting token p
    loss = F.pad(step_loss, (1, 0))  # [B, L]
    mask = F.pad(valid, (1, 0), value=False)
    full_target = F.pad(target.masked_fill(~valid, -1), (1, 0), value=-1)
    return loss, mask, full_target


def masked_lm_token_loss(module: nn.Module, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token cross-entropy of a masked language model (BERT-style) on the masked positions only.

    The batch is a mapping with ``input_ids`` (the corrupted input, e.g. ``[MASK]`` at the
    positions to predict), ``labels`` (the original token where the loss is taken, -100
    elsewhere, as Hugging Face's data collators make them) and optionally
    ``attention_mask``, or an ``(input_ids, labels)`` pair (either may come in a
    one-element list or tuple). The model is called as
    ``module(input_ids)`` (plus ``attention_mask=``) and must return logits
    ``[batch, length, vocab]`` or an output with ``.logits``. Position ``p`` is the loss of
    predicting ``labels[:, p]`` at ``p`` (no shift).

    Returns:
        ``(loss, mask, target)``, each ``[batch, length]``.

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 10))
        >>> ids = torch.randint(0, 10, (2, 5))
        >>> labels = torch.full_like(ids, -100); labels[:, 2] = 3
        >>> loss, mask, target = masked_lm_token_loss(model, {"input_ids": ids, "labels": labels})
        >>> mask.sum().item(), target[0, 2].item()
        (2, 3)
    """
    input_ids, labels, attention_mask = _lm_batch(batch, "masked_lm_token_loss", labels_required=True)
    logits = _sequence_logits(module, input_ids, attention_mask, "masked_lm_token_loss")  # [B, L, V]
    valid = labels != IGNORE_INDEX
    if attention_mask is not None:
        valid = valid & attention_mask.bool()
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.masked_fill(~valid, 0).reshape(-1), reduction="none"
    ).view_as(labels)  # [B, L]
    return loss, valid, labels.masked_fill(~valid, -1)


def classifier_token_loss(module: nn.Module, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Per-example cross-entropy of a classifier: one token per example.

    The batch is an ``(inputs, labels)`` pair or a mapping with ``input``/``x``/``inputs``
    and ``label``/``labels``/``y``. ``module(inputs)`` must return logits ``[batch, classes]``
    (or an output with ``.logits``). A label of -100 excludes the example.

    Returns:
        ``(loss, mask, target)``, each ``[batch, 1]``.

    Example:
        >>> model = nn.Linear(4, 3)
        >>> loss, mask, target = classifier_token_loss(model, (torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])))
        >>> loss.shape
        torch.Size([5, 1])
    """
    if isinstance(batch, Mapping):
        inputs = _first_present(batch, ["input", "inputs", "x"], "classifier_token_loss")
        labels = _first_present(batch, ["label", "labels", "y", "target"], "classifier_token_loss")
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, labels = batch
    else:
        raise TypeError(
            "classifier_token_loss: expected an (inputs, labels) pair or a mapping with inputs and labels, "
            f"got {type(batch).__name__}"
        )
    logits = _logits_of(module(inputs))
    if logits.dim() != 2 or logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"classifier_token_loss: expected logits of shape [batch, classes] = [{labels.shape[0]}, C], "
            f"got {list(logits.shape)}"
        )
    valid = labels != IGNORE_INDEX
    loss = F.cross_entropy(logits, labels.masked_fill(~valid, 0), reduction="none")
    return loss[:, None], valid[:, None], labels.masked_fill(~valid, -1)[:, None]


def check_token_loss_output(output: Any, *, where: str = "token_loss") -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate what a ``token_loss`` returned and split it into ``(loss, mask, target)``.

    Raises:
        TypeError: not a tuple of 2 or 3 tensors, or a tensor of the wrong dtype.
        ValueError: shapes that differ or are not ``[batch, positions]``.
    """
    if not isinstance(output, (tuple, list)) or len(output) not in (2, 3):
        raise TypeError(
            f"{where}: expected a tuple (loss, mask) or (loss, mask, target) of tensors, got "
            f"{type(output).__name__}" + (f" of length {len(output)}" if isinstance(output, (tuple, list)) else "")
        )
    for name, value in zip(("loss", "mask", "target"), output):
        if not isinstance(value, Tensor):
            raise TypeError(f"{where}: expected `{name}` to be a torch.Tensor, got {type(value).__name__}")
    loss, mask = output[0], output[1]
    target = output[2] if len(output) == 3 else None
    if loss.dim() != 2:
        raise ValueError(f"{where}: expected `loss` of shape [batch, positions], got shape {list(loss.shape)}")
    if not loss.is_floating_point():
        raise TypeError(f"{where}: expected `loss` to be a float tensor, got dtype {loss.dtype}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{where}: expected `mask` to be a bool tensor, got dtype {mask.dtype}")
    if mask.shape != loss.shape:
        raise ValueError(
            f"{where}: expected `mask` of the same shape as `loss` {list(loss.shape)}, got {list(mask.shape)}"
        )
    if target is not None and (target.shape != loss.shape or target.is_floating_point()):
        raise ValueError(
            f"{where}: expected `target` as an integer tensor of shape {list(loss.shape)}, "
            f"got {target.dtype} of shape {list(target.shape)}"
        )
    return loss, mask, target


def resolve_token_loss(module: nn.Module, token_loss: TokenLoss | None) -> TokenLoss:
    """The token loss to use: the explicit callable, else ``module.token_loss``, else the causal-LM built-in."""
    if token_loss is not None:
        if not callable(token_loss):
            raise TypeError(f"token_loss: expected a callable (module, batch) -> (loss, mask), got {token_loss!r}")
        return token_loss
    method = getattr(type(module), "token_loss", None)
    if callable(method):
        return lambda mod, batch: type(mod).token_loss(mod, batch)
    return causal_lm_token_loss
