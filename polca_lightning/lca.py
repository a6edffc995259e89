"""The LCA baseline: the same allocation along axis-aligned directions.

Loss Change Allocation (Lan et al.) allocates the loss change to single parameters.
Appendix G of the paper compares POLCA with per-token LCA trajectories "projected onto
the parameters that have the top highest magnitudes at the end of training". This
module computes them after training from the stored weight snapshots, through the same
engine and the same order as the store's ``polca``, and writes them into the store:

- ``lca_polca`` ``[interval, lca_basis, token]``: the allocation to each chosen parameter;
- ``lca_parameter`` ``[lca_basis]``: its index on the store's ``param`` axis;
- ``lca_delta`` ``[interval, lca_basis]``: its movement.

:func:`polca_lightning.analysis.analyze` clusters ``lca_polca`` like ``polca``.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from polca_lightning.core.engine import DirectionalDerivatives
from polca_lightning.core.functional import ParameterSpace, evaluation_mode
from polca_lightning.core.losses import TokenLoss
from polca_lightning.core.polca import polca_interval
from polca_lightning.store.location import resolve_store
from polca_lightning.store import open_store, write_analysis
from polca_lightning.store.schema import INTERVAL, SNAPSHOT, TOKEN, WEIGHTS

__all__ = ["lca_baseline"]


def lca_baseline(
    store,
    module: nn.Module,
    token_loss: TokenLoss,
    probe_batches: Sequence[Any],
    n_directions: int,
    *,
    engine: str = "auto",
    progress: bool = False,
    storage_options: dict | None = None,
) -> np.ndarray:
    """Compute LCA along the ``n_directions`` largest-magnitude parameters and write it.

    Args:
        store: path of a complete store with ``weights``.
        module: the trained model (its selected parameters are those of the store).
        token_loss: the token loss the store was written with.
        probe_batches: the probe batches the store was written with, on the model's device.
        n_directions: how many parameters (largest ``|θ|`` at the last snapshot).
        engine: the engine to use (``auto`` picks by the cost model).
        progress: show a progress bar over snapshots.
        storage_options: options of a URL store's filesystem (see :func:`~polca_lightning.open_store`).

    Returns:
        The chosen parameter indices ``[n_directions]``.

    Raises:
        ValueError: a store without weights, or one whose parameters are not the module's.
    """
    store = resolve_store(store, storage_options)
    ds = open_store(store)
    space = ParameterSpace.of_store(module, ds, "the LCA baseline")
    order = ds.attrs["order"]
    order = order if order in ("first", "trapezoid") else "trapezoid"  # no eigenvalue or curvature here
    n = int(min(n_directions, space.dim))
    device = next(module.parameters()).device
    last = torch.from_numpy(np.asarray(ds[WEIGHTS][-1].values))
    chosen = torch.topk(last.abs(), n).indices.sort().values  # [n] indices on the param axis
    directions = torch.zeros(n, space.dim, dtype=last.dtype)
    directions[torch.arange(n), chosen] = 1.0  # axis-aligned, [n, d]
    directions = directions.to(device)
    index = chosen.to(device)
    dd = DirectionalDerivatives(module, token_loss, space, engine=engine)
    S = ds.sizes[SNAPSHOT]
    values = np.full((S - 1, n, ds.sizes[TOKEN]), np.nan, dtype=np.float32)
    deltas = np.full((S - 1, n), np.nan, dtype=np.float32)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=S, desc="LCA baseline", leave=False, dynamic_ncols=True)
    previous = None
    with evaluation_mode(module):
        for i in range(S):
            theta = torch.from_numpy(np.asarray(ds[WEIGHTS][i].values)).to(device)
            g = dd(theta, probe_batches, directions).g  # [n, T]
            if previous is not None:
                delta = theta[index] - previous[0][index]  # [n]
                out = polca_interval(order, previous[1], delta, g_end=g)
                values[i - 1] = out.values.cpu().numpy()
                deltas[i - 1] = delta.cpu().numpy()
            previous = (theta, g)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    attrs = {"order": order, "description": f"LCA along the {n} parameters largest in magnitude at the last snapshot"}
    write_analysis(store, {
        "lca_polca": ((INTERVAL, "lca_basis", TOKEN), values, attrs),
        "lca_delta": ((INTERVAL, "lca_basis"), deltas, {}),
        "lca_parameter": (("lca_basis",), chosen.numpy().astype(np.int64), {}),
    })
    return chosen.numpy()
