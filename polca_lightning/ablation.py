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
most. :func:`ablation_table` sets each cluster's mean loss change beside the loss change
POLCA allocated to ``b`` over training (its projected loss at the end, Eq. 8): a cluster
whose loss fell along ``b`` should get it back when ``b`` is undone.

``POLCACallback(ablate=True)`` (the default) runs :func:`ablate_directions` after fit;
``polca ablate STORE`` prints the tables.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from polca_lightning.functional import FunctionalTokenLoss, ParameterSpace, evaluation_mode
from polca_lightning.losses import TokenLoss
from polca_lightning._store_location import resolve_store
from polca_lightning.store import open_store, write_analysis

__all__ = ["ablate_directions", "ablated_parameters", "ablated_units", "ablation_table", "ablation_summary",
           "ablation_figure"]

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
    if "basis_vectors" not in ds or ds.sizes["snapshot"] < 2:
        raise ValueError(f"store: {store} has {ds.sizes['snapshot']} snapshot(s) and "
                         f"{ds.sizes.get('basis', 0)} basis vectors; the ablation needs a basis, a first and a last")
    K, T = ds.sizes["basis"], ds.sizes["token"]
    chosen = list(range(K)) if vectors is None else [int(v) for v in vectors]
    bad = [v for v in chosen if not 0 <= v < K]
    if bad:
        raise ValueError(f"vectors: {bad} are not basis indices of a store with {K} vectors")

    device = next(module.parameters()).device
    dtype = next(module.parameters()).dtype
    weights = ds["weights"]
    theta_0 = torch.from_numpy(np.asarray(weights[0].values)).to(device, dtype)
    theta_end = torch.from_numpy(np.asarray(weights[-1].values)).to(device, dtype)
    moved = (theta_end - theta_0).double()
    basis = np.asarray(ds["basis_vectors"].values)
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
                 "first_step": int(ds["step"].values[0]), "last_step": int(ds["step"].values[-1])}
        write_analysis(store, {
            "ablation_loss_change": (("basis", "token"), change.astype(np.float32), attrs),
            "ablation_coefficient": (("basis",), coefficient, {"description": "<theta_end - theta_0, b>"}),
            "ablation_end_loss": (("token",), out["end_loss"].astype(np.float32),
                                  {"description": "loss at the last snapshot, as the ablation computes it"}),
        })
    return out


def ablated_units(ds, method: str = "polca") -> list[int]:
    """The vectors the analysis kept that have ablation results (none without them)."""
    from polca_lightning.report.pipeline import kept_units

    if "ablation_loss_change" not in ds.variables or "cluster" not in ds.variables or \
            method not in ("polca", "polca_first"):
        return []
    done = np.isfinite(np.asarray(ds["ablation_loss_change"].values)).any(axis=1)
    return [u for u in kept_units(ds, method) if done[u]]


def _check_ablated(ds) -> None:
    if "ablation_loss_change" not in ds.variables:
        raise ValueError(
            "the store holds no ablation: run POLCACallback(ablate=True) (the default) or "
            "polca_lightning.ablate_directions(store, model, token_loss, probe_batches)")
    if "cluster" not in ds.variables:
        raise ValueError("the store holds no analysis: run `polca analyze STORE` first")


def _ablation_inputs(ds, units, method):
    """Checked ``units``, the loss changes ``[K, T]``, POLCA's allocation ``[K, T]`` (Σ over
    intervals) and ``clusters(u) -> [T]`` of ``method``."""
    from polca_lightning.analysis.methods import METHODS

    _check_ablated(ds)
    if method not in ("polca", "polca_first"):
        raise ValueError(f"method: expected 'polca' or 'polca_first' (the basis-vector methods), got {method!r}")
    change = np.asarray(ds["ablation_loss_change"].values, dtype=np.float64)  # [K, T]
    ablated = np.isfinite(change).any(axis=1)
    units = ablated_units(ds, method) if units is None else [int(u) for u in units]
    for u in units:
        if not 0 <= u < change.shape[0] or not ablated[u]:
            raise ValueError(f"units: vector {u} was not ablated")
    total = np.asarray(ds[METHODS[method].variable].sum("interval", skipna=False)
                       .transpose("basis", "token").values, dtype=np.float64)
    cluster = ds[METHODS[method].prefix + "cluster"]
    return units, change, total, lambda u: np.asarray(cluster.isel(basis=u).values)


def _most_affected(change: np.ndarray, cl: np.ndarray) -> int:
    """The cluster (label >= 0) whose tokens' mean loss change is largest; -1 without clusters."""
    n_c = int(cl.max(initial=-1)) + 1
    means = [float(np.mean(change[cl == c])) if (cl == c).any() else np.nan for c in range(n_c)]
    return int(np.nanargmax(means)) if n_c and np.isfinite(means).any() else -1


