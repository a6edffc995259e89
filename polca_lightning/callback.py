"""``POLCACallback``: Lightning hooks and scheduling around :class:`~polca_lightning.tracker.POLCATracker`."""

from __future__ import annotations

import functools
import logging
import os
from typing import Any, Callable, Iterable, Mapping

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor

from polca_lightning.config import POLCAConfig
from polca_lightning.core.functional import ParameterSpace
from polca_lightning.core.losses import resolve_token_loss
from polca_lightning.core.polca import needs_curvature
from polca_lightning.store.location import resolve_store
from polca_lightning.store import (
    WEIGHTS_COMPRESSORS, NullWriter, StoreWriter, TokenIndex, check_store_path, check_weights_compressors,
)
from polca_lightning.tracker import Collective, POLCATracker, TorchDistributed

__all__ = ["POLCACallback"]

log = logging.getLogger("polca_lightning")

_SHARDED = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


def _callable_or_none(name: str, value: Any, expected: str) -> Callable | None:
    if value is not None and not callable(value):
        raise TypeError(f"{name}: expected a callable {expected}, got {value!r}")
    return value


def _batches(name: str, data: Any) -> list:
    if data is None:
        raise ValueError(f"{name}: expected a DataLoader or an iterable of batches, got None")
    if isinstance(data, (Tensor, Mapping, str)) or not isinstance(data, Iterable):
        raise TypeError(f"{name}: expected a DataLoader or an iterable of batches, got {type(data).__name__}")
    batches = list(data)
    if not batches:
        raise ValueError(f"{name}: expected at least one batch, got none (is the dataset empty?)")
    return batches


def _on_rank_zero(trainer: Trainer, fn: Callable[[], Any]) -> Any:
    """``fn()`` on global rank 0 only; if it raises, every rank raises.

    DDP: an error raised on rank 0 alone would leave the other ranks waiting in the next
    collective (Lightning's ``post_setup`` barrier, the tracker's broadcasts) until the
    process-group timeout. Rank 0 re-raises its own error; the others a RuntimeError
    naming it (broadcast as text, as an exception object may not pickle).
    """
    result, error = None, None
    if trainer.global_rank == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
    message = f"{type(error).__name__}: {error}" if error is not None else None
    message = trainer.strategy.broadcast(message, src=0) if trainer.world_size > 1 else message
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"POLCACallback failed on rank 0 with {message}")
    return result


