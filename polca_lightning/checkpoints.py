"""Saved weights as POLCA reads them: the step in a checkpoint's name, the checkpoints in a
folder, and the parameters a checkpoint holds, put into a model.

Formats: Lightning ``.ckpt`` files (their ``state_dict``), Hugging Face ``save_pretrained``
and ``Trainer`` ``checkpoint-N`` folders (``model.safetensors``, ``pytorch_model.bin``,
sharded or not), ``state_dict`` files (``torch.save``, also as ``{"model": state_dict}``
as many loops save them, or ``.safetensors``), and the weight snapshots a POLCA store keeps
(:func:`store_snapshots`: a finished run's trajectory, to be read along another basis).
``torch.load`` runs with ``weights_only=True``: a file that needs more than tensors to
unpickle is refused, with what to do instead.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["step_of", "list_checkpoints", "weight_files", "read_state_dict", "load_weights", "WEIGHT_SUFFIXES",
           "StoredSnapshot", "store_snapshots", "is_store"]

#: file endings of a checkpoint file
WEIGHT_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".safetensors")
#: the weights of a Hugging Face folder, preferred first (each with its sharded index)
_HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
#: where a name says its step, tried in order: Lightning's ``epoch=0-step=120``, Hugging Face's
#: ``checkpoint-120``, and a trailing integer (``step120``, ``model_120``)
_STEP_PATTERNS = (re.compile(r"step=(\d+)"), re.compile(r"checkpoint-(\d+)"), re.compile(r"(\d+)$"))


@dataclass(frozen=True)
class StoredSnapshot:
    """Snapshot ``index`` (of optimizer step ``step``) of the weights a POLCA store keeps."""

    store: str
    index: int
    step: int

    def state(self) -> dict[str, Tensor]:
        """The snapshot's parameters, by the names of the module the store was written over."""
        names, shapes, weights = _stored_weights(self.store)
        flat = torch.from_numpy(np.asarray(weights[self.index]))
        pieces = torch.split(flat, [int(np.prod(shape, dtype=np.int64)) for shape in shapes])
        return {name: piece.reshape(shape).clone() for name, piece, shape in zip(names, pieces, shapes)}


