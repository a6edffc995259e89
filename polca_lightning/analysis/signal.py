"""The signal check: how much a binary token label each vector's trajectories carry.

Clustering asks whether tokens *group* along a vector; the signal check asks a simpler,
supervised question first: can the label be read off the vector at all? For every basis
vector ``b`` it scores

- ``auc[b]``: the ROC AUC of the final projected loss ``L_b(x, s_end)`` (the total
  POLCA over training) for label 1 against label 0. 0.5 means no signal; 0 or 1 a
  perfect split (below 0.5: the label-1 tokens end lower, i.e. lose more along ``b``);
- ``accuracy[b]``: the cross-validated accuracy of a linear classifier on the vector's
  whole projected-loss trajectory ``L_b(x, s_0..s_end)`` (Eq. 8),

and, to compare, the same classifier on all vectors' trajectories together
(``accuracy_all``), on the exact-loss trajectories (``accuracy_loss``) and the
majority-class rate (``majority``). Information in the trajectories
(``accuracy_all`` well above ``majority``) with every ``auc`` near 0.5 lives in the
*shape* of the curves (a drop that recovers), not in where they end.

The classifier is scikit-learn's ``LogisticRegression`` (L2, ``C = 0.1``: on a few
hundred tokens ``C = 1`` fits noise in 64 features and falls below the majority rate; on
thousands the choice hardly matters) on standardised features (``StandardScaler`` in a
``Pipeline``, fitted on each training fold only), scored by stratified k-fold
cross-validation with shuffled, seeded folds (the same folds for every feature set).

Time reduction, to keep it fast on long runs: each trajectory is block-averaged over time
to at most :data:`TIME_POINTS` points, as ``reduce_trajectories(time_points=64,
n_components=None)`` does (hundreds of snapshots of one slowly moving curve hold little
more than 64 block means). For ``accuracy_all`` each vector then keeps its top
``max(8, 256 // K)`` principal components (a label-free projection over the tokens used,
fewer than its block means only when ``K > 4``), so that all ``K`` vectors together
stay near 256 features.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np

from polca_lightning.store.schema import INTERVAL, LOSS, POLCA, SNAPSHOT, STEP, TOKEN

from .clustering import reduce_trajectories, single_threaded_blas
from .pipeline import complete_snapshots
from .trajectories import projected_loss

__all__ = ["TIME_POINTS", "ALL_FEATURES", "signal_check", "signal_check_table", "interpret_signal_check"]

#: trajectories are block-averaged to at most this many time points before the classifier
TIME_POINTS = 64

#: ``accuracy_all`` keeps about this many features in all: ``max(8, 256 // K)`` per vector
ALL_FEATURES = 256

#: logistic regression's inverse L2 strength (module docstring)
REGULARIZATION_C = 0.1

#: float64 values read from the store at a time (64 MiB)
_SLAB_VALUES = 1 << 23


def _sklearn():
    try:
        from sklearn.linear_model import LogisticRegression
        from sklearn.metrics import roc_auc_score
        from sklearn.model_selection import StratifiedKFold, cross_val_score
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
    except ImportError as error:  # pragma: no cover - sklearn comes with hdbscan
        raise ImportError("signal_check needs scikit-learn: pip install scikit-learn") from error
    return LogisticRegression, roc_auc_score, StratifiedKFold, cross_val_score, make_pipeline, StandardScaler


def _token_coords(ds) -> list[str]:
    return [str(c) for c in ds.coords if ds[c].dims == (TOKEN,) and c != TOKEN]


def _label_values(ds, label, n_tokens: int) -> tuple[np.ndarray, str]:
    """``([token] float64 label, its name)``; a coordinate name or a ``[token]`` array."""
    if isinstance(label, str):
        if label not in ds.coords or ds[label].dims != (TOKEN,):
            raise ValueError(f"label: expected a token coordinate of the store (one of {_token_coords(ds)}), "
                             f"got {label!r}")
        values, name = np.asarray(ds[label].values), label
    else:
        values, name = np.asarray(label), "label array"
        if values.shape != (n_tokens,):
            raise ValueError(f"label: expected a coordinate name or a [token] array of shape ({n_tokens},), "
                             f"got shape {values.shape}")
    if values.dtype.kind not in "biuf":
        raise ValueError(f"label: expected numeric values 0/1 (negative: excluded), got dtype {values.dtype}")
    return values.astype(np.float64), name


def _where_mask(ds, where, n_tokens: int) -> tuple[np.ndarray, str]:
    """``([token] bool mask, its description)`` of ``where``."""
    if where is None:
        return np.ones(n_tokens, dtype=bool), "all tokens"
    if isinstance(where, Mapping):
        mask, parts = np.ones(n_tokens, dtype=bool), []
        for coord, allowed in where.items():
            if coord not in ds.coords or ds[coord].dims != (TOKEN,):
                raise ValueError(f"where: expected token coordinates (one of {_token_coords(ds)}), got {coord!r}")
            allowed = [allowed] if np.ndim(allowed) == 0 else list(allowed)
            mask &= np.isin(np.asarray(ds[coord].values), allowed)
            parts.append(f"{coord} in {[v.item() if isinstance(v, np.generic) else v for v in allowed]}")
        return mask, " and ".join(parts) if parts else "all tokens"
    dims = getattr(where, "dims", None)
    if dims is not None and tuple(dims) != (TOKEN,):
        raise ValueError(f"where: expected a mask along ('token',), got dims {tuple(dims)}")
    mask = np.asarray(where)
    if mask.shape != (n_tokens,):
        raise ValueError(f"where: expected a boolean mask of shape ({n_tokens},), got shape {mask.shape}")
    if mask.dtype != bool:
        raise ValueError(f"where: expected a boolean mask, got dtype {mask.dtype}")
    return mask, f"mask ({int(mask.sum())} of {n_tokens} tokens)"


def _block_edges(n_snap: int, time_points: int) -> np.ndarray:
    """Block boundaries over snapshots, the same as ``reduce_trajectories``'."""
    if n_snap > time_points:
        return np.linspace(0, n_snap, time_points + 1).round().astype(int)
    return np.arange(n_snap + 1)


