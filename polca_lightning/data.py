"""Probe and Hessian data as batches, however the user holds them.

Every entry point reads ``probe_data`` and ``hessian_data`` with :func:`as_batches`. They may be

- **batches**: a ``DataLoader``, or any iterable of batches (a list, a tuple, a generator);
- **examples**: a dataset (a torch ``Dataset``, a 🤗 ``datasets.Dataset``), or a list or tuple
  of examples: mappings such as ``{"input_ids": tensor[P], "labels": tensor[P]}`` (what
  ``transformers.Trainer(train_dataset=...)`` takes), tuples of tensors without a batch
  dimension (what a ``TensorDataset`` yields), or lists of token ids. They are collated in
  order, ``batch_size`` at a time (:data:`EXAMPLES_PER_BATCH` by default), by a collator
  (:func:`collate_examples` by default: ``torch.utils.data.default_collate``).

An item of a list or tuple is an example when it has no batch dimension: a mapping whose
``input_ids`` has at most one dimension, or anything whose tensors include a scalar (a class
label) or have at most one dimension each. Then every item must be one. A batch that is
not one (an example a generator yields, a 1-D tensor of token ids) is refused before
training, naming where it is, what it holds and what to pass instead.

Example:
    >>> examples = [{"input_ids": torch.arange(5), "labels": torch.arange(5)} for _ in range(10)]
    >>> [b["input_ids"].shape for b in as_batches("probe_data", examples, batch_size=4)]
    [torch.Size([4, 5]), torch.Size([4, 5]), torch.Size([2, 5])]
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, IterableDataset, default_collate

__all__ = ["EXAMPLES_PER_BATCH", "as_batches", "check_batch", "collate_examples", "holds_examples"]

#: Examples per batch where data given as examples are collated and no ``batch_size`` is set.
EXAMPLES_PER_BATCH = 8

_EXPECTED = "a DataLoader, an iterable of batches, a dataset or a list of examples"
_WHAT_TO_PASS = ("pass batches that have one (e.g. a DataLoader with a batch_size), or the examples as a list, "
                 "a tuple or a dataset, which are collated batch_size at a time")


def _dims(value: Any) -> int | None:
    """The dimensions of a tensor, an array, a number (0) or a list of numbers (1); ``None``
    for anything else (a string, ``None``, a nested structure)."""
    if isinstance(value, Tensor):
        return value.dim()
    if isinstance(value, np.ndarray):
        return value.ndim
    if isinstance(value, numbers.Number):
        return 0
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, numbers.Number) for v in value):
        return 1
    return None


def _shape(value: Any) -> tuple:
    return tuple(value.shape) if isinstance(value, (Tensor, np.ndarray)) else np.shape(value)


def _leaves(item: Any) -> list[tuple[str, Any]]:
    """``(path, value)`` of the tensor-like values of an item: the item itself, a mapping's
    values (path ``['key']``) or a tuple's elements (path ``[i]``)."""
    if _dims(item) is not None:
        return [("", item)]
    if isinstance(item, Mapping):
        pairs = [(f"[{key!r}]", value) for key, value in item.items()]
    elif isinstance(item, (list, tuple)):
        pairs = [(f"[{i}]", value) for i, value in enumerate(item)]
    else:
        return []
    return [(path, value) for path, value in pairs if _dims(value) is not None]


def _without_batch_dimension(item: Any) -> str | None:
    """Why ``item`` is an example rather than a batch (``"['input_ids'] has 1 dimension"``),
    or ``None`` where it may be a batch."""
    if isinstance(item, Mapping) and _dims(item.get("input_ids")) is not None:
        dims = _dims(item["input_ids"])
        return f"['input_ids'] has {dims} dimension{'s' * (dims != 1)}" if dims <= 1 else None
    leaves = [(path, _dims(value)) for path, value in _leaves(item)]
    if not leaves:
        return None
    scalars = [path for path, dims in leaves if dims == 0]
    if scalars:
        return f"{scalars[0]} is a scalar"
    if max(dims for _, dims in leaves) <= 1:
        return f"{leaves[0][0]} has 1 dimension"
    return None


def check_batch(where: str, batch: Any, advice: str = _WHAT_TO_PASS) -> None:
    """Refuse a batch that has no batch dimension.

    Args:
        where: how the message names the batch (``"probe_data[0]"``).
        batch: the batch.
        advice: what to pass instead, at the end of the message.

    Raises:
        ValueError: ``batch`` is an example (see the module's docstring), naming the value
            that shows it, e.g. ``probe_data[0]['input_ids'] has 1 dimension; a batch is
            [batch, positions]: ...``.
    """
    reason = _without_batch_dimension(batch)
    if reason is not None:
        raise ValueError(f"{where}{reason}; a batch is [batch, positions] (a batch dimension first): {advice}")


def _is_dataset(data: Any) -> bool:
    """A torch ``Dataset`` or a 🤗 ``datasets.Dataset`` (anything with ``column_names``)."""
    return isinstance(data, Dataset) or hasattr(data, "column_names")