def is_store(path: Any) -> bool:
    """Whether ``path`` is a local POLCA store (a zarr group with weight snapshots or without)."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / "zarr.json").is_file() \
        and (Path(path) / "step").is_dir()


def _stored_weights(store: str) -> tuple[list[str], list[tuple[int, ...]], Any]:
    import zarr

    group = zarr.open_group(store, mode="r")
    if "weights" not in group:
        raise ValueError(f"checkpoints: the store {store!r} holds no weight snapshots (it was written with "
                         "store_weights=False): it cannot serve as checkpoints")
    parameters = group.attrs["parameters"]
    return [name for name, _ in parameters], [tuple(shape) for _, shape in parameters], group["weights"]


def store_snapshots(store: str | os.PathLike) -> list[StoredSnapshot]:
    """The weight snapshots of a POLCA store, in order: a run's trajectory as checkpoints.

    Every snapshot the store committed is one, with its step. Reading them along another
    basis (``from_checkpoints(model, store, new_store, basis="random", ...)``) gives what
    the run would have written with that basis: POLCA reads training, it does not change it.
    The store must keep weights (``store_weights=True``, the default) of every trainable
    parameter of the model they are put into.

    Raises:
        FileNotFoundError: no POLCA store at ``store``.
        ValueError: a store without weight snapshots, or with none committed.
    """
    store = os.fspath(store)
    if not is_store(store):
        raise FileNotFoundError(f"checkpoints: no POLCA store at {store!r}")
    import zarr

    group = zarr.open_group(store, mode="r")
    _stored_weights(store)  # refuses a store without weights
    committed = int(group.attrs.get("committed_snapshots", 0))
    steps = [int(s) for s in np.asarray(group["step"][:committed])]
    if not steps:
        raise ValueError(f"checkpoints: the store {store!r} has committed no snapshot")
    return [StoredSnapshot(store, i, step) for i, step in enumerate(steps)]


def step_of(checkpoint: Any) -> int | None:
    """The step a checkpoint's name says, or ``None``.

    The name is the last path component without a checkpoint file ending; ``step=N``
    (Lightning), ``checkpoint-N`` (Hugging Face) or a trailing integer (``step1000``,
    Pythia's revision names).

    Example:
        >>> step_of("ckpt/epoch=1-step=120.ckpt"), step_of("out/checkpoint-40"), step_of("step1000")
        (120, 40, 1000)
    """
    if isinstance(checkpoint, StoredSnapshot):
        return checkpoint.step
    name = Path(os.fspath(checkpoint)).name if isinstance(checkpoint, (str, os.PathLike)) else str(checkpoint)
    for suffix in WEIGHT_SUFFIXES:
        name = name.removesuffix(suffix)
    for pattern in _STEP_PATTERNS:
        found = pattern.search(name)
        if found:
            return int(found.group(1))
    return None


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a Hugging Face folder (the shards an index names), or none."""
    folder = Path(folder)
    for name in _HF_WEIGHTS:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / (name + ".index.json")
        if index.is_file():
            shards = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
            return [folder / shard for shard in shards]
    return []


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The checkpoints in ``folder``, in the order of their steps: Hugging Face folders
    (``checkpoint-N``) and checkpoint files (``*.ckpt``, ``*.pt``, ``*.pth``, ``*.bin``,
    ``*.safetensors``) whose names say a step (Lightning's ``last.ckpt`` does not).

    Raises:
        FileNotFoundError: ``folder`` is not a folder, or holds no checkpoint with a step.

    Example:
        >>> [p.name for p in list_checkpoints("out")]
        ['checkpoint-0', 'checkpoint-500', 'checkpoint-1000']
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoints: expected a folder of checkpoints, got {str(folder)!r}, "
                                "which is not a folder")
    found = [p for p in folder.iterdir()
             if (p.is_dir() and weight_files(p)) or (p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))]
    stepped = sorted((step_of(p), p.name, p) for p in found if step_of(p) is not None)
    if not stepped:
        raise FileNotFoundError(f"checkpoints: {str(folder)!r} holds no checkpoint whose name says its step "
                                f"(checkpoint-N folders, or {', '.join(WEIGHT_SUFFIXES)} files named with step=N "
                                "or a trailing number)")
    return [p for _, _, p in stepped]


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - pickle raises many kinds; all mean the same here
        if "weights_only" not in str(error) and "Unsupported global" not in str(error):
            raise
        raise ValueError(
            f"checkpoints: {str(path)!r} holds objects besides tensors, which torch.load(weights_only=True) "
            "does not unpickle; save its state_dict alone, or pass as model a factory that loads the file "
            "and returns the model"
        ) from error


def _state_in(obj: Any, path: Path) -> Mapping[str, Tensor]:
    """The state dict in what ``torch.load`` returned: itself, or under ``state_dict``
    (Lightning), ``model`` or ``module`` (many hand-written loops)."""
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "module"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and any(isinstance(v, Tensor) for v in inner.values()):
                return inner
        if any(isinstance(v, Tensor) for v in obj.values()):
            return obj
    raise ValueError(f"checkpoints: {str(path)!r} holds no state dict (a mapping of names to tensors, alone or "
                     f"under 'state_dict' or 'model'), got {type(obj).__name__}"
                     f"{' with keys ' + str(list(obj)[:6]) if isinstance(obj, Mapping) else ''}")


