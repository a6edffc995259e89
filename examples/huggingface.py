"""A model we did not write: POLCA on a Hugging Face ``transformers`` causal LM.

The 3-digit addition task of ``examples/arithmetic.py`` (``a a a + b b b = s s s s``,
the 4 sum digits are the loss-bearing tokens, labelled with ``place`` and ``carry``),
learnt by a small, randomly initialised ``GPT2LMHeadModel`` (or ``LlamaForCausalLM``
with ``--arch llama``) wrapped in a ``LightningModule``. ``POLCACallback`` is used as it
is: it calls the model with ``input_ids`` only and takes the per-token loss from
``polca_lightning.core.losses.causal_lm_token_loss``, which reads the output's ``.logits``
and does its own next-token alignment (position p holds the loss of predicting token p),
so Hugging Face's internal label shift never enters.

Attention runs with ``attn_implementation="eager"`` (the callback would put SDPA on its
math backend, which forward-mode AD and double backward go through, while it computes).
GPT-2's ``Conv1D`` projections, its output layer tied to the embedding matrix and
Llama's RMSNorm are all on the activation-based reverse path, so ``engine="auto"``
chooses between forward mode and it by their measured cost; the run prints its pick.

Needs the optional extra: ``pip install -e ".[transformers]"``.

Usage:
    python examples/huggingface.py                 # the default run (about 3.5 min on 2 CPU cores)
    python examples/huggingface.py --tiny          # seconds: the CI smoke run
    python examples/huggingface.py --arch llama    # LlamaForCausalLM (RMSNorm, rotary positions)
    python examples/huggingface.py --help
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

try:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, get_constant_schedule_with_warmup
except ImportError as err:
    raise ImportError('examples/huggingface.py needs the transformers extra: pip install -e ".[transformers]"') from err

from arithmetic import addition_callback, batches, print_results, splits, write_results
from polca_lightning import POLCACallback
from polca_lightning.toy import ADDITION_VOCAB

SEQUENCE_LENGTH = 12  # a a a + b b b = s s s s
ARCHITECTURES = ("gpt2", "llama")


def hf_config(arch: str, d_model: int, n_layers: int, n_heads: int) -> GPT2Config | LlamaConfig:
    """A small ``transformers`` config for the addition vocabulary: no dropout, no cache, no special tokens.

    Raises:
        ValueError: an unknown ``arch``.
    """
    common = dict(vocab_size=ADDITION_VOCAB, bos_token_id=None, eos_token_id=None, pad_token_id=None,
                  use_cache=False)
    if arch == "gpt2":
        return GPT2Config(n_positions=SEQUENCE_LENGTH, n_embd=d_model, n_layer=n_layers, n_head=n_heads,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if arch == "llama":
        return LlamaConfig(max_position_embeddings=SEQUENCE_LENGTH, hidden_size=d_model,
                           intermediate_size=4 * d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
                           num_key_value_heads=n_heads, **common)
    raise ValueError(f"arch: expected one of {ARCHITECTURES}, got {arch!r}")


class HFAdditionModel(L.LightningModule):
    """A ``transformers`` causal LM built from a config, trained the Hugging Face way.

    Training passes ``labels`` (-100 except the sum digits) and uses the model's own
    ``.loss``, for which Hugging Face shifts the labels inside. POLCA calls
    ``forward(input_ids)`` through its default token loss, :func:`causal_lm_token_loss`,
    which reads ``.logits`` and aligns the targets itself; ``tests/test_examples.py``
    checks that the two agree on every sum digit's loss.
    """

    def __init__(self, arch: str = "gpt2", d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
                 lr: float = 3e-3, weight_decay: float = 0.1, warmup: int = 100):
        super().__init__()
        self.save_hyperparameters()
        # eager attention: forward-mode AD and double backward do not go through the fused kernels
        self.net = AutoModelForCausalLM.from_config(hf_config(arch, d_model, n_layers, n_heads),
                                                    attn_implementation="eager")

    def forward(self, input_ids, attention_mask=None, labels=None):
        return self.net(input_ids=input_ids, attention_mask=attention_mask, labels=labels)

    def training_step(self, batch, _):
        loss = self(batch["input_ids"], labels=batch["labels"]).loss  # mean over the sum digits
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=h.lr, weight_decay=h.weight_decay, betas=(0.9, 0.98))
        schedule = get_constant_schedule_with_warmup(opt, num_warmup_steps=h.warmup)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


PRESETS = {
    # CPU default: about 3.5 minutes on 2 cores (GPT-2, 0.10M parameters; the probe loss falls
    # from 2.5 to 0.04 per token)
    "default": dict(steps=1500, batch=64, d_model=64, n_layers=2, n_heads=4, lr=3e-3, probe=600,
                    hessian=256, snapshot_every=50, basis_every=150, k=1, max_basis=10),
    # CI smoke run: seconds
    "tiny": dict(steps=24, batch=32, d_model=16, n_layers=1, n_heads=2, lr=3e-3, probe=48,
                 hessian=32, snapshot_every=4, basis_every=8, k=2, max_basis=4),
}


def example_parser(description: str, out: str, project: str, argv=None) -> argparse.ArgumentParser:
    """The flags this example shares with ``hf_trainer.py``: output, seed, engine, W&B, and
    the preset's sizes (``--tiny`` decides the defaults that ``--help`` shows)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a seconds-long smoke run (CI)")
    p.add_argument("--out", default=out, help="output folder (store, W&B run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="auto", choices=["auto", "forward", "reverse"])
    p.add_argument("--wandb-project", default=project)
    p.add_argument("--online", action="store_true", help="log to W&B online (default: offline)")
    p.add_argument("--no-wandb", action="store_true", help="no W&B: figures go to a folder beside the store")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store in --out")
    tiny = argparse.ArgumentParser(add_help=False)
    tiny.add_argument("--tiny", action="store_true")
    preset = PRESETS["tiny" if tiny.parse_known_args(argv)[0].tiny else "default"]
    for name, value in preset.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value,
                       help=f"(default {PRESETS['default'][name]}; --tiny: {PRESETS['tiny'][name]})")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    p = example_parser(__doc__, "runs/huggingface", "polca-huggingface", argv)
    p.add_argument("--arch", default="gpt2", choices=ARCHITECTURES, help="the transformers model class")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    """Train with the callback into ``--out`` and print what POLCA found; returns the store."""
    args = parse_args(argv)
    out = Path(args.out)
    store = out / "polca.zarr"
    if args.overwrite:
        shutil.rmtree(store, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(args.seed, verbose=False)  # also seeds the model's random initialisation
    model = HFAdditionModel(args.arch, args.d_model, args.n_layers, args.n_heads, args.lr)

    train, probe, hessian = splits(args)  # the problems of examples/arithmetic.py
    callback = addition_callback(store, probe, hessian, args)
    logger = False
    if not args.no_wandb:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(project=args.wandb_project, save_dir=str(out), offline=not args.online,
                             config=vars(args))
    # one epoch of exactly `steps` batches: the progress bar counts steps
    trainer = L.Trainer(max_steps=args.steps, max_epochs=1, devices=1, callbacks=[callback], logger=logger,
                        default_root_dir=out, log_every_n_steps=min(25, max(1, args.steps // 4)), enable_checkpointing=False,
                        enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(model, DataLoader(batches(train, args.batch), batch_size=None))
    seconds = time.perf_counter() - start
    if logger:
        logger.experiment.finish()  # an offline run is readable once finished

    print(f"\n{type(model.net).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{engine_summary(callback)}")
    print_results(write_results(store, {"fit": seconds, **callback.tracker.timings}))
    return store


def engine_summary(callback: POLCACallback) -> str:
    """Which engine the callback uses for 1 and for ``max_basis`` directions, and the costs ``auto`` measured."""
    dd = callback.tracker.dd
    theta = dd.space.flatten(dd.module)
    picks = {k: dd.choose(theta, callback.tracker.probe, k, curvature=False) for k in (1, callback.config.max_basis)}
    text = f"engine {callback.config.engine!r}: " + ", ".join(f"{e} for K={k}" for k, e in picks.items())
    if dd.calibration:
        c = dd.calibration
        text += (f" (measured on a probe batch of {len(callback.probe_batches[0]['input_ids'])} sequences: "
                 f"forward mode {c['forward_per_direction']:.3f} s per direction, reverse mode "
                 f"{c['reverse_base']:.3f} s + {c['reverse_per_direction']:.4f} s per direction)")
    return text


if __name__ == "__main__":
    os.environ.setdefault("WANDB_SILENT", "true")
    main()
