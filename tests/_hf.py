"""A tiny GPT-2 learning 3-digit addition, trained by ``transformers.Trainer`` with
``POLCATrainerCallback`` (by tests/test_hf.py, and under torchrun by tests/_hf_torchrun.py).

Training is plain SGD at a constant learning rate without clipping, on examples in order
(``train_sampling_strategy="sequential"``), so that a Lightning run on the same batches
with the same optimizer trains the same model, and a two-process run (each process
8 of the 16 examples of a step) the same as one process.
"""

import torch
from torch.utils.data import Dataset
from transformers import AutoModelForCausalLM, GPT2Config, Trainer, TrainingArguments, default_data_collator

from polca_lightning.hf import POLCATrainerCallback
from polca_lightning.toy import ADDITION_VOCAB, addition_data

LR = 0.5
TRAIN = 256  # examples: 16 steps of 16


class Examples(Dataset):
    """Addition problems as the Trainer's examples: dicts of ``input_ids``, ``attention_mask``,
    ``labels`` (-100 but at the 4 sum digits), and with ``labels=True`` ``carry`` and ``place``."""

    def __init__(self, n: int, seed: int, labels: bool = False):
        data = addition_data(n, seed=seed)
        data["attention_mask"] = torch.ones_like(data["input_ids"])
        keys = ["input_ids", "attention_mask", "labels"] + (["carry", "place"] if labels else [])
        self.rows = [{k: data[k][i] for k in keys} for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def batches(n: int, size: int, seed: int, labels: bool = False) -> list[dict]:
    """The batches the Trainer's collator makes of ``Examples(n, seed)``, ``size`` at a time."""
    rows = Examples(n, seed, labels).rows
    return [default_data_collator(rows[i : i + size]) for i in range(0, n, size)]


def tiny_gpt2(seed: int = 0):
    """GPT-2 with one layer of width 16 over the addition vocabulary; eager attention
    (forward-mode AD does not go through the fused kernels)."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=ADDITION_VOCAB, n_positions=12, n_embd=16, n_layer=1, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None,
                        pad_token_id=None, use_cache=False)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def tiny_llama(seed: int = 0):
    """Llama with one layer of width 16 over the addition vocabulary; eager attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=ADDITION_VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None, use_cache=False)
    return LlamaForCausalLM._from_config(config, attn_implementation="eager")


def own_losses(model, rows: list[dict]) -> list[float]:
    """The loss of each labelled position of each example, from the model's own forward pass
    (labels -100 but at that position; Hugging Face shifts them), in the store's token order."""
    model = model.eval()
    out = []
    with torch.no_grad():
        for row in rows:
            for p in (row["labels"] != -100).nonzero().flatten().tolist():
                only = torch.full_like(row["labels"], -100)
                only[p] = row["labels"][p]
                out.append(model(input_ids=row["input_ids"][None], labels=only[None]).loss.item())
    return out


def carry_and_place(batch):
    return {"carry": batch["carry"], "place": batch["place"]}


def polca(store, **kw) -> POLCATrainerCallback:
    kw.setdefault("probe_data", batches(24, 8, seed=1, labels=True))  # 3 batches: rank 0 of 2 takes two
    kw.setdefault("hessian_data", batches(16, 8, seed=2))
    kw.setdefault("token_labels", carry_and_place)
    kw.setdefault("snapshot_every", 2)
    kw.setdefault("basis_every", 4)
    kw.setdefault("k", 2)
    kw.setdefault("max_basis", 4)
    kw.setdefault("engine", "forward")  # the same engine in every run compared
    kw.setdefault("analyze", False)
    kw.setdefault("progress", False)
    return POLCATrainerCallback(store, **kw)


def arguments(out, steps: int, batch: int = 16, **kw) -> TrainingArguments:
    kw.setdefault("report_to", "none")
    kw.setdefault("save_strategy", "no")
    return TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=LR,
        lr_scheduler_type="constant", max_grad_norm=0.0, train_sampling_strategy="sequential", use_cpu=True,
        disable_tqdm=True, logging_steps=4, seed=0, **kw,
    )


def train(out, steps: int, callbacks: list, *, batch: int = 16, seed: int = 0, resume=None, model=None,
          **kw) -> Trainer:
    """Train the tiny GPT-2 (initialised with ``seed``), or ``model``, on the first ``steps``
    batches of the training examples with plain SGD; returns the Trainer."""
    model = tiny_gpt2(seed) if model is None else model
    trainer = Trainer(model=model, args=arguments(out, steps, batch, **kw), train_dataset=Examples(TRAIN, seed=0),
                      data_collator=default_data_collator, callbacks=callbacks,
                      optimizers=(torch.optim.SGD(model.parameters(), lr=LR), None))
    trainer.train(resume_from_checkpoint=resume)
    return trainer
