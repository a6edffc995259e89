"""Trajectories to cluster: projected loss (Eq. 8), baselines, and the §4.1 filter.

Every function here is plain numpy: arrays in, arrays out, no xarray, no torch.
Time is always the first axis (``snapshot`` or ``interval``), tokens the last.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "projected_loss",
    "loss_change",
    "cumulative_fisher",
    "filter_trajectories",
]


def projected_loss(polca: np.ndarray) -> np.ndarray:
    """Projected loss ``L_b(x, s_j) = sum_{i<j} POLCA_i(x, b)`` (paper Eq. 8).

    Args:
        polca: ``[interval, ...]`` POLCA values (any trailing dims, e.g. ``basis, token``).

    Returns:
        ``[snapshot, ...]`` with ``snapshot = interval + 1``; row 0 is exactly 0 and row ``j``
        the sum of intervals ``0..j-1``. Accumulated in float64 (long sums of float32
        values lose digits), returned as float64. NaN propagates forward from the first
        interval where it appears.

    Example:
        >>> projected_loss(np.array([[-1.0], [-2.0]]))[:, 0]
        array([ 0., -1., -3.])
    """
    polca = np.asarray(polca)
    if polca.ndim < 1:
        raise ValueError("polca must have an interval axis first, got a scalar")
    out = np.zeros((polca.shape[0] + 1,) + polca.shape[1:], dtype=np.float64)
    np.cumsum(polca, axis=0, dtype=np.float64, out=out[1:])  # [interval, ...] -> rows 1..S
    return out


def loss_change(loss: np.ndarray) -> np.ndarray:
    """Change in exact loss ``loss(s_j) - loss(s_0)`` (App. G baseline).

    Args:
        loss: ``[snapshot, token]`` exact per-token loss.

    Returns:
        ``[snapshot, token]`` float64, row 0 all zeros.
    """
    loss = np.asarray(loss, dtype=np.float64)
    return loss - loss[:1]


def cumulative_fisher(directional_grad: np.ndarray, n_intervals: int | None = None) -> np.ndarray:
    """Projected empirical Fisher trajectory, cumulated like the projected loss.

    App. G projects the empirical Fisher ``E[∇ℓ ∇ℓᵀ]`` (Achille et al.) onto each basis
    vector: per token that is ``g_i(x, b)² = <b, ∇ℓ_x(θ_i)>²``. Its formula did not
    survive in our copy of the paper; we cumulate it over intervals exactly like Eq. 8
    cumulates POLCA values, ``F_b(x, s_j) = sum_{i<j} g_i(x, b)²``, so every method's
    trajectory is "what this direction has done to this token so far". The curve only
    rises; its onsets are therefore taken on rising bends (see ``onsets``).

    Args:
        directional_grad: ``[snapshot, ...]`` directional derivatives ``g``.
        n_intervals: how many intervals to cumulate (default ``snapshot - 1``: the
            gradient at the last snapshot starts no interval).

    Returns:
        ``[n_intervals + 1, ...]`` float64 starting at 0.
    """
    g = np.asarray(directional_grad)
    if n_intervals is None:
        n_intervals = g.shape[0] - 1
    if not 0 <= n_intervals <= g.shape[0]:
        raise ValueError(
            f"n_intervals must be in [0, {g.shape[0]}] for {g.shape[0]} snapshots, got {n_intervals}"
        )
    g = g[:n_intervals].astype(np.float64)  # [interval, ...]
    return projected_loss(g * g)


#: a token's decrease along a vector smaller than this fraction of the vector's largest is round-off
ROUNDOFF_RTOL = 1e-5


def filter_trajectories(projected: np.ndarray, rtol: float = ROUNDOFF_RTOL,
                        vectors: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The paper's §4.1 filter: which vectors, and which tokens along each, to cluster.

    Rule (exactly): with ``final = projected[-1]`` (the total POLCA over training, the
    projected loss at the last snapshot),

    - a vector is kept iff the mean of ``final`` over its tokens with finite values is
      ``< 0`` (its projected loss decreases on average; the others oscillate or hurt);
    - along a kept vector, a token is kept iff its trajectory is finite everywhere and
      its ``final < -rtol * max |final|`` (the maximum over the vector's finite tokens).
      Tokens with ``final >= 0`` (an increase, or no change at all: they do not rely on
      this direction) are dropped, as are tokens with a NaN anywhere (incomplete rows of
      a store written during training), and so are tokens whose decrease is float
      round-off: a token that does not depend on a vector at all still gets a projected
      loss of about 1e-9 along it (the vector's other components are ~1e-6, not 0), whose
      sign is chance; kept, such tokens form tight clusters of curves near 0 that follow
      the vector's own movement.

    Args:
        projected: ``[snapshot, basis, token]`` projected loss (``projected_loss``).
            A ``[snapshot, token]`` array is treated as one vector.
        rtol: the decrease below which a token counts as unchanged, relative to the
            vector's largest ``|final|`` (:data:`ROUNDOFF_RTOL`, 1e-5; 0: every ``final < 0``).
        vectors: apply the vector rule (default); ``False``: the token rule alone along
            every vector (what the vector rule hides: the decreasing tokens of a vector whose
            mean projected loss rises). ``kept`` still says which vectors the rule keeps.

    Returns:
        ``(kept [basis] bool, token_kept [basis, token] bool)``; ``token_kept`` is all
        False along vectors that are not kept. For 2-d input the basis axis is dropped:
        ``(kept scalar bool array, token_kept [token])``.

    Example:
        >>> P = projected_loss(np.array([[[-1.0, 0.5, -0.2]], [[-1.0, 0.0, 0.1]]]))
        >>> kept, tok = filter_trajectories(P)
        >>> kept.tolist(), tok.tolist()
        ([True], [[True, False, True]])
    """
    if not 0 <= rtol < 1:
        raise ValueError(f"rtol must be in [0, 1), got {rtol!r}")
    projected = np.asarray(projected)
    squeeze = projected.ndim == 2
    if squeeze:
        projected = projected[:, None, :]  # [snapshot, 1, token]
    if projected.ndim != 3:
        raise ValueError(
            f"projected must be [snapshot, basis, token] or [snapshot, token], got shape {projected.shape}"
        )
    final = projected[-1]  # [basis, token]
    finite = np.isfinite(projected).all(axis=0)  # [basis, token]
    with np.errstate(invalid="ignore"):
        n = np.isfinite(final).sum(axis=1)
        mean_final = np.where(n > 0, np.nansum(final, axis=1) / np.maximum(n, 1), np.nan)
        kept = mean_final < 0  # NaN -> False
        scale = np.nanmax(np.where(np.isfinite(final), np.abs(final), np.nan), axis=1, initial=0.0)  # [basis]
        token_kept = (kept[:, None] if vectors else True) & finite & (final < -rtol * scale[:, None])
    if squeeze:
        return kept[0], token_kept[0]
    return kept, token_kept
