"""``track``: POLCA in a training loop written by hand.

The same settings, store, analysis and report as :class:`~polca_lightning.POLCACallback`,
for a loop that is neither Lightning's nor Hugging Face's: :func:`track` returns a
:class:`POLCALoop`, a context manager over one :class:`~polca_lightning.session.POLCASession`.
Entering it takes the first snapshot; :meth:`POLCALoop.step` after every optimizer step
takes the snapshots and basis steps; leaving it completes the store, then runs the
analysis and the report. What this module also gives
:func:`~polca_lightning.series.from_checkpoints`: the process count of a ``torchrun``
run, batches moved to the model's device, and the W&B run a report goes to.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from polca_lightning.session import POLCASession
from polca_lightning.settings import Settings, Unpack, takes_settings

__all__ = ["track", "POLCALoop"]

#: the key under which the scalars logged to a W&B run carry their optimizer step
WANDB_STEP_METRIC = "global_step"


def world_size() -> int:
    """The processes of an initialised ``torch.distributed`` group (``torchrun``), else 1."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def unwrapped(name: str, model: Any) -> nn.Module:
    """``model`` itself, out of a ``DistributedDataParallel`` wrapper if it is in one.

    Raises:
        TypeError: ``model`` is not a ``torch.nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{name}: expected a torch.nn.Module, got {type(model).__name__}")
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def on_device(batches: list, module: nn.Module) -> list:
    """``batches`` on the device of ``module``'s parameters (tensors in mappings, lists and
    tuples, at any depth; what is not a tensor is kept as it is)."""
    device = next(module.parameters()).device
    return [to_device(batch, device) for batch in batches]


def to_device(data: Any, device: torch.device) -> Any:
    """``data``'s tensors on ``device``, its containers rebuilt with their own types.

    Example:
        >>> batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "meta": ("a", [torch.ones(1)])}
        >>> moved = to_device(batch, torch.device("meta"))
        >>> moved["input_ids"].device.type, moved["meta"][0], moved["meta"][1][0].device.type
        ('meta', 'a', 'meta')
    """
    if isinstance(data, torch.Tensor):
        return data.to(device)
    if isinstance(data, Mapping):
        items = {key: to_device(value, device) for key, value in data.items()}
        try:
            return type(data)(items)
        except TypeError:  # a mapping type that is not built from a dict
            return items
    if isinstance(data, tuple) and hasattr(data, "_fields"):  # a named tuple
        return type(data)(*(to_device(value, device) for value in data))
    if isinstance(data, (list, tuple)):
        return type(data)(to_device(value, device) for value in data)
    return data


class WandbTarget:
    """Where the scalars and the report of a run without loggers go: the W&B run given,
    else the one open in this process (``wandb.run``), else none (the report then goes
    to the folder ``<store>.report``).

    Args:
        run: a W&B run (what ``wandb.init`` returned); ``None``: the open one, if any;
            ``False``: none, even if one is open.

    Raises:
        TypeError: ``run`` has no ``log`` method.
    """

    def __init__(self, run: Any = None):
        if run is not None and run is not False and not callable(getattr(run, "log", None)):
            raise TypeError(f"wandb_run: expected a W&B run (what wandb.init returned), None or False, "
                            f"got {type(run).__name__}")
        self.requested, self.run = run, None

    def open(self) -> None:
        """Find the run (call it on the rank that reports)."""
        run = self.requested
        if run is None:  # the open run, if the program uses W&B at all (imported, then wandb.init)
            wandb = sys.modules.get("wandb")
            run = getattr(wandb, "run", None) if wandb is not None else None
        if run:
            from polca_lightning.report.wandb_report import WandbRun

            self.run = WandbRun(run, step_metric=WANDB_STEP_METRIC)

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log_metrics(metrics, step)

    def sinks(self, step: int) -> list:
        """The report sinks: the W&B run's, or none (then the report goes to a folder)."""
        if self.run is None:
            return []
        from polca_lightning.report.wandb_report import WandbSink

        return [WandbSink(self.run, step)]


