"""3-digit addition with POLCA inside Hugging Face's ``transformers.Trainer``.

The run of ``examples/arithmetic.py`` (its problems, ``place``/``carry`` labels, callback
settings and printed results) on the small GPT-2 of ``examples/huggingface.py``, trained
by ``transformers.Trainer`` instead of Lightning: ``POLCATrainerCallback`` takes the
arguments of ``POLCACallback``, writes the same store, and after training sends the
report to the W&B run the ``Trainer`` opened (``report_to="wandb"``, offline: no account
needed; ``wandb sync`` uploads it later).

Needs the optional extra: ``pip install -e ".[transformers]"`` (transformers and accelerate).

Usage:
    python examples/hf_trainer.py              # the default run (minutes on 2 CPU cores)
    python examples/hf_trainer.py --tiny       # seconds: the CI smoke run
    python examples/hf_trainer.py --no-wandb   # the report goes to a folder beside the store
    python examples/hf_trainer.py --help
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

try:
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, default_data_collator, set_seed
except ImportError as err:
    raise ImportError('examples/hf_trainer.py needs the transformers extra: pip install -e ".[transformers]"') from err

from arithmetic import addition_callback, print_results, splits, write_results
from huggingface import example_parser, hf_config
from polca_lightning.hf import POLCATrainerCallback


def parse_args(argv=None) -> argparse.Namespace:
    return example_parser(__doc__, "runs/hf_trainer", "polca-hf-trainer", argv).parse_args(argv)


def main(argv=None) -> Path:
    """Train with ``transformers.Trainer`` and the callback into ``--out``; print what POLCA found;
    returns the store."""
    args = parse_args(argv)
    out = Path(args.out)
    store = out / "polca.zarr"
    if args.overwrite:
        shutil.rmtree(store, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)

    train, probe, hessian = splits(args)  # the problems of examples/arithmetic.py
    examples = [{"input_ids": ids, "labels": labels} for ids, labels in zip(train["input_ids"], train["labels"])]
    callback = addition_callback(store, probe, hessian, args, callback_class=POLCATrainerCallback)
    if not args.no_wandb:
        import wandb

        # the Trainer's W&B callback logs into the run open when training begins, and so does POLCA
        wandb.init(project=args.wandb_project, dir=str(out), mode="online" if args.online else "offline",
                   config=vars(args))
    training = TrainingArguments(
        output_dir=str(out / "trainer"), max_steps=args.steps, per_device_train_batch_size=args.batch,
        learning_rate=args.lr, weight_decay=0.1, adam_beta2=0.98, lr_scheduler_type="constant_with_warmup",
        warmup_steps=100, max_grad_norm=0.0, train_sampling_strategy="sequential", seed=args.seed,
        logging_steps=max(1, min(25, args.steps // 4)), save_strategy="no",
        report_to="none" if args.no_wandb else "wandb",
    )
    set_seed(args.seed)  # the model's random initialisation
    # eager attention: forward-mode AD and double backward do not go through the fused kernels
    model = AutoModelForCausalLM.from_config(hf_config("gpt2", args.d_model, args.n_layers, args.n_heads),
                                             attn_implementation="eager")
    trainer = Trainer(model=model, args=training, train_dataset=examples, data_collator=default_data_collator,
                      callbacks=[callback])
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    if not args.no_wandb:
        wandb.finish()  # an offline run is readable once finished

    print(f"\n{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"trained by transformers.Trainer for {trainer.state.global_step} steps")
    print_results(write_results(store, {"fit": seconds, **callback.tracker.timings}))
    return store


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    main()