def holds_examples(name: str, data: Any) -> bool:
    """Whether ``data`` is examples to collate (a dataset, or a list or tuple of examples)
    rather than batches.

    Raises:
        ValueError: a list or tuple that holds both examples and batches, naming one of each.
    """
    if _is_dataset(data):
        return True
    if not isinstance(data, (list, tuple)) or not data:
        return False
    reasons = [_without_batch_dimension(item) for item in data]
    examples = [reason is not None for reason in reasons]
    if all(examples) or not any(examples):
        return examples[0]
    i = examples.index(True)
    j = examples.index(False)
    raise ValueError(f"{name}[{i}] is an example ({name}[{i}]{reasons[i]}) but {name}[{j}] is a batch: expected "
                     f"a list of batches or a list of examples, not both")


def _tensor(value: Any) -> Any:
    return torch.tensor(value) if _dims(value) == 1 and isinstance(value, (list, tuple)) else value


def collate_examples(examples: Sequence[Any]) -> Any:
    """``torch.utils.data.default_collate``, with the lists of numbers in the examples made
    tensors first (a 🤗 dataset's rows hold lists, which ``default_collate`` would collate
    position by position).

    Returns:
        The batch: a mapping or a tuple of tensors ``[batch, ...]``, or a tensor.
    """
    def tensors(example: Any) -> Any:
        if isinstance(example, Mapping):
            return {key: _tensor(value) for key, value in example.items()}
        if isinstance(example, tuple) and hasattr(example, "_fields"):  # a named tuple
            return type(example)(*map(_tensor, example))
        if isinstance(example, (list, tuple)) and _dims(example) is None:
            return type(example)(map(_tensor, example))
        return _tensor(example)

    return default_collate([tensors(example) for example in examples])


def _examples(data: Any) -> Iterator[Any]:
    if isinstance(data, IterableDataset) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        return iter(data)
    return (data[i] for i in range(len(data)))  # a map-style dataset need not be iterable


def _uneven(name: str, examples: Sequence[Any], start: int) -> str | None:
    """Where two examples of a batch differ in shape or keys, or ``None``."""
    first = dict(_leaves(examples[0]))
    for j, example in enumerate(examples[1:], start + 1):
        leaves = dict(_leaves(example))
        if leaves.keys() != first.keys():
            return f"{name}[{j}] holds {sorted(leaves)} but {name}[{start}] {sorted(first)}"
        for path, value in leaves.items():
            if _shape(value) != _shape(first[path]):
                return (f"{name}[{j}]{path} has shape {list(_shape(value))} but {name}[{start}]{path} "
                        f"{list(_shape(first[path]))}: the examples of a batch must have one shape; pad them to "
                        "one length, or pass a data_collator that pads (e.g. transformers.DataCollatorWithPadding)")
    return None


def _collated(name: str, data: Any, collate: Callable, batch_size: int) -> list:
    batches, chunk, start = [], [], 0
    for example in _examples(data):
        chunk.append(example)
        if len(chunk) == batch_size:
            batches.append(_collate(name, collate, chunk, start))
            chunk, start = [], start + batch_size
    if chunk:
        batches.append(_collate(name, collate, chunk, start))
    return batches


def _collate(name: str, collate: Callable, examples: list, start: int) -> Any:
    who = getattr(collate, "__name__", type(collate).__name__)
    try:
        batch = collate(examples)
    except Exception as err:  # noqa: BLE001 - re-raised with where it happened and why
        reason = _uneven(name, examples, start)
        raise ValueError(reason or f"{name}[{start}:{start + len(examples)}]: {who} could not collate the examples "
                                   f"({type(err).__name__}: {err})") from err
    check_batch(f"{who}({name}[{start}:{start + len(examples)}])", batch,
                "the data_collator must return the examples as one batch, with a batch dimension first")
    return batch


def as_batches(name: str, data: Any, *, collate: Callable | None = None, batch_size: int | None = None) -> list:
    """The batches of ``data``, as a list: batches as they come, examples collated (see the
    module's docstring), every batch checked.

    Args:
        name: the argument, in messages (``"probe_data"``).
        data: a DataLoader or an iterable of batches; a dataset, or a list or tuple of examples.
        collate: ``list of examples -> batch`` (default :func:`collate_examples`).
        batch_size: examples per batch (default :data:`EXAMPLES_PER_BATCH`).

    Returns:
        The batches.

    Raises:
        ValueError: ``None``, no batch at all, a batch without a batch dimension, examples
            that cannot be collated (of different lengths), or examples and batches mixed.
        TypeError: a tensor, a mapping, a string or something not iterable.
    """
    if data is None:
        raise ValueError(f"{name}: expected {_EXPECTED}, got None")
    if isinstance(data, (Tensor, Mapping, str, bytes)) or not (isinstance(data, Iterable) or _is_dataset(data)):
        hint = " (one batch? pass a list of batches: [batch])" if isinstance(data, (Tensor, Mapping)) else ""
        raise TypeError(f"{name}: expected {_EXPECTED}, got {type(data).__name__}{hint}")
    if holds_examples(name, data):
        batches = _collated(name, data, collate or collate_examples, batch_size or EXAMPLES_PER_BATCH)
    else:
        batches = list(data)
        for i, batch in enumerate(batches):
            check_batch(f"{name}[{i}]", batch)
    if not batches:
        raise ValueError(f"{name}: expected at least one batch, got none (is the dataset empty?)")
    return batches
