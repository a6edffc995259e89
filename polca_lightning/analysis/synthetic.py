"""A synthetic store-shaped Dataset with planted breakthroughs, for tests and benchmarks.

It mimics the arithmetic setting of the paper: sequences of 4 answer tokens with labels
``place`` (0 = 1000s, 1 = 100s, 2 = 10s, 3 = 1s, the order of the answer) and ``carry``
(1 if the digit receives a carry; never for the 1s place; for the 1000s place carry is
what makes the digit a 1). What is planted:

- exact loss: fast early drops whose timing depends on ``place`` (done by ~25 % of
  training, so the mean loss plateaus there), plus a small late drop for carry tokens
  at a random time per token (so the exact loss does not single carries out);
- vector 0: carry tokens in the 10s/100s places drop at 55 % of training (a *hidden*
  breakthrough: after the plateau), everything else drifts with noise;
- vector 1: 1000s-place tokens drop at 35 %;
- vector 2: oscillates with a net increase (must be filtered out);
- vectors >= 3: each plants two random groups of tokens (25 % each) dropping at two
  different random times, the rest are scattered "noise" tokens with drops at random
  times and random, mostly small, amplitudes.

POLCA values are the interval differences of these curves plus iid noise, so projected
losses are random walks around the planted shapes. ``polca_first`` is POLCA plus extra
noise; ``directional_grad`` is ``polca_first / delta`` (so ``g δ`` is first order);
``lca_polca`` (optional) plants the vector-0 carry signal weakly, mixed with place.
"""

from __future__ import annotations

import numpy as np

from polca_lightning.store.schema import (
    BASIS, BASIS_STEP, DELTA, DIRECTIONAL_GRAD, EIGENVALUE, INTERVAL, LOSS, POLCA, POLCA_FIRST, POSITION, SEQUENCE,
    SNAPSHOT, STEP, TARGET, TOKEN,
)

__all__ = ["make_synthetic_store", "planted_groups"]


def _drop(step: np.ndarray, onset: np.ndarray, width: np.ndarray) -> np.ndarray:
    """``[snapshot, token]`` sigmoid rising 0 -> 1, with onset (start) at ``onset``.

    The sigmoid centre is ``onset + 1.317 * width`` so that the most negative second
    difference of ``-sigmoid`` (our Eq. 9 onset) is at ``onset``.
    """
    z = (step[:, None] - (onset[None, :] + 1.317 * width[None, :])) / width[None, :]
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def planted_groups(ds) -> dict:
    """The planted truth of a ``make_synthetic_store`` Dataset (stored in its attrs)."""
    import json

    return json.loads(ds.attrs["planted"])


