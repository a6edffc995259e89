"""``from_checkpoints``: POLCA over a series of saved weights, without training.

A finished run's checkpoints (or a public suite's, such as Pythia's ``stepN`` revisions)
are its weight snapshots: each becomes a snapshot of the store, the basis grows by
Algorithm 1 at the checkpoints named (or is random), and every probe token's loss change
between consecutive checkpoints is allocated along it. The same
:class:`~polca_lightning.session.POLCASession` as the callbacks' computes it, so the store,
the analysis and the report are theirs: over the checkpoints a Lightning run saved at its
snapshot steps, the store equals the one its callback wrote.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from torch import nn

from polca_lightning.checkpoints import (is_store, list_checkpoints, load_weights, read_state_dict, step_of,
                                        store_snapshots, weight_files)
from polca_lightning.loop import WandbTarget, on_device, unwrapped, world_size
from polca_lightning.session import POLCASession
from polca_lightning.settings import Settings, Unpack, takes_settings

__all__ = ["from_checkpoints", "Checkpoint", "checkpoint_series"]


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a series: its optimizer ``step`` and ``source`` (a path, or what
    the model factory takes: a revision name, ...)."""

    step: int
    source: Any


def checkpoint_series(checkpoints: Any, steps: Sequence[int] | None = None) -> list[Checkpoint]:
    """The checkpoints in order, with their steps.

    Args:
        checkpoints: a folder (its checkpoints, by step: :func:`~polca_lightning.checkpoints.list_checkpoints`),
            a POLCA store (its weight snapshots: :func:`~polca_lightning.checkpoints.store_snapshots`),
            or a sequence of paths or of what a model factory takes (revision names).
        steps: the step of each checkpoint (default: read from each name,
            :func:`~polca_lightning.checkpoints.step_of`).

    Raises:
        ValueError: no checkpoint, a name without a step, steps of another length, or steps
            that do not increase.
        TypeError: ``checkpoints`` is neither a folder nor a sequence.
    """
    if isinstance(checkpoints, (str, os.PathLike)):
        if is_store(checkpoints):  # a run's weight snapshots, with their steps
            series = store_snapshots(checkpoints)
            return checkpoint_series(series, [s.step for s in series] if steps is None else steps)
        if os.path.isdir(checkpoints) and not weight_files(checkpoints):  # a folder of checkpoints
            checkpoints = list_checkpoints(checkpoints)
        else:
            checkpoints = [checkpoints]
    if not isinstance(checkpoints, Iterable):
        raise TypeError(f"checkpoints: expected a folder or a sequence of checkpoints, got {type(checkpoints).__name__}")
    sources = list(checkpoints)
    if not sources:
        raise ValueError("checkpoints: expected at least one checkpoint, got none")
    if steps is None:
        steps = [step_of(s) for s in sources]
        unnamed = [i for i, s in enumerate(steps) if s is None]
        if unnamed:
            raise ValueError(f"checkpoints[{unnamed[0]}]: expected a name that says its step (step=N, checkpoint-N or a "
                             f"trailing number), got {str(sources[unnamed[0]])!r}; pass steps=[...]")
    steps = list(steps)
    if len(steps) != len(sources) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in steps):
        raise ValueError(f"steps: expected {len(sources)} non-negative ints (one a checkpoint), got {steps!r}")
    backwards = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    if backwards:
        i = backwards[0]
        raise ValueError(f"steps: expected increasing steps (an ordered series), got {steps[i - 1]} then {steps[i]} "
                         f"at checkpoints[{i - 1}] and [{i}]")
    return [Checkpoint(step, source) for step, source in zip(steps, sources)]


