"""Planted tasks with known answers, shared by ``test_planted`` and ``test_planted_hidden``.

Every example has two binary targets, one per linear logistic head, P and Q (no bias):
logits ``z_P = scale_P * head_P(x_P)`` and ``z_Q = scale_Q * head_Q(x_Q)``; a token's
loss is the sum of the two heads' logistic losses. Inputs are signed: ``±(w u + noise)``
on the target's side of the boundary, ``u`` one fixed direction, so each head learns
along ``u``. SGD with each head's learning rate divided by its scale squared trains the
heads alike in function space while the Hessian sees head P ``scale_P**2`` times larger;
the scales are what keeps each Hessian eigenvector inside one head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from polca_lightning import POLCACallback
from polca_lightning.report import analyze_store, open_analysed_store

DIM = 4  # input width of each head
U = torch.ones(DIM) / DIM**0.5  # the direction every input lies along


def signed_inputs(magnitude: Tensor, target: Tensor, noise: float, gen: torch.Generator) -> Tensor:
    """``±(magnitude u + noise N(0, I))`` ``[n, DIM]``, the sign of each row its target's side (1: +).

    Args:
        magnitude: ``[n]`` input strengths ``w``.
        target: ``[n]`` float targets in {0, 1}.
        noise: standard deviation of the isotropic noise.
        gen: the generator the noise is drawn from (one ``randn`` of ``[n, DIM]``).
    """
    n = magnitude.shape[0]
    return (2 * target - 1)[:, None] * (magnitude[:, None] * U + noise * torch.randn(n, DIM, generator=gen))


def linear_warmup(steps: int, start: int = 0) -> Callable[[int], float]:
    """Learning-rate factor 0 before step ``start``, then rising linearly to 1 over ``steps`` steps."""
    return lambda s: min(1.0, max(0.0, (s + 1 - start) / steps))


class TwoHeads(L.LightningModule):
    """Heads P and Q (``Linear(DIM, 1, bias=False)``, zero init unless ``init_p``), SGD.

    Args:
        scales: ``(scale_P, scale_Q)``, the logits' factors.
        lrs: each head's learning rate in function space (divided by its scale squared).
        schedules: each head's learning-rate factor per step (``LambdaLR``).
        init_p: head P's initial weight ``[DIM]`` (default zeros).
    """

    def __init__(self, scales: Sequence[float], lrs: Sequence[float], schedules: Sequence[Callable[[int], float]],
                 init_p: Tensor | None = None):
        super().__init__()
        self.scales, self.lrs, self.schedules = tuple(scales), tuple(lrs), list(schedules)
        self.head_p = nn.Linear(DIM, 1, bias=False)
        self.head_q = nn.Linear(DIM, 1, bias=False)
        nn.init.zeros_(self.head_p.weight)
        nn.init.zeros_(self.head_q.weight)
        if init_p is not None:
            with torch.no_grad():
                self.head_p.weight.copy_(init_p[None])

    def token_loss(self, batch):
        z_p = self.scales[0] * self.head_p(batch["x_p"])  # [B, 1]
        z_q = self.scales[1] * self.head_q(batch["x_q"])  # [B, 1]
        loss = (F.binary_cross_entropy_with_logits(z_p, batch["t_p"][:, None], reduction="none")
                + F.binary_cross_entropy_with_logits(z_q, batch["t_q"][:, None], reduction="none"))  # [B, 1]
        return loss, torch.ones_like(loss, dtype=torch.bool)

    def training_step(self, batch, _):
        return self.token_loss(batch)[0].mean()

    def configure_optimizers(self):
        opt = torch.optim.SGD([{"params": head.parameters(), "lr": lr / scale**2}
                               for head, lr, scale in zip((self.head_p, self.head_q), self.lrs, self.scales)])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.schedules)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def head_losses(weights: np.ndarray, probe: dict[str, Tensor],
                scales: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Each head's logistic loss ``[snapshot, token]`` from stored weights, in float64 numpy.

    ``weights`` is ``[snapshot, 2 DIM]``: head P's weight then head Q's (``named_parameters`` order).
    """
    w = np.asarray(weights, dtype=np.float64)
    out = []
    for part, scale, x, t in ((slice(0, DIM), scales[0], probe["x_p"], probe["t_p"]),
                              (slice(DIM, 2 * DIM), scales[1], probe["x_q"], probe["t_q"])):
        z = scale * w[:, part] @ x.double().numpy().T  # [S, T]
        signed = np.where(t.numpy() == 1, z, -z)
        out.append(np.logaddexp(0.0, -signed))  # softplus(-z) for target 1, softplus(z) for 0
    return out[0], out[1]


def fit_planted(root: Path, module: TwoHeads, probe: dict[str, Tensor], hessian: list[dict], train: list[dict],
                steps: int, *, seed: int, label: str, analysis_kwargs: dict | None = None, **callback_kwargs):
    """Train ``module`` on ``train`` (one batch a step) with ``POLCACallback`` on ``probe``,
    the probe's ``label`` as the token label; then analyse the store.

    With ``analysis_kwargs`` the callback analyses after fit (and writes its report);
    without, ``analyze_store`` runs the analysis with its defaults and no report.

    Returns:
        The analysed store, loaded (``open_analysed_store(...).load()``).
    """
    cb = POLCACallback(store=root / "polca.zarr", probe_data=[probe], hessian_data=hessian,
                       token_labels=lambda b: {label: b[label][:, None]}, lca_directions=0, ablate=False,
                       analyze=analysis_kwargs is not None, analysis_kwargs=analysis_kwargs, progress=False,
                       **callback_kwargs)
    torch.manual_seed(seed)
    trainer = L.Trainer(default_root_dir=root, max_steps=steps, callbacks=[cb], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    trainer.fit(module, DataLoader(train, batch_size=None))
    if analysis_kwargs is None:
        analyze_store(cb.store)
    return open_analysed_store(cb.store).load()
