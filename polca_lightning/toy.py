"""Small models and data for the examples, tests and benchmarks.

- :func:`addition_data`: 3-digit addition as in the paper's section 4 (Chen et al.),
  ``a a a + b b b = s s s s``, 12 tokens, the 4 sum digits (most significant first) are
  the loss-bearing tokens, each labelled with its ``place`` and whether it receives a
  ``carry``.
- :class:`TinyTransformer`: a pre-LayerNorm causal transformer in plain torch (no fused
  kernels that forward-mode AD cannot go through).
- :class:`TinyCausalLM`: a ``LightningModule`` training a ``TinyTransformer`` on the mean
  loss of its loss-bearing tokens (the examples' model).
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["TinyTransformer", "TinyCausalLM", "addition_data", "ADDITION_VOCAB", "PLUS", "EQUALS"]

PLUS, EQUALS = 10, 11
ADDITION_VOCAB = 12
PLACE_NAMES = ("1000s", "100s", "10s", "1s")


def addition_data(n: int, seed: int = 0, *, symbols: bool = True) -> dict[str, Tensor]:
    """``n`` random 3-digit additions.

    Args:
        n: problems.
        seed: their random operands (the same problems for either ``symbols``).
        symbols: ``a a a + b b b = s s s s`` (12 tokens over a vocabulary of 12, ``PLUS``
            and ``EQUALS`` included); ``False``: the digits only, ``a a a b b b s s s s``
            (10 tokens over a vocabulary of 10; the fixed positions say where each number is).

    Returns:
        ``input_ids`` ``[n, L]`` (``L`` = 12, or 10 without symbols); ``labels`` ``[n, L]``
        (-100 except the 4 sum digits); ``place`` and ``carry`` ``[n, L]`` (-1 except the sum
        digits): ``place`` 0..3 for the 1000s, 100s, 10s, 1s digit; ``carry`` 1 where the
        digit receives a carry from the place below (the 1000s digit is 1 exactly when the
        100s column carries).

    Example:
        >>> data = addition_data(2, seed=0)
        >>> data["input_ids"].shape, (data["labels"] != -100).sum(1).tolist()
        (torch.Size([2, 12]), [4, 4])
        >>> addition_data(2, seed=0, symbols=False)["input_ids"].shape
        torch.Size([2, 10])
    """
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 1000, (n,), generator=gen)
    b = torch.randint(0, 1000, (n,), generator=gen)
    s = a + b

    def digits(x: Tensor, width: int) -> Tensor:  # [n, width], most significant first
        powers = 10 ** torch.arange(width - 1, -1, -1)
        return (x[:, None] // powers) % 10

    da, db, ds = digits(a, 3), digits(b, 3), digits(s, 4)
    if symbols:
        ids = torch.cat([da, torch.full((n, 1), PLUS), db, torch.full((n, 1), EQUALS), ds], dim=1)  # [n, 12]
    else:
        ids = torch.cat([da, db, ds], dim=1)  # [n, 10]
    first = ids.shape[1] - 4  # the sum's first digit
    labels = torch.full_like(ids, -100)
    labels[:, first:] = ds
    place = torch.full_like(ids, -1)
    place[:, first:] = torch.arange(4)
    # carry into column j (1s=0, 10s=1, 100s=2, 1000s=3): (a mod 10^j + b mod 10^j) >= 10^j
    carry_in = torch.stack([((a % 10**j) + (b % 10**j)) >= 10**j for j in (3, 2, 1, 0)], dim=1)  # [n, 4]
    carry = torch.full_like(ids, -1)
    carry[:, first:] = carry_in.long()
    return {"input_ids": ids, "labels": labels, "place": place, "carry": carry}


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_mlp: int):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_mlp), nn.GELU(), nn.Linear(d_mlp, d_model))

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(D, dim=-1)  # 3 x [B, L, D]
        # [B, L, D] -> [B, heads, L, D/heads]
        q, k, v = (t.view(B, L, self.n_heads, D // self.n_heads).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, heads, L, D/heads]
        x = x + self.proj(att.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """A small pre-LN causal transformer: ``input_ids [B, L] -> logits [B, L, vocab]``.

    Example:
        >>> model = TinyTransformer(vocab=12, d_model=32, n_layers=1, n_heads=2, max_len=12)
        >>> model(torch.zeros(3, 12, dtype=torch.long)).shape
        torch.Size([3, 12, 12])
    """

    def __init__(
        self,
        vocab: int = ADDITION_VOCAB,
        d_model: int = 128,
        n_layers: int = 2,
        n_heads: int = 4,
        d_mlp: int | None = None,
        max_len: int = 12,
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(_Block(d_model, n_heads, d_mlp or 4 * d_model) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=1.0 / math.sqrt(d_model))
                if isinstance(m, nn.Linear):
                    nn.init.zeros_(m.bias)

    def forward(self, input_ids: Tensor) -> Tensor:
        B, L = input_ids.shape
        # positions per sequence ([B, L], not broadcast [L]): every module output keeps the
        # batch dimension, which the activation-based reverse engine needs
        positions = torch.arange(L, device=input_ids.device).expand(B, L)
        x = self.tok(input_ids) + self.pos(positions)  # [B, L, D]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))  # [B, L, vocab]


class TinyCausalLM(L.LightningModule):
    """A :class:`TinyTransformer` trained on the mean causal-LM loss of its loss-bearing tokens.

    AdamW (``betas``, default (0.9, 0.98); the paper's runs use (0.9, 0.95)) with a linear
    warmup over ``warmup`` steps, then a constant rate (the paper's runs use a constant rate
    after warmup). Logs ``train/loss``.

    Example:
        >>> model = TinyCausalLM(vocab=12, max_len=12, d_model=32, n_layers=1, n_heads=2)
        >>> trainer = L.Trainer(max_steps=100, callbacks=[polca_callback])
    """

    def __init__(self, vocab: int = ADDITION_VOCAB, max_len: int = 12, d_model: int = 128, n_layers: int = 2,
                 n_heads: int = 4, d_mlp: int | None = None, lr: float = 1e-3, weight_decay: float = 0.1,
                 warmup: int = 100, betas: tuple[float, float] = (0.9, 0.98)):
        super().__init__()
        self.save_hyperparameters()
        self.net = TinyTransformer(vocab=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_mlp=d_mlp,
                                   max_len=max_len)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.net(input_ids)

    def training_step(self, batch, _):
        from polca_lightning.core.losses import causal_lm_token_loss

        loss, mask, _ = causal_lm_token_loss(self, batch)
        loss = loss[mask].mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        h = self.hparams
        opt = torch.optim.AdamW(self.parameters(), lr=h.lr, weight_decay=h.weight_decay, betas=tuple(h.betas))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / h.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
