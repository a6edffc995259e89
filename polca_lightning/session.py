"""One training run's POLCA, whatever loop trains the model.

:class:`POLCASession` is what both callbacks drive, :class:`~polca_lightning.POLCACallback`
(Lightning) and :class:`~polca_lightning.hf.POLCATrainerCallback` (Hugging Face's
``Trainer``): the settings, checked once; the :class:`~polca_lightning.tracker.POLCATracker`
and the store it writes from rank 0; the schedule of snapshots and basis steps; the resume
bookkeeping; and the work after training (the LCA baseline, the causal check, the analysis
and the report). It imports neither Lightning nor ``transformers``: a loop's callback only
says which of its hooks mean "training starts", "an optimizer step is done" and "training
ended", where the model, the batches, the process group and the loggers are, and how the
session's state travels in the loop's checkpoint.

In every process of a run, in this order:

1. ``POLCASession(store, **settings)`` checks every setting (:mod:`polca_lightning.settings`
   defines them);
2. :meth:`~POLCASession.connect` picks the collectives (a ``torch.distributed`` group when
   the run has more than one process); :meth:`~POLCASession.check_store` checks on rank 0
   that the store can be written in its mode, and every rank raises if not;
3. :meth:`~POLCASession.start` builds the tracker, opens the writer on rank 0 and resumes
   from the state given to :meth:`~POLCASession.load_state_dict`, if any;
4. :meth:`~POLCASession.begin` takes the first snapshot (unless resumed), then
   :meth:`~POLCASession.optimizer_step` runs after every optimizer step;
5. :meth:`~POLCASession.finish` closes the store, complete, and waits for every process;
   :meth:`~POLCASession.report` (rank 0) runs the work after training.
   :meth:`~POLCASession.abort` closes it after an exception, keeping what is committed.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from polca_lightning.config import POLCAConfig
from polca_lightning.core.functional import ParameterSpace
from polca_lightning.core.losses import resolve_token_loss
from polca_lightning.core.polca import needs_curvature
from polca_lightning.data import as_batches
from polca_lightning.settings import Settings, Unpack, check_settings, takes_settings
from polca_lightning.store import (
    ENGINE_CALIBRATION, NullWriter, StoreError, StoreWriter, TokenIndex, check_store_path, open_store,
)
from polca_lightning.store.location import resolve_store
from polca_lightning.tracker import Collective, POLCATracker, TorchDistributed

__all__ = ["POLCASession", "SessionAttributes"]

log = logging.getLogger("polca_lightning")


@takes_settings
class POLCASession:
    """The settings, tracker, store, schedule, resume and after-training work of one run.

    Args:
        store: path or URL of the Zarr store.
        owner: the entry point's name, in messages (``"POLCACallback"``).
        resume_hint: how the loop resumes from a checkpoint, in the message that refuses
            a store with snapshots when training did not resume (``"ckpt_path= to Trainer.fit"``).

    Attributes:
        config: the run's :class:`~polca_lightning.config.POLCAConfig`.
        store, storage_options: where the store is (a ``Path``, or a URL) and its filesystem's options.
        token_loss, token_labels, batch_size, data_collator, mode, weights_compressors, analyze,
            analysis_kwargs, decode, decode_target, lca_directions, ablate, progress: the
            settings, checked (``lca_directions`` a number).
        tracker, writer: from :meth:`start` on.

    Raises:
        ValueError, TypeError: a bad setting, naming it, what was expected and what came.
    """

    def __init__(self, store: str | os.PathLike, *, owner: str = "POLCACallback",
                 resume_hint: str = "ckpt_path= to Trainer.fit", **settings: Unpack[Settings]):
        self.owner, self.resume_hint = owner, resume_hint
        self.config, checked = check_settings(settings, owner=owner)
        vars(self).update(checked)  # every other setting, checked, as an attribute of the same name
        location = resolve_store(store, self.storage_options)  # a URL fsspec cannot open fails here
        self.store, self.storage_options = location.target, location.storage_options  # Path, or a URL
        if self.lca_directions is None:
            self.lca_directions = self.config.max_basis
        self.collective: Collective = Collective()
        self.tracker: POLCATracker | None = None
        self.writer: StoreWriter | NullWriter | None = None
        self.last_step = -1  # the last optimizer step handled (gradient accumulation repeats steps)
        self.resume_state: dict | None = None

    @property
    def needs_hessian(self) -> bool:
        """Whether the basis needs Hessian data (``basis="hessian"``)."""
        return self.config.basis == "hessian"

    def batches(self, probe_data: Any, hessian_data: Any) -> tuple[list, list]:
        """The probe and Hessian batches, read with :func:`~polca_lightning.data.as_batches`
        (examples collated ``batch_size`` at a time by ``data_collator``); no Hessian batches
        where the basis needs none and none are given.

        Raises:
            ValueError, TypeError: data that are not batches or examples, naming the argument.
        """
        batching = dict(collate=self.data_collator, batch_size=self.batch_size)
        probe = as_batches("probe_data", probe_data, **batching)
        wants_hessian = self.needs_hessian or hessian_data is not None
        return probe, as_batches("hessian_data", hessian_data, **batching) if wants_hessian else []

    # ----------------------------------------------------------- processes
    def connect(self, world_size: int) -> None:
        """Use the collectives of a run of ``world_size`` processes (an initialised
        ``torch.distributed`` group when there is more than one)."""
        self.collective = TorchDistributed() if world_size > 1 else Collective()

    @property
    def rank(self) -> int:
        return self.collective.rank

    def on_rank_zero(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on rank 0 only; if it raises, every rank raises.

        An error raised on rank 0 alone would leave the other ranks waiting in the next
        collective until the process group's timeout. Rank 0 re-raises its own error; the
        others a RuntimeError naming it (sent as text: an exception may not pickle).
        """
        result, error = None, None
        if self.rank == 0:
            try:
                result = fn()
            except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
                error = err
        message = f"{type(error).__name__}: {error}" if error is not None else None
        if self.collective.world_size > 1:
            message = self.collective.gather([message])[0][0]  # rank 0's
        if error is not None:
            raise error
        if message is not None:
            raise RuntimeError(f"{self.owner} failed on rank 0 with {message}")
        return result

    def check_store(self) -> None:
        """Fail before training if the store cannot be written in its mode (rank 0 checks)."""
        self.on_rank_zero(lambda: check_store_path(self.store, self.mode, self.storage_options))

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """What a checkpoint keeps to resume the store (the writer is flushed first)."""
        if self.writer is not None:
            self.writer.flush()  # a checkpoint only ever refers to data on disk
        t = self.tracker
        return {
            "last_step": self.last_step,
            "n_snapshots": t.n_snapshots if t else 0,
            "n_basis": t.n_basis if t else 0,
            # the engine costs measured at the start: a resumed run makes the same choices
            # and so computes the same numbers
            "engine_calibration": t.calibration if t else None,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Resume from a checkpoint's :meth:`state_dict` at the next :meth:`start`."""
        self.resume_state = dict(state)

    def resume_at(self, step: int) -> None:
        """Resume at the next :meth:`start` from the store alone, for a loop at optimizer
        ``step`` that keeps no state of the session: the store is cut to its snapshots at
        steps up to ``step`` and the basis vectors found at them, and the engine costs the
        store recorded are used again (:meth:`begin` then takes what the store lacks at ``step``).

        Raises:
            ValueError: ``step`` is not a non-negative int, or the mode is not ``'a'``.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"resume step: expected a non-negative int, got {step!r}")
        if self.mode != "a":
            raise ValueError(f"mode: expected 'a' to resume the store at step {step}, got {self.mode!r}")
        self.resume_state = {"at_step": step}

    # ------------------------------------------------------------ lifecycle
    def start(self, module: nn.Module, probe: Sequence[Any], hessian: Sequence[Any], *,
              training_precision: str, log_metrics: Callable[[dict, int], None] | None = None) -> POLCATracker:
        """Build the tracker on ``module`` and open the store (rank 0); resume if a state was loaded.

        Args:
            module: the model being trained (its parameters are read, never changed).
            probe, hessian: the probe and Hessian batches, on the model's device.
            training_precision: how the loop trains (recorded in the store's ``config``).
            log_metrics: ``(metrics, step)``, called on rank 0 with the scalars of each
                snapshot and basis step.

        Returns:
            The tracker (also :attr:`tracker`).

        Raises:
            RuntimeError: the store holds snapshots but training did not resume, or fewer
                than the checkpoint says.
            ValueError, TypeError, EngineError: bad probe data, token loss or token labels,
                or a model no engine can differentiate (nothing is written then).
        """
        if self.writer is not None:  # started again on the same session (a run that raised): the old writer goes
            self.abort()
        token_loss = resolve_token_loss(module, self.token_loss)
        space = ParameterSpace.from_module(module, self.config.parameters)
        stored = self.run_config(module, space, len(probe), len(hessian), training_precision)

        def open_writer(tokens: TokenIndex) -> StoreWriter | NullWriter:
            # after the tracker's checks: bad probe data or a model we cannot differentiate
            # leaves nothing behind. Only rank 0 writes; a refusal raises everywhere
            writer = self.on_rank_zero(lambda: StoreWriter(
                self.store, mode=self.mode, tokens=tokens, parameters=list(zip(space.names, space.shapes)),
                order=self.config.order, config=stored, max_basis=self.config.max_basis,
                with_curvature=needs_curvature(self.config.order), storage_options=self.storage_options,
                weights_compressors=self.weights_compressors, resumable_changes=POLCAConfig.resumable_changes(),
            ))
            return writer if writer is not None else NullWriter()

        def on_rank_zero_log(metrics: dict, step: int) -> None:
            if log_metrics is not None and self.rank == 0:
                log_metrics(metrics, step)

        state = self.resume_state or {}
        calibration = self._stored_calibration() if "at_step" in state else state.get("engine_calibration")
        self.tracker = POLCATracker(
            module, token_loss, space, probe, hessian, self.config, open_writer=open_writer,
            collective=self.collective, token_labels=self.token_labels, calibration=calibration,
            log_metrics=on_rank_zero_log, progress=self.progress,
        )
        self.writer = self.tracker.writer
        if self.tracker.calibration:  # a resume at a step reads them back (resume_at)
            self.writer.set_attributes({ENGINE_CALIBRATION: self.tracker.calibration})
        device = dict(module.named_parameters())[space.names[0]].device
        self._resume(device)
        return self.tracker

    def run_config(self, module: nn.Module, space: ParameterSpace, n_probe: int, n_hessian: int,
                   training_precision: str) -> dict:
        """What the store records as its ``config``: :meth:`POLCAConfig.to_dict` plus what the
        run itself decides (:data:`~polca_lightning.config.RUN_FACTS`): the number of probe and
        Hessian batches, the dtype the callback computes in (the parameters'; autocast is off while
        it computes, so mixed-precision training gives float32; the store holds float32 whatever it
        is), the training precision, and the parameters left out of the decomposition because they
        are frozen (``requires_grad=False``)."""
        params = dict(module.named_parameters())
        dtype = functools.reduce(torch.promote_types, [params[n].dtype for n in space.names])  # flatten()'s
        facts = {
            "n_probe_batches": n_probe,
            "n_hessian_batches": n_hessian,
            "compute_dtype": str(dtype).removeprefix("torch."),
            "training_precision": str(training_precision),
            "frozen_parameters": [n for n, p in module.named_parameters() if not p.requires_grad],
        }
        return {**self.config.to_dict(), **facts}

    def _stored_calibration(self) -> dict | None:
        """The engine costs the store recorded (:meth:`resume_at`), read on rank 0, on every rank."""
        def read() -> dict | None:
            try:
                return open_store(self.store, storage_options=self.storage_options, analysis=False).attrs.get(
                    ENGINE_CALIBRATION)
            except (FileNotFoundError, StoreError):  # no store yet: it starts here
                return None

        return self.collective.gather([self.on_rank_zero(read)])[0][0]

    def _resume(self, device: torch.device) -> None:
        state = self.resume_state
        committed = self.writer.committed  # (0, 0) from a NullWriter: rank 0's is broadcast
        # on the model's device: NCCL broadcasts CUDA tensors only (gloo: CPU)
        committed = self.collective.broadcast(torch.tensor(committed, device=device))
        committed = tuple(int(x) for x in committed.tolist())
        if state is None:
            if committed[0]:
                raise RuntimeError(
                    f"store: {str(self.store)!r} holds {committed[0]} snapshots but training did not resume "
                    f"from a checkpoint; pass {self.resume_hint} to continue it, or mode='w' to start over"
                )
            return
        if "at_step" in state:
            state = self._state_at(state["at_step"], device)
        n_snapshots, n_basis = state["n_snapshots"], state["n_basis"]
        if committed[0] < n_snapshots or committed[1] < n_basis:
            raise RuntimeError(
                f"store: {str(self.store)!r} holds {committed[0]} snapshots and {committed[1]} basis vectors, "
                f"fewer than the checkpoint's {n_snapshots} and {n_basis}: it is not this run's store"
            )
        self.writer.truncate(n_snapshots, n_basis)
        self.tracker.restore(n_snapshots)
        self.last_step = state["last_step"]
        log.info("POLCA: resumed %s at snapshot %d with %d basis vectors", self.store, n_snapshots, n_basis)

    def _state_at(self, step: int, device: torch.device) -> dict:
        """The :meth:`state_dict` of a run at ``step``, from the store's committed steps and
        basis steps (rank 0's, on every rank): its snapshots up to ``step`` and the vectors found at them."""
        counts = torch.tensor([0, 0, -1], device=device)
        if self.writer.writes:
            steps, basis_steps = np.asarray(self.writer.read_steps()), np.asarray(self.writer.read_basis()[2])
            n_snapshots = int((steps <= step).sum())  # steps increase: a prefix
            last = int(steps[n_snapshots - 1]) if n_snapshots else -1
            counts = torch.tensor([n_snapshots, int((basis_steps <= last).sum()), last], device=device)
        n_snapshots, n_basis, last = (int(x) for x in self.collective.broadcast(counts).tolist())
        return {"n_snapshots": n_snapshots, "n_basis": n_basis, "last_step": last}

    def begin(self, step: int, *, grow_basis: bool | None = None) -> None:
        """Training starts at ``step``: the first snapshot, unless the store resumed with some;
        after a resume, what the store lacks at ``step``: its snapshot if ``step`` is on the
        schedule and past the last one, or its basis step (``grow_basis``: whether ``step`` is
        one; default: on the schedule)."""
        t = self.tracker
        if t.n_snapshots == 0 or (step > self.last_step and step % self.config.snapshot_every == 0):
            self.snapshot(step, grow_basis=grow_basis)
        elif step == self.last_step and self._is_basis_step(step, grow_basis) and step not in t.basis_steps:
            self._grow(step)  # the store kept the snapshot but not the vectors found there

    def optimizer_step(self, step: int) -> None:
        """After the optimizer step that made the run's step count ``step``: a snapshot every
        ``snapshot_every`` steps, a basis step every ``basis_every``. A step seen before (the
        micro-batches of one accumulated step) is skipped."""
        if step != self.last_step and step % self.config.snapshot_every == 0:
            self.snapshot(step)

    def snapshot(self, step: int, *, grow_basis: bool | None = None) -> None:
        """A snapshot at ``step`` of the model's parameters as they are, then a basis step if
        ``grow_basis`` (default: every ``basis_every`` steps)."""
        self.last_step = step
        self.tracker.snapshot(step)
        if self._is_basis_step(step, grow_basis):
            self._grow(step)

    def _is_basis_step(self, step: int, grow_basis: bool | None) -> bool:
        return step % self.config.basis_every == 0 if grow_basis is None else bool(grow_basis)

    def _grow(self, step: int) -> None:
        with torch.enable_grad():  # a loop may call its hooks under no_grad
            self.tracker.grow_basis(step)

    def finish(self) -> None:
        """Training ended: close the store, complete; no process goes on before rank 0 has
        (code after training may read the store)."""
        self.writer.close(complete=True)
        if self.writer.writes:
            t = self.tracker
            log.info(
                "POLCA: %d snapshots, %d basis vectors in %s; time %s", t.n_snapshots, t.n_basis, self.store,
                {k: round(v, 2) for k, v in t.timings.items()},
            )
        self.collective.barrier()

    def abort(self, exception: BaseException | None = None) -> None:
        """After an exception: close the store, keeping what is committed (it stays resumable)."""
        if self.writer is None:
            return
        writer, self.writer = self.writer, None
        try:
            writer.close(complete=False)
        except Exception:  # noqa: BLE001 - the exception in flight says more
            log.exception("POLCA: could not close the store after %s",
                          type(exception).__name__ if exception is not None else "an exception")

    def report(self, *, step: int | None = None, loggers: Sequence | None = None, sinks: Sequence | None = None) -> Any:
        """The work after training, on rank 0 (call it there only): the LCA baseline
        (``lca_directions``), the causal check (``ablate``), then
        :func:`~polca_lightning.report.report_after_fit`: the analysis, written into the store,
        and the report to ``loggers`` (Lightning's) and ``sinks`` (report sinks: a
        :class:`~polca_lightning.report.wandb_report.WandbSink`, a
        :class:`~polca_lightning.report.tensorboard_report.TensorBoardSink`), or the folder
        when there are none. Returns the report folder when one was written."""
        from polca_lightning.report import report_after_fit

        t = self.tracker
        if self.lca_directions:
            from polca_lightning.lca import lca_baseline

            lca_baseline(self.store, t.module, t.token_loss, t.probe, self.lca_directions,
                         engine=self.config.engine, progress=self.progress, storage_options=self.storage_options)
        if self.ablate:
            from polca_lightning.ablation import ablate_directions

            ablate_directions(self.store, t.module, t.token_loss, t.probe, progress=self.progress,
                              storage_options=self.storage_options)
        return report_after_fit(self.store, loggers=list(loggers or []), sinks=sinks, step=step, decode=self.decode,
                                decode_target=self.decode_target, analysis_kwargs=self.analysis_kwargs,
                                progress=self.progress, storage_options=self.storage_options)


class SessionAttributes:
    """The session's settings and state as attributes of the callback that holds it
    (``callback.config``, ``callback.store``, ``callback.tracker``, ...)."""

    session: POLCASession

    config = property(lambda self: self.session.config, doc="The run's POLCAConfig.")
    store = property(lambda self: self.session.store, doc="The store: a Path, or a URL.")
    storage_options = property(lambda self: self.session.storage_options, doc="Options of a URL store's filesystem.")
    mode = property(lambda self: self.session.mode, doc="'w-', 'a' or 'w'.")
    tracker = property(lambda self: self.session.tracker, doc="The POLCATracker, once training started.")
    writer = property(lambda self: self.session.writer, doc="The store's writer, once training started.")
