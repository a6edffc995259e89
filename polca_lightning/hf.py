"""``POLCATrainerCallback``: POLCA inside Hugging Face's ``transformers.Trainer``.

The same store, analysis and report as :class:`~polca_lightning.POLCACallback`, from the
``Trainer``'s hooks: both callbacks drive one :class:`~polca_lightning.session.POLCASession`.
Needs the ``transformers`` extra (``pip install "polca-lightning[transformers]"``, which
brings ``accelerate``, what the ``Trainer`` runs on); ``import polca_lightning`` never
imports ``transformers``, this module does.

Example:
    >>> from polca_lightning.hf import POLCATrainerCallback
    >>> polca = POLCATrainerCallback("runs/polca.zarr", probe_data=probe_dataset, hessian_data=hessian_dataset)
    >>> trainer = transformers.Trainer(model, args, train_dataset=train_dataset, callbacks=[polca])
    >>> trainer.train()
"""

from __future__ import annotations

import os
import socket
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping


try:
    from transformers import TrainerCallback, default_data_collator
    from transformers.trainer_callback import ExportableState
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        'polca_lightning.hf needs transformers (and accelerate): pip install "polca-lightning[transformers]"'
    ) from err

from polca_lightning.data import as_batches, holds_examples
from polca_lightning.session import POLCASession, SessionAttributes
from polca_lightning.settings import Settings, Unpack, takes_settings

__all__ = ["POLCATrainerCallback", "pretrained_causal_lm", "tensorboard_log_dir", "trainer_collator"]


def trainer_collator(train_dataloader: Any) -> Callable:
    """The data collator of the ``Trainer``'s training DataLoader, unwrapped from the
    ``RemoveColumnsCollator`` the ``Trainer`` puts around it (which would drop the columns
    ``token_labels`` reads); ``default_data_collator`` when there is none."""
    collate = getattr(train_dataloader, "collate_fn", None)
    if type(collate).__name__ == "RemoveColumnsCollator":
        collate = collate.data_collator
    return collate if collate is not None else default_data_collator