def make_synthetic_store(
    n_sequences: int = 100,
    n_intervals: int = 100,
    n_basis: int = 6,
    *,
    interval_steps: int = 20,
    noise: float = 0.002,
    lca: bool = True,
    n_lca: int | None = None,
    seed: int = 0,
    dtype=np.float32,
):
    """Build a store-shaped ``xarray.Dataset`` with planted breakthroughs.

    Args:
        n_sequences: sequences of 4 answer tokens each (tokens = 4 * n_sequences).
        n_intervals: POLCA intervals (snapshots = n_intervals + 1).
        n_basis: basis vectors (>= 3 to have the special vectors 0-2).
        interval_steps: optimizer steps between snapshots.
        noise: standard deviation of the iid noise added to every POLCA value.
        lca: add ``lca_polca[interval, lca_basis, token]``.
        n_lca: LCA directions (default ``n_basis``).
        seed: random seed.
        dtype: float dtype of the big arrays.

    Returns:
        ``xarray.Dataset`` following the store contract, with ``attrs["planted"]`` a JSON
        description of the planted groups (token index lists and onset steps per vector).
    """
    import json

    import xarray as xr

    if n_basis < 3:
        raise ValueError(f"n_basis must be >= 3, got {n_basis}")
    rng = np.random.default_rng(seed)
    T = 4 * n_sequences
    S = n_intervals
    step = np.arange(S + 1, dtype=np.int64) * interval_steps  # [snapshot]
    span = float(step[-1])
    sf = step.astype(np.float64)
    place = np.tile(np.arange(4), n_sequences)  # [token]
    carry = np.where(place == 3, 0, rng.integers(0, 2, T))  # no carry into the 1s place
    sequence = np.repeat(np.arange(n_sequences), 4)
    position = np.tile(np.arange(4), n_sequences) + 8  # answer follows "abc+def="
    digit = np.where(place == 0, carry, rng.integers(0, 10, T))
    target = digit + 3  # token ids of digits in a made-up vocabulary

    # exact loss [snapshot, token]: early place-dependent drops + late small carry drop
    early_on = (0.03 + 0.04 * place) * span + rng.normal(0, 0.005 * span, T)
    w_early = np.full(T, 0.02 * span)
    loss = 2.3 - 2.0 * _drop(sf, early_on, w_early)
    late_on = rng.uniform(0.3, 0.8, T) * span  # carries help late, but not in step
    loss -= 0.03 * carry * _drop(sf, late_on, np.full(T, 0.05 * span))
    loss += rng.normal(0, 0.01, loss.shape)

    planted = {"tau_approx": 0.25 * span, "vectors": {}}
    curves = np.empty((n_basis, S + 1, T))  # planted projected loss [basis, snapshot, token]
    for b in range(n_basis):
        base = rng.normal(0, 0.02, T)[None, :] * sf[:, None] / span  # slow drift
        if b == 0:
            grp = (carry == 1) & ((place == 1) | (place == 2))
            on = 0.55 * span
            c = base - 0.5 * grp * _drop(sf, np.full(T, on), np.full(T, 0.02 * span))
            planted["vectors"]["0"] = {"groups": [np.flatnonzero(grp).tolist()], "onsets": [on]}
        elif b == 1:
            grp = place == 0
            on = 0.35 * span
            c = base - 0.4 * grp * _drop(sf, np.full(T, on), np.full(T, 0.02 * span))
            planted["vectors"]["1"] = {"groups": [np.flatnonzero(grp).tolist()], "onsets": [on]}
        elif b == 2:
            c = 0.05 * np.sin(sf / span * 40)[:, None] + 0.05 * sf[:, None] / span + base
            c = np.broadcast_to(c, (S + 1, T))
            planted["vectors"]["2"] = {"groups": [], "onsets": []}
        else:
            perm = rng.permutation(T)
            g1, g2, rest = perm[: T // 4], perm[T // 4 : T // 2], perm[T // 2 :]
            on1, on2 = np.sort(rng.uniform(0.1, 0.8, 2) * span)
            if on2 - on1 < 0.15 * span:
                on2 = min(on1 + 0.15 * span, 0.9 * span)
            onset = np.empty(T)
            amp = np.empty(T)
            width = np.full(T, 0.02 * span)
            onset[g1], onset[g2] = on1, on2
            amp[g1] = amp[g2] = 0.5
            onset[rest] = rng.uniform(0.0, 0.9, rest.size) * span
            amp[rest] = rng.uniform(-0.1, 0.6, rest.size)  # some rise, most fall a little
            width[rest] = rng.uniform(0.01, 0.1, rest.size) * span
            c = base - amp[None, :] * _drop(sf, onset, width)
            planted["vectors"][str(b)] = {
                "groups": [np.sort(g1).tolist(), np.sort(g2).tolist()],
                "onsets": [float(on1), float(on2)],
            }
        curves[b] = c
    c0 = curves[:, :1, :]
    curves -= c0  # projected losses start at 0

    # POLCA [interval, basis, token]
    polca = np.diff(curves, axis=1).transpose(1, 0, 2)
    polca += rng.normal(0, noise, polca.shape)
    polca_first = polca + rng.normal(0, 2 * noise, polca.shape)
    delta = rng.uniform(0.5, 1.5, (S, n_basis)) * 1e-2  # [interval, basis]
    g = polca_first / delta[:, :, None]  # [interval, basis, token]
    directional_grad = np.concatenate([g, g[-1:]], axis=0)  # [snapshot, basis, token]

    data_vars = {
        STEP: ((SNAPSHOT,), step),
        LOSS: ((SNAPSHOT, TOKEN), loss.astype(dtype)),
        DIRECTIONAL_GRAD: ((SNAPSHOT, BASIS, TOKEN), directional_grad.astype(dtype)),
        DELTA: ((INTERVAL, BASIS), delta.astype(dtype)),
        POLCA: ((INTERVAL, BASIS, TOKEN), polca.astype(dtype)),
        POLCA_FIRST: ((INTERVAL, BASIS, TOKEN), polca_first.astype(dtype)),
        EIGENVALUE: ((BASIS,), np.sort(rng.uniform(1, 50, n_basis))[::-1].copy()),
        BASIS_STEP: ((BASIS,), (np.arange(n_basis) * 10 * interval_steps).astype(np.int64)),
    }
    del g, directional_grad, polca_first
    if lca:
        n_lca = n_basis if n_lca is None else n_lca
        mix = rng.normal(0, 1, (n_lca, n_basis)) / np.sqrt(n_basis)  # directions mix the planted ones
        mix[0, 0] += 0.6
        lca_curves = np.einsum("lb,bst->slt", mix, curves)  # [snapshot, lca_basis, token]
        lca_curves += 0.3 * np.einsum("l,st->slt", np.abs(rng.normal(0, 1, n_lca)), loss - loss[:1])
        lca_polca = np.diff(lca_curves, axis=0) + rng.normal(0, noise, (S, n_lca, T))
        data_vars["lca_polca"] = ((INTERVAL, "lca_basis", TOKEN), lca_polca.astype(dtype))
    coords = {
        SNAPSHOT: np.arange(S + 1),
        INTERVAL: np.arange(S),
        BASIS: np.arange(n_basis),
        TOKEN: np.arange(T),
        SEQUENCE: (TOKEN, sequence),
        POSITION: (TOKEN, position),
        TARGET: (TOKEN, target),
        "place": (TOKEN, place),
        "carry": (TOKEN, carry),
    }
    return xr.Dataset(
        data_vars, coords=coords, attrs={"order": "second", "planted": json.dumps(planted)}
    )