def basis_schedule(series: list[Checkpoint], basis_at: Sequence[int] | None, basis_every: int) -> set[int]:
    """The steps of the series where the basis grows: ``basis_at``, or those that are multiples of ``basis_every``.

    Raises:
        ValueError: a step of ``basis_at`` that is not a checkpoint's, or no basis step at all.
    """
    steps = [c.step for c in series]
    if basis_at is None:
        chosen = {s for s in steps if s % basis_every == 0}
        if not chosen:
            raise ValueError(f"basis_every: no checkpoint's step is a multiple of {basis_every} (steps {_few(steps)}); "
                             "pass basis_at=[steps] or another basis_every")
        return chosen
    chosen = set(basis_at)
    stray = sorted(chosen - set(steps))
    if stray or not chosen:
        raise ValueError(f"basis_at: expected steps of the checkpoints, got {sorted(chosen)}"
                         f"{f' ({stray} are none of theirs)' if stray else ''}")
    return chosen


class _Weights:
    """Puts each checkpoint's weights into the one module POLCA evaluates: read from the
    checkpoint (``model`` a module), or from the module a factory builds for it."""

    def __init__(self, model: nn.Module | Callable[[Any], nn.Module], first: Checkpoint):
        self.factory = None if isinstance(model, nn.Module) else model
        if self.factory is not None and not callable(self.factory):
            raise TypeError(f"model: expected a torch.nn.Module or a factory checkpoint -> module, "
                            f"got {type(model).__name__}")
        self.module = unwrapped("model", model if self.factory is None else self._built(first))
        self.loaded = first.source if self.factory is not None else None
        self.load(first)  # a checkpoint that does not fit fails here, before anything is written

    def _built(self, checkpoint: Checkpoint) -> nn.Module:
        built = self.factory(checkpoint.source)
        if not isinstance(built, nn.Module):
            raise TypeError(f"model: expected the factory to return a torch.nn.Module for {checkpoint.source!r}, "
                            f"got {type(built).__name__}")
        return built

    def load(self, checkpoint: Checkpoint) -> None:
        if checkpoint.source is self.loaded:
            return
        where = f"the checkpoint of step {checkpoint.step} ({str(checkpoint.source)!r})"
        if self.factory is None:
            state = read_state_dict(checkpoint.source, self.module)
        else:
            state = unwrapped("model", self._built(checkpoint)).state_dict()
        load_weights(self.module, state, where)
        self.loaded = checkpoint.source


