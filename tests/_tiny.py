"""Tiny models and batches shared by the tests."""

import torch
from torch import nn

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