class POLCACallback(Callback):
    """Decompose every probe token's loss change along a growing Hessian basis, during training.

    Snapshots the selected parameters at step 0 and every ``snapshot_every`` optimizer
    steps; every ``basis_every`` steps adds ``k`` eigenvectors of the projected Hessian
    (Algorithm 1 of the paper) and backfills them over every earlier snapshot; streams
    per-token loss, directional derivatives and POLCA values into a Zarr store that
    :func:`polca_lightning.open_store` reads back.

    Args:
        store: path of the Zarr store (a directory), or a URL that fsspec opens
            (``s3://bucket/run.zarr``, ``gs://...``; see :func:`polca_lightning.open_store`).
        probe_data: DataLoader or iterable of batches: the held-out tokens to decompose.
        hessian_data: DataLoader or iterable of batches: the training sample whose mean
            loss defines the Hessian (needed for ``basis="hessian"``).
        token_loss: ``(module, batch) -> (loss, mask[, target])``; default: the module's
            ``token_loss`` method if it has one, else the causal-LM built-in.
        token_labels: optional ``batch -> {name: tensor[batch, positions]}``; each name
            becomes a token coordinate of the store.
        snapshot_every, basis_every, k, max_basis, order, basis, parameters: what is decomposed,
            and when; engine, memory_cap, basis_on_device, compute_precision, lanczos_tol,
            seed: how. The fields of :class:`~polca_lightning.config.POLCAConfig`, which
            documents and checks them; the callback keeps them as :attr:`config`.
        mode: ``"w-"`` refuses an existing store, ``"a"`` resumes (with ``ckpt_path``),
            ``"w"`` overwrites.
        storage_options: options of a URL store's filesystem, as ``xarray.open_zarr`` takes
            them (S3: ``key``, ``secret``, ``endpoint_url``, ...); used for every read and
            write of the store, the analysis after fit included.
        weights_compressors: zarr 3 compressors of the ``weights`` snapshots (``None``: raw);
            default :data:`polca_lightning.store.WEIGHTS_COMPRESSORS`.
        analyze: run the analysis and reports after fit (:func:`polca_lightning.report.report_after_fit`).
        analysis_kwargs: settings for :func:`polca_lightning.analysis.analyze` (e.g. ``min_samples``).
        decode: ``decode(sequence_index, position) -> str``, the text of a probe token's context,
            shown in the table of contexts nearest each cluster medoid.
        decode_target: ``decode_target(token_id) -> str``, the text of a target token id
            (e.g. a tokenizer's ``decode``), shown beside the ids in the table and figures of
            each cluster's most common targets.
        lca_directions: with ``analyze``, compute the LCA baseline after fit along this many
            parameters, the largest in magnitude at the end (default ``max_basis``; 0: none).
        ablate: with ``analyze``, undo the final model's movement along each basis vector
            and store every probe token's loss change (:func:`polca_lightning.ablation.ablate_directions`;
            one pass over the probe data per vector).
        progress: progress bars for eigensolves, backfills and snapshots that take long.

    Attributes:
        config: the :class:`~polca_lightning.config.POLCAConfig` of the run (the store records
            its :meth:`~polca_lightning.config.POLCAConfig.to_dict` as the ``config`` attribute).
        tracker: the :class:`~polca_lightning.tracker.POLCATracker`, from ``on_fit_start`` on.

    Raises:
        ValueError, TypeError: a bad argument, naming it, what was expected and what came.

    Example:
        >>> callback = POLCACallback(store="runs/polca.zarr", probe_data=probe_loader,
        ...                          hessian_data=hessian_loader, snapshot_every=25, basis_every=200)
        >>> trainer = L.Trainer(max_steps=3000, callbacks=[callback])
    """

    def __init__(
        self,
        store: str | os.PathLike,
        probe_data: Iterable,
        hessian_data: Iterable | None = None,
        *,
        token_loss: Callable | None = None,
        token_labels: Callable[[Any], Mapping[str, Tensor]] | None = None,
        snapshot_every: int = 25,
        basis_every: int = 200,
        k: int = 1,
        max_basis: int = 15,
        order: str = "trapezoid",
        basis: str | Callable = "hessian",
        parameters: list[str] | None = None,
        mode: str = "w-",
        storage_options: dict | None = None,
        weights_compressors: Any = WEIGHTS_COMPRESSORS,
        engine: str = "auto",
        memory_cap: int = 1 << 30,
        basis_on_device: bool = True,
        compute_precision: str = "float32",
        lanczos_tol: float = 1e-3,
        seed: int = 0,
        analyze: bool = True,
        analysis_kwargs: dict | None = None,
        decode: Callable[[int, int], str] | None = None,
        decode_target: Callable[[int], str] | None = None,
        lca_directions: int | None = None,
        ablate: bool = True,
        progress: bool = True,
    ):
        self.config = POLCAConfig(  # checks every setting of the decomposition
            snapshot_every=snapshot_every, basis_every=basis_every, k=k, max_basis=max_basis, order=order,
            basis=basis, parameters=parameters, engine=engine, memory_cap=memory_cap,
            basis_on_device=basis_on_device, compute_precision=compute_precision, lanczos_tol=lanczos_tol, seed=seed,
        )
        location = resolve_store(store, storage_options)  # a URL fsspec cannot open fails here
        self.store, self.storage_options = location.target, location.storage_options  # Path, or a URL
        self.weights_compressors = check_weights_compressors(weights_compressors)
        if mode not in ("w-", "a", "w"):
            raise ValueError(f"mode: expected 'w-' (new store), 'a' (resume) or 'w' (overwrite), got {mode!r}")
        self.mode = mode
        self.probe_batches = _batches("probe_data", probe_data)
        needs_hessian = basis == "hessian"
        self.hessian_batches = _batches("hessian_data", hessian_data) if needs_hessian or hessian_data is not None else []
        self.token_loss = _callable_or_none("token_loss", token_loss, "(module, batch) -> (loss, mask)")
        self.token_labels = _callable_or_none("token_labels", token_labels, "batch -> {name: tensor}")
        self.decode = _callable_or_none("decode", decode, "(sequence_index, position) -> str")
        self.decode_target = _callable_or_none("decode_target", decode_target, "token_id -> str")
        if analysis_kwargs is not None and not isinstance(analysis_kwargs, Mapping):
            raise TypeError(f"analysis_kwargs: expected a dict of analyze() settings, got {type(analysis_kwargs).__name__}")
        self.analysis_kwargs = dict(analysis_kwargs or {})
        if lca_directions is not None and (isinstance(lca_directions, bool) or not isinstance(lca_directions, int)
                                           or lca_directions < 0):
            raise ValueError(f"lca_directions: expected a non-negative int or None, got {lca_directions!r}")
        self.lca_directions = max_basis if lca_directions is None else lca_directions
        if not isinstance(ablate, bool):
            raise TypeError(f"ablate: expected True or False, got {ablate!r}")
        self.analyze, self.ablate, self.progress = bool(analyze), ablate, bool(progress)
        self.tracker: POLCATracker | None = None
        self.writer: StoreWriter | NullWriter | None = None
        self._last_step = -1
        self._resume_state: dict | None = None

    # ------------------------------------------------------------- settings
    @property
    def state_key(self) -> str:  # one state per store path
        return self._generate_state_key(store=str(self.store))

    def state_dict(self) -> dict:
        if self.writer is not None:
            self.writer.flush()  # a checkpoint only ever refers to data on disk
        t = self.tracker
        return {
            "last_step": self._last_step,
            "n_snapshots": t.n_snapshots if t else 0,
            "n_basis": t.n_basis if t else 0,
            # the engine costs measured at the start: a resumed run makes the same choices
            # and so computes the same numbers
            "engine_calibration": t.calibration if t else None,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume_state = dict(state_dict)

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
        _on_rank_zero(trainer, self._check_store)  # DDP: rank 0 checks, every rank raises

    def _check_store(self) -> None:
        check_store_path(self.store, self.mode, self.storage_options)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        token_loss = resolve_token_loss(pl_module, self.token_loss)
        space = ParameterSpace.from_module(pl_module, self.config.parameters)
        device = pl_module.device
        probe = [move_data_to_device(b, device) for b in self.probe_batches]
        hessian = [move_data_to_device(b, device) for b in self.hessian_batches]
        stored = self._run_config(trainer, pl_module, space)

        def open_writer(tokens: TokenIndex) -> StoreWriter | NullWriter:
            # after the tracker's checks: bad probe data or a model we cannot differentiate
            # leaves nothing behind. DDP: only rank 0 writes; a refusal raises everywhere
            writer = _on_rank_zero(trainer, lambda: StoreWriter(
                self.store, mode=self.mode, tokens=tokens, parameters=list(zip(space.names, space.shapes)),
                order=self.config.order, config=stored, max_basis=self.config.max_basis,
                with_curvature=needs_curvature(self.config.order), storage_options=self.storage_options,
                weights_compressors=self.weights_compressors, resumable_changes=POLCAConfig.resumable_changes(),
            ))
            return writer if writer is not None else NullWriter()

        self.tracker = POLCATracker(
            pl_module, token_loss, space, probe, hessian, self.config, open_writer=open_writer,
            collective=TorchDistributed() if trainer.world_size > 1 else Collective(),
            token_labels=self.token_labels, calibration=(self._resume_state or {}).get("engine_calibration"),
            log_metrics=lambda m, step: self._log(trainer, m, step), progress=self.progress,
        )
        self.writer = self.tracker.writer
        self._resume(trainer)

    def _run_config(self, trainer: Trainer, pl_module: LightningModule, space: ParameterSpace) -> dict:
        """What the store records as its ``config``: :meth:`POLCAConfig.to_dict` plus what the
        run itself decides (:data:`~polca_lightning.config.RUN_FACTS`): the number of probe and
        Hessian batches, the dtype the callback computes in (the parameters'; autocast is off while
        it computes, so ``bf16-mixed`` training gives float32; the store holds float32 whatever it
        is), the training precision, and the parameters left out of the decomposition because they
        are frozen (``requires_grad=False``)."""
        params = dict(pl_module.named_parameters())
        dtype = functools.reduce(torch.promote_types, [params[n].dtype for n in space.names])  # flatten()'s
        facts = {
            "n_probe_batches": len(self.probe_batches),
            "n_hessian_batches": len(self.hessian_batches),
            "compute_dtype": str(dtype).removeprefix("torch."),
            "training_precision": str(trainer.precision),
            "frozen_parameters": [n for n, p in pl_module.named_parameters() if not p.requires_grad],
        }
        return {**self.config.to_dict(), **facts}

    def _resume(self, trainer: Trainer) -> None:
        state = self._resume_state
        committed = self.writer.committed  # (0, 0) from a NullWriter: rank 0's is broadcast
        # on the model's device: NCCL broadcasts CUDA tensors only (gloo: CPU)
        committed = torch.tensor(committed, device=trainer.lightning_module.device)
        committed = tuple(int(x) for x in self.tracker.coll.broadcast(committed).tolist())
        if state is None:
            if committed[0]:
                raise RuntimeError(
                    f"store: {str(self.store)!r} holds {committed[0]} snapshots but training did not resume "
                    "from a checkpoint; pass ckpt_path= to Trainer.fit to continue it, or mode='w' to start over"
                )
            return
        n_snapshots, n_basis = state["n_snapshots"], state["n_basis"]
        if committed[0] < n_snapshots or committed[1] < n_basis:
            raise RuntimeError(
                f"store: {str(self.store)!r} holds {committed[0]} snapshots and {committed[1]} basis vectors, "
                f"fewer than the checkpoint's {n_snapshots} and {n_basis}: it is not this run's store"
            )
        self.writer.truncate(n_snapshots, n_basis)
        self.tracker.restore(n_snapshots)
        self._last_step = state["last_step"]
        log.info("POLCA: resumed %s at snapshot %d with %d basis vectors", self.store, n_snapshots, n_basis)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.tracker.n_snapshots == 0:
            self._step(trainer, trainer.global_step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # with gradient accumulation several micro-batches see the same global_step
        step = trainer.global_step
        if step != self._last_step and step % self.config.snapshot_every == 0:
            self._step(trainer, step)

    def _step(self, trainer: Trainer, step: int) -> None:
        self._last_step = step
        self.tracker.snapshot(step)
        if step % self.config.basis_every == 0:
            with torch.enable_grad():
                self.tracker.grow_basis(step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.writer.close(complete=True)
        if self.writer.writes:
            t = self.tracker
            log.info(
                "POLCA: %d snapshots, %d basis vectors in %s; time %s", t.n_snapshots, t.n_basis, self.store,
                {k: round(v, 2) for k, v in t.timings.items()},
            )
        # DDP: no rank returns from fit before rank 0 has closed the store (code after fit may read it)
        trainer.strategy.barrier("polca_store_closed")
        if self.analyze and trainer.global_rank == 0:
            self._analyze(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.writer is not None:
            try:
                self.writer.close(complete=False)  # keep what is committed; the store stays resumable
            except Exception:  # noqa: BLE001 - the exception in flight says more
                log.exception("POLCA: could not close the store after %s", type(exception).__name__)

    def _analyze(self, trainer: Trainer) -> None:
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

        report_after_fit(self.store, trainer, loggers=trainer.loggers, decode=self.decode,
                         decode_target=self.decode_target, analysis_kwargs=self.analysis_kwargs,
                         progress=self.progress, storage_options=self.storage_options)

    @staticmethod
    def _log(trainer: Trainer, metrics: dict, step: int) -> None:
        if trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
