"""``polca checkpoints``: POLCA over a series of saved weights, from the command line.

Usage::

    polca checkpoints STORE CHECKPOINT [CHECKPOINT ...] --probe DATA [--hessian DATA]
                      [--model FACTORY] [--token-loss FUNCTION] [--batch-size N]
                      [--steps N ...] [--basis-at N ...] [--basis-every M] [--k K] [--max-basis K]
                      [--order O] [--basis hessian|random] [--engine E] [--seed S]
                      [--resume | --overwrite] [--no-analyze] [--wandb-project NAME [--online]] [--quiet]

It runs :func:`polca_lightning.from_checkpoints`. CHECKPOINT is a folder of checkpoints, a
POLCA store (its weight snapshots: the run along another basis), or the checkpoints in
training order (Hugging Face folders, Lightning ``.ckpt`` files, ``state_dict`` files). DATA is a file ``torch.save`` wrote (a list of batches or of examples,
or a dict of tensors ``[examples, ...]``, collated or cut ``--batch-size`` at a time), or
``module:function`` / ``path/to/file.py:function`` returning the data. FACTORY (``module:function`` or
``file.py:function``) is called with each checkpoint and returns the model at it; without it,
Hugging Face folders are read with ``AutoModelForCausalLM`` (eager attention). Over a store,
FACTORY is called once, with the first snapshot, to build the model; the store's weights go in.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from polca_lightning.cli.common import CLIError

__all__ = ["add_parser", "cmd_checkpoints", "load_object", "load_data"]


def add_parser(sub, store_argument) -> None:
    """The ``checkpoints`` subcommand on the ``polca`` parser's subparsers."""
    p = sub.add_parser("checkpoints", help="compute POLCA over a series of saved weights into a new store",
                       description="Compute POLCA over an ordered series of checkpoints (Hugging Face folders, "
                                   "Lightning .ckpt files, state_dict files) into a store, then analyse and "
                                   "report it (polca_lightning.from_checkpoints).")
    store_argument(p, "path of the store to write")
    p.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                   help="a folder of checkpoints (checkpoint-N folders, *.ckpt, *.pt, *.safetensors named with "
                        "their step), a POLCA store (its weight snapshots), or the checkpoints in training order")
    d = p.add_argument_group("model and data")
    d.add_argument("--probe", required=True, metavar="DATA",
                   help="probe batches: a torch.save file (a list of batches, or a dict of tensors cut into "
                        "--batch-size batches) or module:function returning them")
    d.add_argument("--hessian", metavar="DATA", help="Hessian batches, as --probe (needed for --basis hessian)")
    d.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="examples per batch of a dict of tensors or a list of examples (default 8)")
    d.add_argument("--model", metavar="FACTORY",
                   help="module:function or file.py:function called with each checkpoint, returning the model "
                        "at it (default for Hugging Face folders: AutoModelForCausalLM, eager attention)")
    d.add_argument("--token-loss", metavar="FUNCTION",
                   help="module:function (module, batch) -> (loss, mask[, target]) (default: the model's "
                        "token_loss, else next-token cross-entropy)")
    s = p.add_argument_group("schedule and settings (those of every entry point; see docs/callback.md)")
    s.add_argument("--steps", type=int, nargs="+", metavar="N", help="the step of each checkpoint "
                   "(default: read from its name: step=N, checkpoint-N or a trailing number)")
    s.add_argument("--basis-at", type=int, nargs="+", metavar="N",
                   help="steps where the basis grows (default: those that are multiples of --basis-every)")
    s.add_argument("--basis-every", type=int, default=200, metavar="M", help="default 200")
    s.add_argument("--k", type=int, default=1, metavar="K", help="vectors per basis step (default 1)")
    s.add_argument("--max-basis", type=int, default=15, metavar="K", help="vectors in all (default 15)")
    s.add_argument("--order", default="trapezoid", choices=["first", "second", "trapezoid", "exact"])
    s.add_argument("--basis", default="hessian", choices=["hessian", "random"])
    s.add_argument("--engine", default="auto", choices=["auto", "forward", "reverse"])
    s.add_argument("--seed", type=int, default=0)
    m = s.add_mutually_exclusive_group()
    m.add_argument("--resume", action="store_true", help="continue a store a killed run left (mode 'a')")
    m.add_argument("--overwrite", action="store_true", help="replace an existing store (mode 'w')")
    o = p.add_argument_group("output")
    o.add_argument("--no-analyze", action="store_true", help="no analysis or report after the store is written")
    o.add_argument("--wandb-project", metavar="NAME", help="report to a new W&B run of this project "
                                                           "(default: the folder STORE.report)")
    o.add_argument("--online", action="store_true", help="sync the W&B run (default: offline)")
    o.add_argument("--quiet", action="store_true", help="no progress bars")


