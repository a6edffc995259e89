"""Causal check of a basis vector: undo the final model's movement along it.

POLCA is observational: it says how much of a token's loss change happened along a
direction ``b``. The check asks the model. For a basis vector ``b`` (unit norm) the run
moved the parameters by ``θ_end - θ_0``; its component along ``b`` is
``α_b = <θ_end - θ_0, b>``. The ablated model

    θ_ablated(b) = θ_end - α_b b

is the final model with that movement taken back and every other one kept. Every probe
token's loss change ``ℓ_x(θ_ablated(b)) - ℓ_x(θ_end)`` is written into the store:

- ``ablation_loss_change`` ``[basis, token]``: the loss change (NaN for vectors not ablated);
- ``ablation_coefficient`` ``[basis]``: ``α_b``;
- ``ablation_end_loss`` ``[token]``: ``ℓ_x(θ_end)``, computed the same way as the ablated losses.

If ``b`` matters most for the tokens clustered on it, those clusters' losses rise the
most. :func:`polca_lightning.analysis.ablation.ablation_table` sets each cluster's mean
loss change beside the loss change POLCA allocated to ``b`` over training (its projected
loss at the end, Eq. 8): a cluster whose loss fell along ``b`` should get it back when
``b`` is undone.

This module is the torch computation (:func:`ablate_directions`,
:func:`ablated_parameters`). The numbers read from the store are in
``polca_lightning.analysis.ablation`` (``ablated_units``, ``ablation_table``,
``ablation_summary``), the figure in ``polca_lightning.report.figures``
(``ablation_figure``); importing those names from here still works and warns
(``DeprecationWarning``).

``POLCACallback(ablate=True)`` (the default) runs :func:`ablate_directions` after fit;
``polca ablate STORE`` prints the tables.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from polca_lightning.core.functional import FunctionalTokenLoss, ParameterSpace, evaluation_mode
from polca_lightning.core.losses import TokenLoss
from polca_lightning.store.location import resolve_store
from polca_lightning.store import open_store, write_analysis
from polca_lightning.store.schema import BASIS, BASIS_VECTORS, SNAPSHOT, STEP, TOKEN, WEIGHTS

__all__ = ["ablate_directions", "ablated_parameters"]

#: the store variables written by :func:`ablate_directions`
ABLATION_VARIABLES = ("ablation_loss_change", "ablation_coefficient", "ablation_end_loss")


def ablated_parameters(theta_0: torch.Tensor, theta_end: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``θ_end - <θ_end - θ_0, b> b``: the final parameters with the movement along ``b`` undone.

    ``b`` must have unit norm (the store's basis vectors do). The inner product is taken
    in float64.
    """
    return _undo(theta_end, torch.dot((theta_end - theta_0).double(), b.double()), b)