@takes_settings
def from_checkpoints(model: nn.Module | Callable[[Any], nn.Module], checkpoints: Any, store: str | os.PathLike,
                     probe_data: Iterable, hessian_data: Iterable | None = None, *,
                     steps: Sequence[int] | None = None, basis_at: Sequence[int] | None = None,
                     wandb_run: Any = None, **settings: Unpack[Settings]):
    """POLCA over an ordered series of saved weights: a snapshot at every checkpoint.

    The basis grows at the checkpoints of ``basis_at`` (default: those whose step is a
    multiple of ``basis_every``, the callbacks' schedule): by Algorithm 1 at each, ``k``
    eigenvectors of the projected Hessian of the mean loss on ``hessian_data``, or random
    ones (``basis="random"``); each is backfilled over the earlier checkpoints. Then, with
    ``analyze=True``, the analysis and the report, to ``wandb_run``, else the W&B run open
    in the process, else the folder ``<store>.report``. A progress bar counts the
    checkpoints. A killed run continues with ``mode="a"``: the store keeps the checkpoints
    it committed and goes on at the next one. Under ``torchrun`` the probe and Hessian
    batches are split across the processes and rank 0 writes the store. The settings are
    those of every entry point; ``snapshot_every`` is not used (every checkpoint is a
    snapshot) but is recorded.

    Args:
        model: a module, into which each checkpoint's weights are loaded (their names may
            differ by a common prefix, such as a LightningModule's attribute), or a factory
            ``checkpoint -> module`` called for each checkpoint (e.g.
            ``lambda revision: AutoModelForCausalLM.from_pretrained(name, revision=revision)``),
            whose parameters are taken. Read, never trained.
        checkpoints: a folder of checkpoints (``checkpoint-N`` folders, ``*.ckpt``, ``*.pt``,
            ``*.safetensors`` files whose names say a step), a POLCA store (the weight
            snapshots a run kept: the same trajectory along another basis, e.g. appendix H's
            random one beside Algorithm 1's, without training again), or a sequence in training order of
            Lightning ``.ckpt`` files, Hugging Face folders, ``state_dict`` files (``torch.save``,
            safetensors), or what the factory takes.
        steps: each checkpoint's optimizer step (default: read from its name, ``step=N``,
            ``checkpoint-N`` or a trailing number, as in ``step1000``).
        basis_at: the steps (of checkpoints) where the basis grows.
        wandb_run: the W&B run to report to; default: the one open, if any; ``False``: none.

    Returns:
        The store, opened (:func:`~polca_lightning.open_store`), on rank 0; ``None`` on the others.

    Raises:
        ValueError, TypeError: a bad argument, a checkpoint without a step or that does not
            fit the model, a store that holds other steps than the series' first (mode ``"a"``);
            before anything is written.
        FileNotFoundError: a checkpoint that is not there.
        StoreExistsError: a store at ``store`` in mode ``"w-"``.

    Example:
        >>> ds = from_checkpoints(GPTNeoXForCausalLM(config), "out/", "runs/polca.zarr",
        ...                       probe_data=probe, hessian_data=hessian, basis_every=1000)
    """
    series = checkpoint_series(checkpoints, steps)
    session = POLCASession(store, owner="from_checkpoints", resume_hint="mode='a' to from_checkpoints", **settings)
    probe, hessian = session.batches(probe_data, hessian_data)
    grows = basis_schedule(series, basis_at, session.config.basis_every)
    weights = _Weights(model, series[0])
    target = WandbTarget(wandb_run)
    session.connect(world_size())
    session.check_store()
    if session.mode == "a":
        session.on_rank_zero(lambda: _check_stored_steps(session, series))
        session.resume_at(series[-1].step)  # the store keeps its checkpoints, and goes on at the next
    if session.rank == 0:
        target.open()
    module = weights.module
    try:
        session.start(module, on_device(probe, module), on_device(hessian, module), training_precision="checkpoints",
                      log_metrics=target.log_metrics)
        done = session.tracker.n_snapshots
        if done:  # the basis step at the last checkpoint kept, if the store lacks it
            session.begin(series[done - 1].step, grow_basis=series[done - 1].step in grows)
        bar = _bar(session, len(series), done)
        for checkpoint in series[done:]:
            weights.load(checkpoint)
            session.snapshot(checkpoint.step, grow_basis=checkpoint.step in grows)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
    except BaseException as error:
        session.abort(error)  # keep what is committed: mode="a" continues at the next checkpoint
        raise
    session.finish()
    if session.rank != 0:
        return None
    if session.analyze:
        session.report(step=series[-1].step, sinks=target.sinks(series[-1].step))
    from polca_lightning.store import open_store

    return open_store(session.store, storage_options=session.storage_options)


def _check_stored_steps(session: POLCASession, series: list[Checkpoint]) -> None:
    """A store resumed (mode ``"a"``) holds the first steps of the series, or none (rank 0 reads them)."""
    from polca_lightning.store import StoreError, open_store

    try:
        stored = [int(s) for s in open_store(session.store, storage_options=session.storage_options,
                                             analysis=False)["step"].values]
    except (FileNotFoundError, StoreError):  # no store yet (or not a POLCA store: the writer says so)
        return
    expected = [c.step for c in series[: len(stored)]]
    if stored != expected:
        raise ValueError(f"store: {str(session.store)!r} holds the steps {_few(stored)}, which are not the first "
                         f"of this series ({_few([c.step for c in series])}); use mode='w' to start over, or "
                         "another store")


def _few(steps: list[int]) -> str:
    return str(steps[:6])[:-1] + (", ...]" if len(steps) > 6 else "]")


def _bar(session: POLCASession, total: int, done: int):
    """A progress bar over the checkpoints (rank 0, with ``progress``)."""
    if not session.progress or session.rank != 0:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc="POLCA checkpoints", unit=" checkpoints", dynamic_ncols=True)
