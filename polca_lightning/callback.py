"""``POLCACallback``: Lightning's hooks around :class:`~polca_lightning.session.POLCASession`.

The session holds everything a training loop does not decide (the settings, the tracker
and its store, the schedule, resume, the work after fit); this module maps Lightning's
hooks onto it, moves the batches to the model's device, and reports to the trainer's loggers.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import move_data_to_device

from polca_lightning.session import POLCASession, SessionAttributes
from polca_lightning.settings import Settings, Unpack, takes_settings

__all__ = ["POLCACallback"]

_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


@takes_settings
class POLCACallback(SessionAttributes, Callback):
    """Decompose every probe token's loss change along a growing Hessian basis, during training.

    Snapshots the selected parameters at step 0 and every ``snapshot_every`` optimizer
    steps; every ``basis_every`` steps adds ``k`` eigenvectors of the projected Hessian
    (Algorithm 1 of the paper) and backfills them over every earlier snapshot; streams
    per-token loss, directional derivatives and POLCA values into a Zarr store that
    :func:`polca_lightning.open_store` reads back.

    The arguments are those of every entry point, defined once in :mod:`polca_lightning.settings`
    (the ``Args`` below are written from there).

    Attributes:
        config: the :class:`~polca_lightning.config.POLCAConfig` of the run (the store records
            its :meth:`~polca_lightning.config.POLCAConfig.to_dict` as the ``config`` attribute).
        tracker: the :class:`~polca_lightning.tracker.POLCATracker`, from ``on_fit_start`` on.
        session: the :class:`~polca_lightning.session.POLCASession` the hooks drive (``store``,
            ``writer``, ``storage_options`` and ``mode`` are its, as attributes of the callback too).
        probe_batches, hessian_batches: the batches of ``probe_data`` and ``hessian_data``.

    Raises:
        ValueError, TypeError: a bad argument, naming it, what was expected and what came.

    Example:
        >>> callback = POLCACallback(store="runs/polca.zarr", probe_data=probe_loader,
        ...                          hessian_data=hessian_loader, snapshot_every=25, basis_every=200)
        >>> trainer = L.Trainer(max_steps=3000, callbacks=[callback])
    """

    def __init__(self, store: str | os.PathLike, probe_data: Iterable, hessian_data: Iterable | None = None,
                 **settings: Unpack[Settings]):
        self.session = POLCASession(store, owner="POLCACallback", resume_hint="ckpt_path= to Trainer.fit",
                                    **settings)
        self.probe_batches, self.hessian_batches = self.session.batches(probe_data, hessian_data)

    # ------------------------------------------------------------- settings
    @property
    def state_key(self) -> str:  # one state per store path
        return self._generate_state_key(store=str(self.store))

    def state_dict(self) -> dict:
        return self.session.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.session.load_state_dict(state_dict)

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        strategy = type(trainer.strategy)
        if any(cls.__name__ in _SHARDED for cls in strategy.__mro__):
            raise RuntimeError(
                f"POLCACallback: the {strategy.__name__} strategy shards parameters, which POLCA does not "
                "support yet; use a single device or DDP"
            )
        self.session.connect(trainer.world_size)
        self.session.check_store()  # DDP: rank 0 checks, every rank raises

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        device = pl_module.device
        self.session.start(
            pl_module, [move_data_to_device(b, device) for b in self.probe_batches],
            [move_data_to_device(b, device) for b in self.hessian_batches],
            training_precision=str(trainer.precision), log_metrics=lambda m, step: self._log(trainer, m, step),
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.session.begin(trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # with gradient accumulation several micro-batches see the same global_step: the session skips them
        self.session.optimizer_step(trainer.global_step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.session.finish()  # DDP: no rank returns from fit before rank 0 has closed the store
        if self.session.analyze and trainer.global_rank == 0:
            self.session.report(step=int(trainer.global_step), loggers=trainer.loggers)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.session.abort(exception)  # keep what is committed; the store stays resumable

    @staticmethod
    def _log(trainer: Trainer, metrics: dict, step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