def _undo(theta_end: torch.Tensor, alpha: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``θ_end - α b`` in float64, returned in ``θ_end``'s dtype."""
    return (theta_end.double() - alpha * b.double()).to(theta_end.dtype)


def _probe_losses(fn: FunctionalTokenLoss, theta: torch.Tensor, batches: Sequence[Any]) -> torch.Tensor:
    """Loss of every probe token at ``theta``, in store order (row-major, loss-bearing only)."""
    parts = []
    for batch in batches:
        loss, mask, _ = fn(theta, batch)
        parts.append(loss[mask].detach().double().cpu())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def ablate_directions(
    store,
    module: nn.Module,
    token_loss: TokenLoss,
    probe_batches: Sequence[Any],
    vectors: Sequence[int] | None = None,
    *,
    write: bool = True,
    progress: bool = False,
    storage_options: dict | None = None,
) -> dict[str, np.ndarray]:
    """Undo the movement along each of ``vectors`` and measure every probe token's loss change.

    Uses the store's first and last weight snapshots and its basis vectors; the model
    only supplies the architecture (its own parameter values are not used).

    Args:
        store: path of a store with ``weights`` and ``basis_vectors``.
        module: the model the store was written from (same selected parameters).
        token_loss: the token loss the store was written with.
        probe_batches: the probe batches the store was written with, on the model's device.
        vectors: basis indices to ablate (default: all).
        write: write the results into the store (``ablation_*`` variables).
        progress: a progress bar over vectors.
        storage_options: options of a URL store's filesystem (see :func:`~polca_lightning.open_store`).

    Returns:
        ``{"loss_change": [K, T] (NaN rows for vectors not ablated), "coefficient": [K],
        "end_loss": [T]}``, float64.

    Raises:
        ValueError: a store without weights or basis, parameters that are not the
            module's, bad vector indices, or probe batches with another token count.

    Example:
        >>> out = ablate_directions("runs/polca.zarr", model, causal_lm_token_loss, probe)
        >>> out["loss_change"][3].mean()  # mean loss change when vector 3 is undone
    """
    store = resolve_store(store, storage_options)
    ds = open_store(store)
    space = ParameterSpace.of_store(module, ds, "the ablation")
    if BASIS_VECTORS not in ds or ds.sizes[SNAPSHOT] < 2:
        raise ValueError(f"store: {store} has {ds.sizes[SNAPSHOT]} snapshot(s) and "
                         f"{ds.sizes.get(BASIS, 0)} basis vectors; the ablation needs a basis, a first and a last")
    K, T = ds.sizes[BASIS], ds.sizes[TOKEN]
    chosen = list(range(K)) if vectors is None else [int(v) for v in vectors]
    bad = [v for v in chosen if not 0 <= v < K]
    if bad:
        raise ValueError(f"vectors: {bad} are not basis indices of a store with {K} vectors")

    device = next(module.parameters()).device
    dtype = next(module.parameters()).dtype
    weights = ds[WEIGHTS]
    theta_0 = torch.from_numpy(np.asarray(weights[0].values)).to(device, dtype)
    theta_end = torch.from_numpy(np.asarray(weights[-1].values)).to(device, dtype)
    moved = (theta_end - theta_0).double()
    basis = np.asarray(ds[BASIS_VECTORS].values)
    fn = FunctionalTokenLoss(module, token_loss, space)
    change = np.full((K, T), np.nan)
    coefficient = np.full(K, np.nan)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(chosen) + 1, desc="POLCA ablation", leave=False, dynamic_ncols=True)
    with evaluation_mode(module), torch.no_grad():
        end_loss = _probe_losses(fn, theta_end, probe_batches)
        if end_loss.numel() != T:
            raise ValueError(f"probe_batches: {end_loss.numel()} loss-bearing tokens, the store has {T}; "
                             "pass the probe data the store was written with")
        if bar is not None:
            bar.update(1)
        for v in chosen:
            b = torch.from_numpy(basis[v]).to(device, dtype)
            alpha = torch.dot(moved, b.double())
            coefficient[v] = float(alpha)
            ablated = _probe_losses(fn, _undo(theta_end, alpha, b), probe_batches)
            change[v] = (ablated - end_loss).numpy()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    out = {"loss_change": change, "coefficient": coefficient, "end_loss": end_loss.numpy()}
    if write:
        attrs = {"description": "loss change of every probe token when the final model's movement along the "
                                "vector is undone: l(theta_end - <theta_end - theta_0, b> b) - l(theta_end)",
                 "first_step": int(ds[STEP].values[0]), "last_step": int(ds[STEP].values[-1])}
        write_analysis(store, {
            "ablation_loss_change": ((BASIS, TOKEN), change.astype(np.float32), attrs),
            "ablation_coefficient": ((BASIS,), coefficient, {"description": "<theta_end - theta_0, b>"}),
            "ablation_end_loss": ((TOKEN,), out["end_loss"].astype(np.float32),
                                  {"description": "loss at the last snapshot, as the ablation computes it"}),
        })
    return out


#: names that moved out of this module: name -> the module that has them now
_MOVED = {
    "ablated_units": "polca_lightning.analysis.ablation",
    "ablation_table": "polca_lightning.analysis.ablation",
    "ablation_summary": "polca_lightning.analysis.ablation",
    "ablation_figure": "polca_lightning.report.figures",
}


def __getattr__(name: str):
    """The moved names, from their new modules, with a ``DeprecationWarning``."""
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"polca_lightning.ablation.{name} moved to {_MOVED[name]}.{name}; import it from there",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