def _blocked_projected_loss(var, unit_dim: str, n_int: int, tokens: np.ndarray,
                            edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block means of every vector's projected loss, read a slab of intervals at a time.

    Args:
        var: ``[interval, unit, token]`` POLCA DataArray (lazy is fine).
        unit_dim: name of its unit dimension.
        n_int: intervals to use (the complete prefix).
        tokens: ``[n]`` token indices to keep.
        edges: ``[blocks + 1]`` block boundaries over the ``n_int + 1`` snapshots.

    Returns:
        ``(blocks [unit, n, blocks], final [unit, n])`` float64: the block means of
        ``projected_loss`` (snapshot 0 counts as the value 0) and its last value.
    """
    var = var.transpose(INTERVAL, unit_dim, TOKEN)
    K, n, nb = var.sizes[unit_dim], tokens.size, edges.size - 1
    block_of = np.repeat(np.arange(nb), np.diff(edges))  # [snapshot] -> block
    sums = np.zeros((nb, K, n))  # snapshot 0 adds 0 to block 0
    running = np.zeros((K, n))  # projected loss at the last snapshot read
    slab = max(1, _SLAB_VALUES // max(1, K * var.sizes[TOKEN]))
    for start in range(0, n_int, slab):
        stop = min(start + slab, n_int)
        p = np.asarray(var.isel(interval=slice(start, stop)).values)[:, :, tokens]  # [slab, K, n]
        cum = projected_loss(p)[1:] + running  # [slab, K, n]: snapshots start+1 .. stop
        running = cum[-1]
        blk = block_of[start + 1 : stop + 1]
        first = np.flatnonzero(np.r_[True, blk[1:] != blk[:-1]])  # where each block starts in the slab
        sums[blk[first]] += np.add.reduceat(cum, first, axis=0)  # [blocks in slab, K, n]
    means = sums / np.diff(edges)[:, None, None]  # [blocks, K, n]
    return means.transpose(1, 2, 0), running


def _all_features(blocks: np.ndarray) -> np.ndarray:
    """``[n, features]`` for ``accuracy_all`` from ``blocks [K, n, time]``: every vector's
    block means, or its top ``max(8, ALL_FEATURES // K)`` principal components when fewer."""
    K, n, nb = blocks.shape
    keep = max(8, ALL_FEATURES // K)
    if keep >= nb:
        return blocks.transpose(1, 0, 2).reshape(n, K * nb)  # [n, K * nb]
    return np.concatenate([reduce_trajectories(blocks[b], time_points=None, n_components=keep)
                           for b in range(K)], axis=1)  # [n, K * keep]


def signal_check(ds, label: str | Any, *, where=None, folds: int = 5, seed: int = 0, method: str = POLCA):
    """How well each vector's projected-loss trajectory predicts a binary token label.

    Uses the complete snapshot prefix of the store (``complete_snapshots``). Tokens whose
    label is negative or NaN (e.g. ``-1``, "not applicable") are left out, as are tokens
    outside ``where`` and tokens with a non-finite value anywhere in their trajectories
    (any vector or the exact loss). Trajectories are block-averaged to at most
    :data:`TIME_POINTS` time points before the classifier (module docstring).

    Args:
        ds: a store Dataset (``polca_lightning.open_store(path)``) with ``step``,
            ``loss[snapshot, token]`` and ``ds[method]``.
        label: name of a token coordinate with values 0/1 (negatives excluded), or a
            ``[token]`` array of them.
        where: which tokens to use: ``None`` (all), a boolean ``[token]`` mask (numpy,
            or an xarray DataArray such as ``ds.place.isin([1, 2])``), or a mapping
            ``{coordinate: allowed values}`` (all conditions must hold).
        folds: number of stratified cross-validation folds (>= 2); each class needs at
            least this many tokens.
        seed: seed of the fold shuffle (the result is deterministic given it).
        method: the ``[interval, U, token]`` POLCA variable, ``"polca"`` or
            ``"polca_first"`` (or another variable of that shape, e.g. ``"lca_polca"``).

    Returns:
        ``xarray.Dataset`` with ``auc[U]`` and ``accuracy[U]`` (``U`` = the method's unit
        dimension, ``basis`` for polca), scalars ``accuracy_all`` (all vectors'
        trajectories side by side), ``accuracy_loss`` and ``auc_loss`` (exact loss:
        trajectory ``loss[:n_snap]`` and final change ``loss[end] - loss[0]``),
        ``majority`` (majority-class rate of the tokens used), ``n_tokens``,
        ``n_positive``; attrs ``label``, ``where`` (text), ``folds``, ``seed``,
        ``method``, ``n_snapshots``, ``time_points`` (block means per trajectory),
        ``n_dropped_nonfinite``,
        ``n_excluded_label`` (tokens in ``where`` with a negative or NaN label).

    Raises:
        ValueError: a missing variable, an unknown ``method`` or ``label`` coordinate,
            a label with values other than 0/1 (besides negatives), fewer than ``folds``
            tokens of a class, a ``where`` mask of the wrong shape or dtype, ``folds``
            < 2, or fewer than 2 complete snapshots.
        ImportError: scikit-learn is not installed.

    Example:
        >>> from polca_lightning.analysis import make_synthetic_store, signal_check
        >>> ds = make_synthetic_store(n_sequences=100, n_intervals=60, n_basis=4)
        >>> res = signal_check(ds, "carry", where=ds.place.isin([1, 2]))
        >>> float(res["accuracy"].sel(basis=0)) > 0.95  # vector 0 plants the carries
        True
    """
    import xarray as xr

    LogisticRegression, roc_auc_score, StratifiedKFold, cross_val_score, make_pipeline, StandardScaler = _sklearn()
    missing = [v for v in (STEP, LOSS, method) if v not in ds.variables]
    if missing:
        raise ValueError(f"ds: the store lacks variable(s) {missing}; signal_check needs step, loss "
                         f"and the method's [interval, basis, token] variable")
    var = ds[method]
    if var.ndim != 3 or INTERVAL not in var.dims or TOKEN not in var.dims:
        raise ValueError(f"method: expected an [interval, basis, token] variable such as 'polca' or "
                         f"'polca_first', got {method!r} with dims {var.dims}")
    if isinstance(folds, bool) or not isinstance(folds, (int, np.integer)) or folds < 2:
        raise ValueError(f"folds: expected an int >= 2, got {folds!r}")
    folds = int(folds)
    unit_dim = next(d for d in var.dims if d not in (INTERVAL, TOKEN))
    n_tokens = int(ds.sizes[TOKEN])
    y_all, label_name = _label_values(ds, label, n_tokens)
    mask, where_text = _where_mask(ds, where, n_tokens)
    with np.errstate(invalid="ignore"):
        has_label = np.isfinite(y_all) & (y_all >= 0)  # [token]
    other = np.setdiff1d(np.unique(y_all[mask & has_label]), [0.0, 1.0])
    if other.size:
        raise ValueError(f"label {label_name!r}: expected binary values 0/1 (negative: excluded), "
                         f"also found {other[:10].tolist()}")
    n_snap = complete_snapshots(ds)
    if n_snap < 2:
        raise ValueError(f"ds: signal_check needs at least 2 complete snapshots, the store has {n_snap}")
    tokens = np.flatnonzero(mask & has_label)  # [n] before the finite check

    edges = _block_edges(n_snap, TIME_POINTS)
    blocks, final = _blocked_projected_loss(var, unit_dim, n_snap - 1, tokens, edges)  # [K, n, nb], [K, n]
    loss = np.asarray(ds[LOSS].transpose(SNAPSHOT, TOKEN).values[:n_snap], dtype=np.float64)[:, tokens]
    loss_x = reduce_trajectories(loss.T, time_points=TIME_POINTS, n_components=None)  # [n, nb]
    finite = np.isfinite(blocks).all(axis=(0, 2)) & np.isfinite(loss_x).all(axis=1)  # [n]
    n_dropped = int((~finite).sum())
    tokens, blocks, final, loss, loss_x = tokens[finite], blocks[:, finite], final[:, finite], loss[:, finite], \
        loss_x[finite]
    y = y_all[tokens].astype(np.int64)  # [n]
    n_pos, n = int(y.sum()), int(y.size)
    if min(n_pos, n - n_pos) < folds:
        raise ValueError(f"label {label_name!r} (where {where_text}): {folds} folds need at least {folds} tokens "
                         f"of each class, got {n - n_pos} with 0 and {n_pos} with 1")

    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(np.zeros(n), y))

    def accuracy(x: np.ndarray) -> float:  # x: [n, features]
        model = make_pipeline(StandardScaler(), LogisticRegression(C=REGULARIZATION_C, max_iter=2000))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # lbfgs convergence notes on separable folds
            return float(cross_val_score(model, x, y, cv=splits, scoring="accuracy").mean())

    K = blocks.shape[0]
    with single_threaded_blas():
        auc = np.array([roc_auc_score(y, final[b]) for b in range(K)])  # [K]
        acc = np.array([accuracy(blocks[b]) for b in range(K)])  # [K]
        acc_all = accuracy(_all_features(blocks)) if K else math.nan
        acc_loss = accuracy(loss_x)
        auc_loss = float(roc_auc_score(y, loss[-1] - loss[0]))
    attrs = {
        "label": label_name, "where": where_text, "folds": folds, "seed": int(seed), "method": method,
        "n_snapshots": n_snap, "time_points": int(edges.size - 1), "n_dropped_nonfinite": n_dropped,
        "n_excluded_label": int((mask & ~has_label).sum()),
        "classifier": f"StandardScaler + LogisticRegression(C={REGULARIZATION_C}), stratified k-fold accuracy",
    }
    return xr.Dataset(
        {"auc": ((unit_dim,), auc), "accuracy": ((unit_dim,), acc), "accuracy_all": acc_all,
         "accuracy_loss": acc_loss, "auc_loss": auc_loss, "majority": max(n_pos, n - n_pos) / n,
         "n_tokens": n, "n_positive": n_pos},
        coords={unit_dim: np.arange(K)}, attrs=attrs,
    )


def _unit_dim(result) -> str:
    return result["auc"].dims[0]


def signal_check_table(result):
    """The result of :func:`signal_check` as a table: one row per vector, then the rows
    ``"all vectors"``, ``"exact loss"`` and ``"majority"``.

    Args:
        result: what :func:`signal_check` returned.

    Returns:
        ``pandas.DataFrame`` with columns ``basis`` (the vector index, or the row's
        name), ``auc`` and ``accuracy`` (NaN where a row has none: ``all vectors`` and
        ``majority`` have no AUC; ``majority``'s accuracy is the majority rate).

    Example:
        >>> table = signal_check_table(signal_check(ds, "carry"))
        >>> list(table.columns), table["basis"].iloc[-1]
        (['basis', 'auc', 'accuracy'], 'majority')
    """
    import pandas as pd

    units = [int(u) for u in np.asarray(result[_unit_dim(result)].values)]
    rows = [[u, float(a), float(c)] for u, a, c in zip(units, result["auc"].values, result["accuracy"].values)]
    rows += [["all vectors", math.nan, float(result["accuracy_all"])],
             ["exact loss", float(result["auc_loss"]), float(result["accuracy_loss"])],
             ["majority", math.nan, float(result["majority"])]]
    return pd.DataFrame(rows, columns=["basis", "auc", "accuracy"])


def _names(units: Sequence[int]) -> str:
    words = [str(u) for u in units]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def interpret_signal_check(result, *, top: int = 3) -> str:
    """One paragraph saying what a :func:`signal_check` result means.

    An accuracy counts as above the majority rate ``m`` when it exceeds it by more than
    ``max(0.05, 2 sqrt(m (1 - m) / n))`` (twice the standard error of an accuracy over
    ``n`` tokens); an AUC is near 0.5 within 0.1 and strong beyond 0.25 from it.

    Args:
        result: what :func:`signal_check` returned.
        top: at most this many informative vectors are named.

    Returns:
        The paragraph (a single line of text).

    Example:
        >>> print(interpret_signal_check(signal_check(ds, "carry", where={"place": [1, 2]})))
        Label 'carry' (where place in [1, 2]; 200 tokens, 97 with 1; majority rate 0.515): ...
    """
    a = result.attrs
    n, m = int(result["n_tokens"]), float(result["majority"])
    margin = max(0.05, 2 * math.sqrt(m * (1 - m) / n))
    auc, acc = np.asarray(result["auc"].values), np.asarray(result["accuracy"].values)
    units = np.asarray(result[_unit_dim(result)].values)
    acc_all, acc_loss = float(result["accuracy_all"]), float(result["accuracy_loss"])
    above = lambda x: x > m + margin  # noqa: E731
    text = [f"Label {a['label']!r} (where {a['where']}; {n} tokens, {int(result['n_positive'])} with 1; "
            f"majority rate {m:.3f}):"]
    order = [i for i in np.argsort(-acc, kind="stable") if above(acc[i])][:top]
    if order:
        text.append(f"vector{'s' if len(order) > 1 else ''} {_names([int(units[i]) for i in order])} carr"
                    f"{'y' if len(order) > 1 else 'ies'} the most information (accuracy "
                    + ", ".join(f"{acc[i]:.3f}" for i in order) + ");")
    else:
        text.append("no single vector's trajectory predicts the label better than the majority rate;")
    text.append(f"all vectors together reach {acc_all:.3f} and the exact loss {acc_loss:.3f}.")
    far = np.abs(auc - 0.5)
    if above(acc_all) and (far.size == 0 or far.max() < 0.1):
        text.append("The information is in the trajectories (all vectors well above the majority rate) but not "
                    "in any single vector's final value (every AUC near 0.5): it lies in the curves' shape.")
    elif far.size and far.max() > 0.25:
        b = int(np.argmax(far))
        side = "lower" if auc[b] < 0.5 else "higher"
        text.append(f"Vector {int(units[b])}'s final projected loss alone separates the label (AUC {auc[b]:.3f}: "
                    f"label-1 tokens end {side}).")
    if above(acc_loss) and not order:
        text.append("The exact loss carries the label, but no basis vector does on its own.")
    elif order and not above(acc_loss):
        text.append("The exact loss does not carry it: the vectors show what the loss hides.")
    return " ".join(text)
