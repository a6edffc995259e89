"""The trajectory types compared in App. G, as uniform "methods".

Each method turns a store-shaped Dataset into one ``[snapshot, token]`` trajectory per
*unit* (a basis vector, an LCA direction, or one single unit for the exact loss):

============  =====================  ===========  ===========================  =========
method        store variable         unit dim     trajectory                   filter
============  =====================  ===========  ===========================  =========
polca         polca                  basis        projected loss (Eq. 8)       own §4.1
polca_first   polca_first            basis        projected first-order POLCA  own §4.1
lca           lca_polca              lca_basis    projected LCA                own §4.1
fisher        directional_grad       basis        cumulated g² (App. G)        POLCA's
loss          loss                   (none)       exact loss                   none
loss_change   loss                   (none)       loss - loss at snapshot 0    none
============  =====================  ===========  ===========================  =========

"filter" is the §4.1 vector/token filter: POLCA-like trajectories are filtered on their
own final value; the Fisher trajectory only rises, so it reuses POLCA's masks for the
same basis vector (same directions, same tokens); exact-loss trajectories cluster every
token with a finite trajectory, as the paper's loss baselines do. Onsets are taken on
falling bends except for Fisher (rising).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from polca_lightning.store.schema import BASIS, DIRECTIONAL_GRAD, INTERVAL, LOSS, POLCA, POLCA_FIRST, SNAPSHOT, TOKEN

from .trajectories import cumulative_fisher, loss_change, projected_loss

__all__ = ["MethodSpec", "METHODS", "available_methods"]


@dataclass(frozen=True)
class MethodSpec:
    """How to build one method's trajectories from a store Dataset."""

    name: str
    variable: str
    unit_dim: str | None
    kind: str  # "projected", "fisher", "loss", "loss_change"
    filter: str  # "own", "polca", "none"
    direction: str  # onset direction: "falling" or "rising"

    @property
    def prefix(self) -> str:
        """Result variable prefix: none for POLCA itself, ``"<name>_"`` for baselines."""
        return "" if self.name == "polca" else f"{self.name}_"

    def n_units(self, ds) -> int:
        return 1 if self.unit_dim is None else int(ds.sizes[self.unit_dim])

    def trajectory(self, ds, unit: int, n_snapshots: int) -> np.ndarray:
        """``[snapshot, token]`` float64 trajectory of ``unit`` over the first snapshots."""
        n_int = n_snapshots - 1
        if self.kind == "projected":
            v = ds[self.variable].isel({self.unit_dim: unit, INTERVAL: slice(0, n_int)})
            return projected_loss(np.asarray(v.transpose(INTERVAL, TOKEN).values))
        if self.kind == "fisher":
            v = ds[self.variable].isel({self.unit_dim: unit, SNAPSHOT: slice(0, n_snapshots)})
            return cumulative_fisher(np.asarray(v.transpose(SNAPSHOT, TOKEN).values), n_int)
        loss = np.asarray(
            ds[LOSS].isel(snapshot=slice(0, n_snapshots)).transpose(SNAPSHOT, TOKEN).values,
            dtype=np.float64,
        )
        return loss if self.kind == "loss" else loss_change(loss)


METHODS = {
    "polca": MethodSpec("polca", POLCA, BASIS, "projected", "own", "falling"),
    "polca_first": MethodSpec("polca_first", POLCA_FIRST, BASIS, "projected", "own", "falling"),
    "lca": MethodSpec("lca", "lca_polca", "lca_basis", "projected", "own", "falling"),
    "fisher": MethodSpec("fisher", DIRECTIONAL_GRAD, BASIS, "fisher", "polca", "rising"),
    "loss": MethodSpec("loss", LOSS, None, "loss", "none", "falling"),
    "loss_change": MethodSpec("loss_change", LOSS, None, "loss_change", "none", "falling"),
}


def available_methods(ds) -> list[str]:
    """Methods whose store variables are present (``lca`` only with ``lca_polca``;
    ``fisher`` needs ``polca`` too, for its filter)."""
    out = []
    for name, spec in METHODS.items():
        if spec.variable not in ds.variables:
            continue
        if spec.filter == "polca" and POLCA not in ds.variables:
            continue
        out.append(name)
    return out