def load_object(spec: str, flag: str) -> Any:
    """What ``module:name`` or ``path/to/file.py:name`` names.

    Raises:
        CLIError: no ``:``, a module that does not import, or no such name in it.
    """
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name:
        raise CLIError(f"{flag}: expected module:function or path/to/file.py:function, got {spec!r}")
    try:
        if where.endswith(".py"):
            loaded = importlib.util.spec_from_file_location(Path(where).stem, where)
            if loaded is None or not Path(where).is_file():
                raise FileNotFoundError(f"no file {where!r}")
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
        return getattr(module, name)
    except (ImportError, FileNotFoundError, AttributeError) as error:
        raise CLIError(f"{flag}: cannot load {spec!r} ({type(error).__name__}: {error})") from None


def load_data(spec: str, flag: str, batch_size: int) -> list:
    """The batches of ``--probe`` or ``--hessian``: a ``torch.save`` file, or a function's return value."""
    import torch

    if not Path(spec).is_file():
        return load_object(spec, flag)()
    try:
        data = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever torch.load raises, the file is unusable
        raise CLIError(f"{flag}: cannot read {spec!r} with torch.load ({type(error).__name__}: {error})") from None
    if isinstance(data, dict) and data and all(isinstance(v, torch.Tensor) for v in data.values()):
        n = len(next(iter(data.values())))  # a dict of tensors [examples, ...]: batches of batch_size
        return [{k: v[i : i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size)]
    return data


def _hf_model(first: Any):
    """The Hugging Face model of the first checkpoint (:func:`polca_lightning.hf.pretrained_causal_lm`)."""
    try:
        from polca_lightning.hf import pretrained_causal_lm
    except ImportError as error:
        raise CLIError(f"the checkpoints are Hugging Face folders: {error}; or pass --model") from None
    return pretrained_causal_lm(first)


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from polca_lightning.checkpoints import StoredSnapshot, weight_files
    from polca_lightning.series import checkpoint_series, from_checkpoints

    sources = args.checkpoints[0] if len(args.checkpoints) == 1 else [Path(c) for c in args.checkpoints]
    try:
        series = checkpoint_series(sources, args.steps)
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise CLIError(str(error)) from None
    stored = isinstance(series[0].source, StoredSnapshot)  # a POLCA store's weight snapshots
    if args.model:
        model = load_object(args.model, "--model")
        if stored:  # built once: every snapshot's weights come from the store
            model = model(series[0].source)
    elif not stored and weight_files(series[0].source):  # a Hugging Face folder
        model = _hf_model(series[0].source)
    elif stored:
        raise CLIError(f"--model: needed for the weight snapshots of {args.checkpoints[0]!r} (a store does not say "
                       "which model it is): a function that builds it")
    else:
        raise CLIError(f"--model: needed for {str(series[0].source)!r}, which is not a Hugging Face folder (a "
                       "checkpoint file does not say which model it is)")
    if args.quiet and "transformers" in sys.modules:  # its bars too: it loads each Hugging Face folder
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    run = None
    if args.wandb_project and not args.no_analyze:
        import wandb

        run = wandb.init(project=args.wandb_project, mode="online" if args.online else "offline",
                         dir=str(Path(str(args.store)).parent) if not getattr(args.store, "remote", False) else None)
    try:
        ds = from_checkpoints(
            model, [c.source for c in series], args.store.target, load_data(args.probe, "--probe", args.batch_size),
            load_data(args.hessian, "--hessian", args.batch_size) if args.hessian else None,
            steps=[c.step for c in series], basis_at=args.basis_at, wandb_run=run if run is not None else False,
            token_loss=load_object(args.token_loss, "--token-loss") if args.token_loss else None,
            basis_every=args.basis_every, snapshot_every=1, k=args.k,  # snapshot_every: every checkpoint is one
            max_basis=args.max_basis, order=args.order, basis=args.basis, engine=args.engine, seed=args.seed,
            mode="a" if args.resume else "w" if args.overwrite else "w-", storage_options=args.store.storage_options,
            analyze=not args.no_analyze, progress=not args.quiet, batch_size=args.batch_size,
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise CLIError(str(error)) from None
    finally:
        if run is not None:
            run.finish()
    print(f"POLCA store {args.store}: {ds.sizes['snapshot']} checkpoints (steps {int(ds['step'][0])}.."
          f"{int(ds['step'][-1])}), {ds.sizes['basis']} basis vectors"
          + ("" if args.no_analyze else "; analysed (polca info STORE)"))
    return 0