def ablation_table(ds, units: Sequence[int] | None = None, method: str = "polca",
                   labels: str | Sequence[str] | None = None):
    """Each cluster's mean loss change when its vector is undone, beside what POLCA allocated.

    One row per (vector, group of tokens), where the groups of a vector are its clusters,
    its HDBSCAN outliers, the tokens the §4.1 filter dropped, and all tokens (column
    ``tokens``: ``"cluster 0"``, ..., ``"outliers"``, ``"filtered"``, ``"all"``). Columns:

    - ``loss_change``: mean ``ℓ(θ_ablated) - ℓ(θ_end)`` over the group's tokens;
    - ``polca_total``: mean projected loss at the end of training (Σ over intervals of
      the vector's POLCA): the loss change POLCA allocated to the vector;
    - ``rest``: mean loss change of the tokens outside the group;
    - ``most_affected``: the cluster with the largest mean loss change of this vector;
    - per name in ``labels``: ``<label>`` and ``<label>_share``, the group's most common
      value of that token coordinate and the fraction of the group's tokens that have it.

    Args:
        ds: an analysed store with ablation results (:func:`~polca_lightning.report.open_analysed_store`).
        units: vectors (default: the vectors the analysis kept that were ablated).
        method: ``polca`` or ``polca_first`` (whose clusters and allocation to use).
        labels: token coordinates (e.g. ``carry``) to describe each group by.

    Returns:
        A :class:`polca_lightning.report.Table`.
    """
    from polca_lightning.report.pipeline import Table, _py

    units, change_all, total, clusters = _ablation_inputs(ds, units, method)
    coefficient = np.asarray(ds["ablation_coefficient"].values)
    columns = ["vector", "coefficient", "tokens", "cluster", "size", "loss_change", "rest", "polca_total",
               "most_affected"]
    labels = [labels] if isinstance(labels, str) else list(labels or [])
    values = []
    for label in labels:
        if label not in ds.coords or ds[label].dims != ("token",):
            options = [c for c in ds.coords if ds[c].dims == ("token",)]
            raise ValueError(f"labels: expected token coordinates (of {options}), got {label!r}")
        values.append(np.asarray(ds[label].values))
        columns += [label, f"{label}_share"]
    rows = []
    for u in units:
        change, cl = change_all[u], clusters(u)
        n_c = int(cl.max(initial=-1)) + 1
        top = _most_affected(change, cl)
        groups = [(f"cluster {c}", c, cl == c) for c in range(n_c)]
        groups += [("outliers", -1, cl == -1), ("filtered", -2, cl == -2), ("all", None, np.ones_like(cl, bool))]
        for name, c, sel in groups:
            if not sel.any():
                continue
            rest = change[~sel]
            row = [u, coefficient[u], name, c, int(sel.sum()), float(change[sel].mean()),
                   float(rest.mean()) if rest.size else None, float(np.mean(total[u, sel])), top >= 0 and c == top]
            for v in values:
                kinds, counts = np.unique(v[sel], return_counts=True)
                row += [kinds[np.argmax(counts)], counts.max() / sel.sum()]
            rows.append([_py(v) for v in row])
    return Table(columns, rows)


def ablation_summary(ds, units: Sequence[int] | None = None, method: str = "polca"):
    """Per vector: does undoing it hurt its own clusters most?

    Columns: ``vector``, ``coefficient``, ``mean_loss_change`` (all tokens),
    ``clustered_loss_change`` (tokens in a cluster), ``unclustered_loss_change`` (the
    others), ``correlation`` (Pearson, over tokens, between the loss change and minus the
    POLCA allocated to the vector: positive when tokens whose loss fell along the vector
    get it back), and ``most_affected_cluster``.
    """
    from polca_lightning.report.pipeline import Table, _py

    units, change_all, total, clusters = _ablation_inputs(ds, units, method)
    rows = []
    for u in units:
        change, cl = change_all[u], clusters(u)
        top = _most_affected(change, cl)
        ok = np.isfinite(change) & np.isfinite(total[u])
        corr = np.corrcoef(change[ok], -total[u, ok])[0, 1] if ok.sum() > 2 and change[ok].std() > 0 else np.nan
        inside = cl >= 0
        rows.append([_py(v) for v in (
            u, float(ds["ablation_coefficient"].values[u]), float(change.mean()),
            float(change[inside].mean()) if inside.any() else np.nan,
            float(change[~inside].mean()) if (~inside).any() else np.nan, corr, top if top >= 0 else None)])
    return Table(["vector", "coefficient", "mean_loss_change", "clustered_loss_change", "unclustered_loss_change",
                  "correlation", "most_affected_cluster"], rows)


def ablation_figure(ds, unit: int, method: str = "polca"):
    """Bars per cluster of ``unit``: the loss change when the vector's movement is undone,
    beside the loss decrease POLCA allocated to it (minus its projected loss at the end).

    If the direction carries what POLCA says it does, the two bars of a cluster are of
    similar height: the loss the cluster lost along the vector comes back when the
    movement is undone. Outliers, filtered tokens and all tokens are the last bars.
    Bars carry the ``gid`` ``"ablation"`` and ``"allocated"``.
    """
    from polca_lightning.report.figures import new_figure

    table = ablation_table(ds, [unit], method)
    col = {c: i for i, c in enumerate(table.columns)}
    names = [row[col["tokens"]] + f"\n({row[col['size']]})" for row in table.rows]
    change = np.array([row[col["loss_change"]] for row in table.rows], dtype=float)
    allocated = -np.array([row[col["polca_total"]] for row in table.rows], dtype=float)
    fig, axes = new_figure(width=max(6.4, 0.9 * len(names) + 2))
    ax = axes[0, 0]
    x = np.arange(len(names))
    ax.bar(x - 0.2, change, 0.4, label="loss change when undone", color="tab:red", gid="ablation")
    ax.bar(x + 0.2, allocated, 0.4, label="loss decrease POLCA allocated", color="tab:blue", gid="allocated")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("mean per token")
    coefficient = float(ds["ablation_coefficient"].values[unit])
    ax.set_title(f"{method} vector {unit}: undo the movement along it ({coefficient:+.3g})", fontsize=10)
    ax.legend(fontsize=8)
    return fig
