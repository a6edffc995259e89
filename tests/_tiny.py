"""Tiny models and batches shared by the tests."""

import lightning as L
import torch
from torch import nn

from polca_lightning.core.losses import causal_lm_token_loss

from polca_lightning.toy import TinyTransformer, addition_data


def tiny_lm(seed: int = 0, d_model: int = 8, dtype=torch.float64) -> TinyTransformer:
    torch.manual_seed(seed)
    return TinyTransformer(d_model=d_model, n_layers=1, n_heads=2).to(dtype)


def addition_batch(n: int, seed: int = 0) -> dict:
    data = addition_data(n, seed=seed)
    return {"input_ids": data["input_ids"], "labels": data["labels"]}


class TinyMLP(nn.Module):
    """A classifier with non-square layers, so a transposed result cannot pass."""

    def __init__(self, n_in: int = 3, hidden: int = 5, n_out: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, n_out))

    def forward(self, x):
        return self.net(x)


class AdditionModule(L.LightningModule):
    """A LightningModule on 3-digit addition: TinyTransformer(d=8, 1 layer, 2 heads), AdamW."""

    def __init__(self, seed=0, lr=1e-2, net=None):
        super().__init__()
        self.net = net if net is not None else tiny_lm(seed=seed, d_model=8, dtype=torch.float32)
        self.lr = lr

    def forward(self, input_ids):
        return self.net(input_ids)

    def training_step(self, batch, _):
        loss, mask, _ = causal_lm_token_loss(self, batch)
        return loss[mask].mean()

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def batches(n, size, seed, labels=False):
    """Addition batches as dicts; with the `carry` and `place` labels when asked."""
    data = addition_data(n, seed=seed)
    keys = ["input_ids", "labels"] + (["carry", "place"] if labels else [])
    return [{k: data[k][i : i + size] for k in keys} for i in range(0, n, size)]
