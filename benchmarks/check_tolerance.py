"""How far two float32 computations of the same directional derivatives lie apart, by model size.

The reverse engine's activation path is trusted once it agrees with per-sample Jacobians
on a few samples (``DirectionalDerivatives``' check). Both compute ``g = <grad l_x, v>``
in float32, a dot product over the d parameters; along a random unit direction ``v`` the
rounding differences relative to ``g`` grow like ``eps sqrt(d)`` (``eps = 2^-24``), so a
fixed tolerance that holds for small models refuses the activation path on large ones.
This prints, for ``polca_lightning.toy.TinyTransformer``s of growing size on 3-digit
addition, the largest relative and scaled differences between the activation path and
per-sample Jacobians (real batches of one) over 4 samples and 4 random directions, next
to ``eps sqrt(d)`` and the tolerance the check uses at that size, and whether the check
passes with it and with the fixed float32 tolerance (``rtol=1e-4``, ``atol=1e-5`` of the
largest value) it used before.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/check_tolerance.py
"""

from __future__ import annotations

import argparse
import math

import torch

from polca_lightning.core._ghost import ghost_plan, ghost_reverse
from polca_lightning.core._jacobians import PerSampleJacobians, agree
from polca_lightning.core.engine import check_rtol
from polca_lightning.core.functional import FunctionalTokenLoss, ParameterSpace, evaluation_mode
from polca_lightning.core.hessian import orthonormalize_rows
from polca_lightning.core.losses import causal_lm_token_loss
from polca_lightning.toy import TinyTransformer, addition_data

EPS32 = 2.0**-24


def measure(d_model: int, layers: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = TinyTransformer(d_model=d_model, n_layers=layers, n_heads=max(1, d_model // 64))
    space = ParameterSpace.from_module(model)
    data = addition_data(4, seed=seed + 1)
    batch = {"input_ids": data["input_ids"], "labels": data["labels"]}
    fn = FunctionalTokenLoss(model, causal_lm_token_loss, space)
    theta = space.flatten(model)
    gen = torch.Generator().manual_seed(seed)
    directions = torch.empty(4, space.dim)
    for row in directions:
        row.copy_(torch.randn(space.dim, generator=gen))
    directions = orthonormalize_rows(directions, None)
    with evaluation_mode(model):
        loss, mask, g = ghost_reverse(fn, model, space, ghost_plan(model, space.names), theta, batch, directions)
        ref, _ = PerSampleJacobians(fn)._looped(theta, batch, loss, mask, directions, False)
    a, b = g[:, mask].double(), ref[:, mask].double()
    diff = (a - b).abs()
    tol = check_rtol("float32", space.dim)
    return {"d": space.dim, "relative": float((diff / b.abs()).max()),
            "scaled": float(diff.max() / b.abs().max()), "eps_sqrt_d": EPS32 * math.sqrt(space.dim),
            "tolerance": tol, "fixed_passes": agree(a, b, rtol=1e-4, atol=1e-5),
            "passes": agree(a, b, rtol=tol, atol=tol / 10)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="models (and directions) per size")
    parser.add_argument("--sizes", default="64x2,128x2,256x3,320x3,512x4",
                        help="d_model x layers, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'d':>12} {'max |a-b|/|b|':>14} {'max |a-b|/max|b|':>17} {'eps sqrt(d)':>12} "
          f"{'scaled/(eps sqrt d)':>19} {'check tolerance':>15} {'passes':>6} {'passes 1e-4':>11}")
    for size in args.sizes.split(","):
        d_model, layers = (int(x) for x in size.split("x"))
        for seed in range(args.seeds):
            r = measure(d_model, layers, seed)
            print(f"{r['d']:>12,} {r['relative']:>14.2e} {r['scaled']:>17.2e} {r['eps_sqrt_d']:>12.2e} "
                  f"{r['scaled'] / r['eps_sqrt_d']:>19.2f} {r['tolerance']:>15.2e} {str(r['passes']):>6} "
                  f"{str(r['fixed_passes']):>11}")


if __name__ == "__main__":
    main()
