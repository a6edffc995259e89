"""Which POLCA order tracks the real loss change? All four, from one store.

A store written with ``order="exact"`` holds everything the four orders need: ``g`` at
both ends of each interval, ``delta``, the eigenvalues and the per-token curvature.
This script recomputes ``first``, ``second`` (paper Eq. 5), ``trapezoid`` and ``exact``
from it with :func:`polca_lightning.core.polca.polca_interval` and compares each with the
real per-token loss change:

- ``ratio``: total allocated change over the total real change (whole run);
- ``corr``: correlation over tokens of the allocated and real change (whole run);
- ``interval corr``: the median over intervals of the per-interval correlation;
- ``max |value|``: the largest single POLCA value (a blow-up shows here);
- ``guarded``: how often Eq. 5's denominator was clamped (second order only).

Usage:
    python examples/arithmetic.py --order exact --out runs/orders --no-wandb
    python benchmarks/orders.py runs/orders/polca.zarr
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from polca_lightning import open_store
from polca_lightning.core.polca import ORDERS, polca_interval


def corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    d = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / d) if d > 0 else float("nan")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store")
    args = p.parse_args()
    ds = open_store(args.store)
    if "curvature" not in ds:
        raise SystemExit(f"{args.store} has no curvature: write it with order='exact'")
    g = torch.from_numpy(ds["directional_grad"].values).double()  # [S, K, T]
    c = torch.from_numpy(ds["curvature"].values).double()
    delta = torch.from_numpy(ds["delta"].values).double()  # [I, K]
    lam = torch.from_numpy(ds["eigenvalue"].values).double()
    loss = ds["loss"].values.astype(np.float64)  # [S, T]
    real = np.diff(loss, axis=0)  # [I, T]
    print(f"{args.store}: {ds.sizes['interval']} intervals, {ds.sizes['basis']} vectors, {ds.sizes['token']} tokens")
    print(f"real mean loss change over the run: {real.sum(0).mean():+.4f} per token\n")
    print("| order | ratio | corr | interval corr (median) | max abs value | guarded |")
    print("|---|---|---|---|---|---|")
    for order in ORDERS:
        total = np.zeros_like(real)
        biggest, guarded = 0.0, 0
        for i in range(real.shape[0]):
            out = polca_interval(order, g[i], delta[i], g_end=g[i + 1], eigenvalue=lam, curvature=c[i])
            v = out.values.numpy()  # [K, T]
            total[i] = v.sum(0)
            biggest = max(biggest, float(np.abs(v).max()))
            guarded += int(out.guarded.sum())
        per_interval = [corr(total[i], real[i]) for i in range(real.shape[0])]
        print(f"| {order} | {total.sum() / real.sum():.3f} | {corr(total.sum(0), real.sum(0)):.3f} | "
              f"{np.nanmedian(per_interval):.3f} | {biggest:.3g} | {guarded} of {real.shape[0] * ds.sizes['basis']} |")


if __name__ == "__main__":
    main()