class POLCALoop:
    """POLCA of a hand-written training loop: the context manager :func:`track` returns.

    Args and Raises: as for :func:`track` (``settings``: its settings, every one of them).

    Attributes:
        session: the :class:`~polca_lightning.session.POLCASession` it drives.
        global_step: the optimizer steps done (the resume step at the start).
        probe_batches, hessian_batches: the batches of ``probe_data`` and ``hessian_data``.
        report_dir: the report folder, once written (a run without a W&B run).

    Example:
        >>> polca = track(model, "runs/polca.zarr", probe_data=probe, hessian_data=hessian)
        >>> with polca:
        ...     train(model, after_each_optimizer_step=polca.step)
        >>> polca.global_step, polca.report_dir
    """

    def __init__(self, model: nn.Module, store: str | os.PathLike, probe_data: Iterable,
                 hessian_data: Iterable | None = None, *, resume_step: int | None = None,
                 wandb_run: Any = None, settings: Mapping[str, Any]):
        self.session = POLCASession(store, owner="track", resume_hint="resume_step= (the step the loop resumes "
                                    "from) to track", **settings)
        self.model = unwrapped("model", model)
        self.probe_batches, self.hessian_batches = self.session.batches(probe_data, hessian_data)
        if resume_step is not None:
            self.session.resume_at(resume_step)  # checks the step, and that the mode is 'a'
        self.global_step = resume_step or 0
        self.wandb = WandbTarget(wandb_run)
        self.report_dir = None
        self._state = "new"  # "new" -> "open" -> "closed"

    # ------------------------------------------------------------- attributes
    store = property(lambda self: self.session.store, doc="The store: a Path, or a URL.")
    tracker = property(lambda self: self.session.tracker, doc="The POLCATracker, inside the block.")

    # ------------------------------------------------------------------ block
    def __enter__(self) -> "POLCALoop":
        if self._state != "new":
            raise RuntimeError("track: a POLCALoop is entered once; call track() again for another run")
        session = self.session
        session.connect(world_size())
        session.check_store()  # rank 0 checks, every rank raises
        if session.rank == 0:
            self.wandb.open()
        try:
            session.start(self.model, on_device(self.probe_batches, self.model),
                          on_device(self.hessian_batches, self.model), training_precision="unknown (a plain loop)",
                          log_metrics=self.wandb.log_metrics)
            session.begin(self.global_step)
        except BaseException as error:
            session.abort(error)
            self._state = "closed"
            raise
        self._state = "open"
        return self

    def step(self, step: int | None = None) -> None:
        """After an optimizer step: a snapshot every ``snapshot_every`` steps, a basis step
        every ``basis_every``.

        Args:
            step: the loop's optimizer step count now (default: one more than before); a
                step seen before is skipped, as the micro-batches of one accumulated step are.

        Raises:
            RuntimeError: outside the ``with`` block.
            ValueError: ``step`` is not an int, or less than the step before.
        """
        if self._state != "open":
            raise RuntimeError("track: step() is called inside the `with track(...)` block")
        if step is None:
            step = self.global_step + 1
        elif isinstance(step, bool) or not isinstance(step, int) or step < self.global_step:
            raise ValueError(f"step: expected an int of at least {self.global_step} (the step before), got {step!r}")
        self.global_step = step
        self.session.optimizer_step(step)

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._state = "closed"
        if exc_type is not None:
            self.session.abort(exc)  # keep what is committed: mode="a" with resume_step continues it
            return False
        self.session.finish()  # every process waits for rank 0 to close the store
        if self.session.analyze and self.session.rank == 0:
            self.report_dir = self.session.report(step=self.global_step, sinks=self.wandb.sinks(self.global_step))
        return False


@takes_settings
def track(model: nn.Module, store: str | os.PathLike, probe_data: Iterable, hessian_data: Iterable | None = None,
          *, resume_step: int | None = None, wandb_run: Any = None, **settings: Unpack[Settings]) -> POLCALoop:
    """POLCA of a training loop written by hand: a context manager whose ``step()`` is called
    after every optimizer step.

    Entering the block takes the first snapshot (at step 0, or ``resume_step``); ``step()``
    takes a snapshot every ``snapshot_every`` optimizer steps and a basis step every
    ``basis_every``, as :class:`~polca_lightning.POLCACallback` does; leaving the block
    completes the store, then runs the analysis and the report (``analyze=True``): to
    ``wandb_run``, else to the W&B run open in the process, else to the folder
    ``<store>.report``; the scalars of each snapshot and basis step go to the same run while
    the loop runs, against the key ``global_step``. An exception inside the block closes
    the store with what is committed and goes on; ``mode="a"`` with ``resume_step`` continues it.
    Under ``torchrun`` (an initialised ``torch.distributed`` group) every process enters the
    block, the probe and Hessian batches are split across them, and rank 0 writes the one store.

    Args:
        model: the model being trained (or its ``DistributedDataParallel`` wrapper); its
            parameters are read, never changed.
        resume_step: with ``mode="a"``: the optimizer step the loop resumes from (that of
            the checkpoint it loaded; the model holds its weights). The store is cut to its
            snapshots up to that step and continues; a snapshot or basis step due at that
            step that the store lacks is taken on entering. The engine costs measured at the
            start of the run are read back from the store, so the numbers are those of a run
            that never stopped.
        wandb_run: the W&B run to report to (what ``wandb.init`` returned); default: the
            one open when the block is entered, if any; ``False``: none (a folder).

    Returns:
        A :class:`POLCALoop`: enter it with ``with``; ``step()`` inside.

    Raises:
        ValueError, TypeError: a bad argument, naming it, what was expected and what came
            (before anything runs); ``resume_step`` without ``mode="a"``.
        StoreExistsError: on entering, a store at ``store`` in mode ``"w-"``.
        RuntimeError: on entering, a store with snapshots in mode ``"a"`` without ``resume_step``.

    Example:
        >>> with polca_lightning.track(model, "runs/polca.zarr", probe_data=probe, hessian_data=hessian,
        ...                            snapshot_every=25, basis_every=200) as polca:
        ...     for batch in loader:
        ...         loss = loss_fn(model, batch); loss.backward(); optimizer.step(); optimizer.zero_grad()
        ...         polca.step()
    """
    return POLCALoop(model, store, probe_data, hessian_data, resume_step=resume_step, wandb_run=wandb_run,
                     settings=settings)