def pretrained_causal_lm(folder: str | os.PathLike):
    """The causal language model saved in a Hugging Face folder (``save_pretrained``, a
    ``Trainer`` checkpoint), with eager attention: forward-mode AD does not go through the
    fused attention kernels. What ``polca checkpoints`` reads Hugging Face folders with."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")


def tensorboard_log_dir(args: Any) -> Path:
    """Where the ``Trainer``'s ``TensorBoardCallback`` writes: ``TENSORBOARD_LOGGING_DIR``,
    else ``args.logging_dir`` (transformers 4), else the folder under ``<output_dir>/runs``
    of this process's newest event file (the callback opens it when training begins), else
    ``<output_dir>/runs/polca``."""
    env = os.getenv("TENSORBOARD_LOGGING_DIR")
    if env:
        return Path(os.path.expanduser(env))
    if getattr(args, "logging_dir", None):
        return Path(args.logging_dir)
    runs = Path(args.output_dir) / "runs"
    # tensorboard names event files events.out.tfevents.<time>.<host>.<pid>.<n>
    mine = list(runs.glob(f"*/events.out.tfevents.*.{socket.gethostname()}.{os.getpid()}.*"))
    if mine:
        return max(mine, key=lambda p: p.stat().st_mtime).parent
    return runs / "polca"


@takes_settings
class POLCATrainerCallback(SessionAttributes, TrainerCallback, ExportableState):
    """:class:`~polca_lightning.POLCACallback` for Hugging Face's ``transformers.Trainer``.

    The same store, analysis and report after training, with the same arguments
    (:mod:`polca_lightning.settings` defines them once) and two more for datasets. Snapshots
    and basis steps come on optimizer steps (``on_step_end``: with
    ``gradient_accumulation_steps`` the micro-batches of one step count once). The default token loss,
    :func:`~polca_lightning.causal_lm_token_loss`, reads the ``Trainer``'s batches: dicts
    with ``input_ids``, ``labels`` (``-100`` excluded) and ``attention_mask``. The report
    after training goes to the W&B run the ``Trainer`` opened (``report_to="wandb"``), to
    an event file in its TensorBoard log dir (``report_to="tensorboard"``,
    :func:`tensorboard_log_dir`), or, with neither, to the folder ``<store>.report``; the
    scalars logged while training (eigenvalues, coverage) go to the same places.

    Resume: ``trainer.train(resume_from_checkpoint=...)`` with ``mode="a"`` continues the
    store; the callback's state travels in the checkpoint's ``trainer_state.json``
    (``TrainerState.stateful_callbacks``, under the class name, keyed by store). Leave
    ``restore_callback_states_from_checkpoint`` off: with it the ``Trainer`` would rebuild
    the callback from JSON, which cannot hold the probe data. After an exception in
    ``trainer.train()`` the ``Trainer`` calls no hook: :meth:`close` closes the store,
    keeping what is committed (a process that ends closes it too). Distributed runs
    (``torchrun``): rank 0 writes the one store, as with ``POLCACallback``; FSDP and
    DeepSpeed are refused.

    Data given as examples (a dataset, or a list or tuple of examples, as
    ``Trainer(train_dataset=...)`` takes them) are collated when training begins, in order,
    by the ``Trainer``'s data collator (:func:`trainer_collator`) unless ``data_collator`` is
    given, ``per_device_eval_batch_size`` at a time unless ``batch_size`` is given.

    Attributes:
        session, config, store, tracker, writer: as for :class:`~polca_lightning.POLCACallback`.
        probe_batches, hessian_batches: the batches, from ``on_train_begin`` on where the
            data are examples.

    Raises:
        ValueError, TypeError: a bad argument, naming it, what was expected and what came.

    Example:
        >>> polca = POLCATrainerCallback("runs/polca.zarr", probe_data=probe_dataset,
        ...                              hessian_data=hessian_dataset, snapshot_every=25, basis_every=200)
        >>> trainer = Trainer(model, TrainingArguments("out", max_steps=3000, report_to="wandb"),
        ...                   train_dataset=train_dataset, callbacks=[polca])
    """

    def __init__(self, store: str | os.PathLike, probe_data: Iterable, hessian_data: Iterable | None = None,
                 **settings: Unpack[Settings]):
        self.session = POLCASession(store, owner="POLCATrainerCallback",
                                    resume_hint="resume_from_checkpoint= to Trainer.train", **settings)
        wants_hessian = self.session.needs_hessian or hessian_data is not None
        self._sources = {"probe_data": probe_data, "hessian_data": hessian_data if wants_hessian else None}
        # batches now (bad data fail here); examples when training begins, with the Trainer's collator
        self.probe_batches = self._batches_now("probe_data")
        self.hessian_batches = self._batches_now("hessian_data") if wants_hessian else []
        self._wandb_run = None  # a WandbRun on the run the Trainer opened (rank 0)
        self._tensorboard = None  # a SummaryWriter in the Trainer's TensorBoard log dir (rank 0)

    def _batches_now(self, name: str) -> list | None:
        data = self._sources[name]
        if not holds_examples(name, data):
            return as_batches(name, data)
        if hasattr(data, "__len__") and len(data) == 0:
            raise ValueError(f"{name}: expected at least one example, got an empty dataset")
        return None

    def _batches(self, name: str, args: Any, train_dataloader: Any) -> list:
        session = self.session
        return as_batches(name, self._sources[name],
                          collate=session.data_collator or trainer_collator(train_dataloader),
                          batch_size=session.batch_size or args.per_device_eval_batch_size)

    # ---------------------------------------------------------------- state
    def state(self) -> dict:
        """The checkpoint's state of this callback (``ExportableState``): what resuming the
        store needs, keyed by the store (the writer is flushed first)."""
        return {"args": {}, "attributes": {"store": str(self.store), **self.session.state_dict()}}

    def _saved_state(self, stateful_callbacks: Mapping | None) -> dict | None:
        entries = (stateful_callbacks or {}).get(type(self).__name__)
        entries = entries if isinstance(entries, list) else [entries] if entries else []
        mine = [e["attributes"] for e in entries if e.get("attributes", {}).get("store") == str(self.store)]
        return mine[-1] if mine else None

    # ---------------------------------------------------------------- hooks
    def on_init_end(self, args, state, control, **kwargs):
        if getattr(args, "restore_callback_states_from_checkpoint", False):
            raise ValueError(
                "restore_callback_states_from_checkpoint: expected False with POLCATrainerCallback, got True "
                "(the Trainer would rebuild the callback from JSON, which cannot hold the probe data); the "
                "callback reads its state from the checkpoint itself when resuming"
            )

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        from accelerate.utils import send_to_device

        self.on_init_end(args, state, control)  # a callback added after the Trainer was made
        if getattr(args, "fsdp", None) or getattr(args, "deepspeed", None):
            raise RuntimeError("POLCATrainerCallback: FSDP and DeepSpeed shard parameters, which POLCA does not "
                               "support yet; use a single device or DDP")
        session = self.session
        session.connect(args.world_size)
        session.check_store()  # rank 0 checks, every rank raises
        if holds_examples("probe_data", self._sources["probe_data"]):
            self.probe_batches = self._batches("probe_data", args, train_dataloader)
        if holds_examples("hessian_data", self._sources["hessian_data"]):
            self.hessian_batches = self._batches("hessian_data", args, train_dataloader)
        saved = self._saved_state(state.stateful_callbacks) if state.global_step > 0 else None  # resumed
        session.resume_state = saved
        if session.rank == 0:
            self._open_sinks(args)
        device = next(model.parameters()).device
        precision = "bf16-mixed" if args.bf16 else "16-mixed" if args.fp16 else "32-true"
        session.start(model, [send_to_device(b, device) for b in self.probe_batches],
                      [send_to_device(b, device) for b in self.hessian_batches],
                      training_precision=precision, log_metrics=self._log)
        session.begin(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        self.session.optimizer_step(state.global_step)  # after the optimizer step: once per step

    def on_train_end(self, args, state, control, **kwargs):
        self.session.finish()  # no rank goes on before rank 0 has closed the store
        try:
            if self.session.analyze and self.session.rank == 0:
                self.session.report(step=int(state.global_step), sinks=self._report_sinks(int(state.global_step)))
        finally:
            self._close_sinks()

    def close(self) -> None:
        """Close the store after ``trainer.train()`` raised, keeping what is committed (the
        store stays resumable with ``mode="a"``); the ``Trainer`` has no hook for exceptions."""
        self.session.abort()
        self._close_sinks()

    # -------------------------------------------------------------- logging
    def _open_sinks(self, args) -> None:
        report_to = set(getattr(args, "report_to", None) or [])
        self._close_sinks()
        if "wandb" in report_to:
            import wandb

            from polca_lightning.report.wandb_report import WandbRun

            if wandb.run is None:  # opened by the Trainer's WandbCallback in its on_train_begin
                warnings.warn("POLCA: report_to has 'wandb' but no W&B run is open; the report goes elsewhere",
                              UserWarning, stacklevel=2)
            else:
                self._wandb_run = WandbRun(wandb.run)
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(log_dir=str(tensorboard_log_dir(args)))

    def _close_sinks(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()
        self._wandb_run, self._tensorboard = None, None

    def _log(self, metrics: dict, step: int) -> None:
        if self._wandb_run is not None:
            self._wandb_run.log_metrics(metrics, step)
        if self._tensorboard is not None:
            for key, value in metrics.items():
                self._tensorboard.add_scalar(key, value, global_step=step)

    def _report_sinks(self, step: int) -> list:
        sinks = []
        if self._wandb_run is not None:
            from polca_lightning.report.wandb_report import WandbSink

            sinks.append(WandbSink(self._wandb_run, step))
        if self._tensorboard is not None:
            from polca_lightning.report.tensorboard_report import TensorBoardSink

            sinks.append(TensorBoardSink.of(self._tensorboard, step))
        return sinks