def read_state_dict(checkpoint: str | os.PathLike | StoredSnapshot, model: nn.Module | None = None) -> dict[str, Tensor]:
    """The tensors a checkpoint holds, by name, on the CPU.

    Args:
        checkpoint: a Hugging Face folder, a Lightning ``.ckpt``, a ``torch.save`` file of a
            state dict (alone, or under ``"state_dict"``, ``"model"`` or ``"module"``), a
            ``.safetensors`` file, or a POLCA store's weight snapshot (:func:`store_snapshots`).
        model: the model the tensors are for. A Hugging Face model reads a folder with its
            class's ``from_pretrained`` (and its ``config``), which names and converts the
            stored tensors as transformers does (a ``GPTNeoXForCausalLM`` stores its
            ``lm_head`` as ``embed_out``).

    Raises:
        FileNotFoundError: nothing there, or a folder without weights.
        ValueError: a file without a state dict, or one that needs more than tensors to unpickle.
        ImportError: a ``.safetensors`` file without the ``safetensors`` package.
    """
    if isinstance(checkpoint, StoredSnapshot):
        return checkpoint.state()
    path = Path(checkpoint)
    if path.is_dir():
        files = weight_files(path)
        if not files:
            raise FileNotFoundError(f"checkpoints: {str(path)!r} holds no model weights (model.safetensors, "
                                    "pytorch_model.bin, or their sharded .index.json)")
        if model is not None and callable(getattr(type(model), "from_pretrained", None)) and hasattr(model, "config"):
            return type(model).from_pretrained(path, config=model.config).state_dict()
        state: dict[str, Tensor] = {}
        for file in files:
            state.update(read_state_dict(file))
        return state
    if not path.is_file():
        raise FileNotFoundError(f"checkpoints: no checkpoint at {str(path)!r}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(f"checkpoints: reading {path.name} needs safetensors: pip install safetensors") from err
        return load_file(path, device="cpu")
    return dict(_state_in(_torch_load(path), path))


def _matched(state: Mapping[str, Tensor], names: list[str], where: str) -> Mapping[str, Tensor]:
    """``state`` with its names made the model's: as they are, or less or more a common prefix
    (a LightningModule's ``net.``, ``DistributedDataParallel``'s ``module.``, ``torch.compile``'s ``_orig_mod.``)."""
    wanted = set(names)
    if wanted <= state.keys():
        return state
    first = names[0]
    for key in state:
        if key.endswith(first) and key[: -len(first)].endswith("."):  # the checkpoint's names have a prefix more
            prefix = key[: -len(first)]
            renamed = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        elif first.endswith(key) and first[: -len(key)].endswith("."):  # the model's names have a prefix more
            prefix = first[: -len(key)]
            renamed = {prefix + k: v for k, v in state.items()}
        else:
            continue
        if wanted <= renamed.keys():
            return renamed
    missing = sorted(wanted - state.keys())
    raise ValueError(f"checkpoints: {where} lacks {len(missing)} of the model's {len(names)} parameters "
                     f"(e.g. {missing[:3]}); it holds {len(state)} tensors (e.g. {sorted(state)[:3]}): "
                     "is it a checkpoint of this model?")


def load_weights(module: nn.Module, state: Mapping[str, Tensor], where: str = "the checkpoint") -> None:
    """Put a checkpoint's tensors into ``module`` (its parameters and the buffers the
    checkpoint holds), converted to their dtype and device.

    Args:
        module: the model.
        state: the checkpoint's tensors (:func:`read_state_dict`); names may differ from the
            model's by a common prefix.
        where: the checkpoint, in messages.

    Raises:
        ValueError: a parameter of the model is not in ``state``, or has another shape there.

    Example:
        >>> load_weights(model, read_state_dict("ckpt/epoch=0-step=100.ckpt", model))
    """
    names = [name for name, _ in module.named_parameters()]
    state = _matched(state, names, where)
    try:
        module.load_state_dict(state, strict=False)  # strict=False: optimizer states, tied copies, ...
    except RuntimeError as error:  # shapes
        raise ValueError(f"checkpoints: {where} does not fit the model: {error}") from None
