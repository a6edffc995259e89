"""What a random direction sees in 9.5M dimensions, against the Hessian basis, on a finished run.

For a unit direction ``b`` drawn uniformly in ``d`` dimensions and any fixed vector ``v``,
``E <b, v>^2 = |v|^2 / d``. The movement along ``b`` over an interval, ``delta_i(b) = <b,
theta_{i+1} - theta_i>``, and a token's directional derivative ``g_i(x, b) = <b, grad l_x>``
are then ``1/sqrt(d)`` of their full size (about 3e-4 of it at the paper's 9,475,594
parameters), while an eigenvector of the Hessian can see much more of both. This study
measures both on a store that has weight snapshots and a basis (``make paper``'s):

1. **movement**, per interval: ``|delta theta|``; the root mean square of ``delta`` over
   ``--random`` random orthonormal directions beside ``|delta theta| / sqrt(d)``; and per
   basis vector ``|delta(b)| / (|delta theta| / sqrt(d))``: how many times the movement a
   random direction sees this vector sees (1: no more than chance);
2. **directional derivatives**, at ``--snapshots`` of the run on ``--problems`` probe
   problems: each token's full gradient norm, the root mean square of ``g`` over the random
   directions beside ``|grad l_x| / sqrt(d)``, and ``|g|`` along each basis vector in the
   same units;
3. **one shape for every token**: a token's projected loss along ``b`` is ``sum_i g_i(x, b)
   delta_i(b)``; where its gradient's component ``g(x, b)`` changes slowly, that is about
   ``g(x, b) (<b, theta_t - theta_0>)``: the movement along ``b``, the same curve for every
   token, scaled by a token's own factor. Per vector, from the store's ``polca``: the share
   of the trajectories' energy (each token's trajectory divided by its root mean square,
   as ``normalize="token"`` clusters them) on their first singular vector, and the share
   of tokens whose trajectory correlates with it at ``|r| > 0.9``; the exact loss's
   trajectories beside them. Near 1: one shape up to sign and size, no timing to cluster;
4. **what one direction's allocation tells of a token's learning**: over the interval that
   starts at each of those snapshots, every token's full first-order loss change
   ``<grad l_x, delta theta>`` against its allocation ``g delta`` along each direction: their
   correlation across tokens and the share of tokens whose two have the same sign.

Usage:
    python studies/random_basis.py runs/paper/hessian_seed0 --out runs/paper/random_basis.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from polca_lightning import open_store  # noqa: E402
from polca_lightning.core._streaming import orthonormalize_rows  # noqa: E402
from polca_lightning.core.functional import FunctionalTokenLoss, ParameterSpace, evaluation_mode  # noqa: E402
from polca_lightning.core.losses import causal_lm_token_loss  # noqa: E402
from polca_lightning.toy import TinyCausalLM, addition_data  # noqa: E402


def random_directions(r: int, d: int, seed: int) -> torch.Tensor:
    """``[r, d]`` orthonormal rows, uniformly distributed (Gaussian rows orthonormalised)."""
    gen = torch.Generator().manual_seed(seed)
    return orthonormalize_rows(torch.randn(r, d, generator=gen), what="random")


def movement(ds, random: torch.Tensor, basis: torch.Tensor) -> dict:
    """Per interval: |Δθ|, RMS δ over the random directions, |δ| along each basis vector."""
    d = basis.shape[1]
    rows = {"step": [], "norm": [], "random_rms": [], "basis": []}
    weights = ds["weights"]
    previous = torch.from_numpy(np.asarray(weights[0].values, dtype=np.float32))
    for i in range(1, ds.sizes["snapshot"]):
        current = torch.from_numpy(np.asarray(weights[i].values, dtype=np.float32))
        step = (current - previous).double()
        norm = step.norm().item()
        rows["step"].append(int(ds["step"][i]))
        rows["norm"].append(norm)
        rows["random_rms"].append((random.double() @ step).pow(2).mean().sqrt().item() / (norm / d ** 0.5))
        rows["basis"].append(((basis.double() @ step).abs() / (norm / d ** 0.5)).tolist())
        previous = current
    return rows


def shapes(ds) -> dict:
    """Per basis vector and for the exact loss: the energy share of the first singular vector
    of the per-token normalised trajectories, and the share of tokens at |r| > 0.9 with it."""
    from polca_lightning.analysis.clustering import normalize_tokens

    def one(traj: np.ndarray) -> tuple[float, float]:  # traj [token, time]
        traj = traj[np.isfinite(traj).all(1)]
        x = normalize_tokens(traj)
        _, sv, vt = np.linalg.svd(x, full_matrices=False)
        share = float(sv[0] ** 2 / (sv ** 2).sum())
        centred = traj - traj.mean(1, keepdims=True)
        shape = vt[0] - vt[0].mean()
        r = centred @ shape / (np.linalg.norm(centred, axis=1) * np.linalg.norm(shape) + 1e-300)
        return share, float(np.mean(np.abs(r) > 0.9))

    polca = np.asarray(ds["polca"].values, dtype=np.float64)  # [interval, basis, token]
    cumulative = np.cumsum(polca, axis=0)
    per_vector = [one(cumulative[:, b, :].T) for b in range(cumulative.shape[1])]
    loss = np.asarray(ds["loss"].values, dtype=np.float64)  # [snapshot, token]
    loss_share, loss_aligned = one((loss[1:] - loss[:1]).T)
    return {"vector_share": [v[0] for v in per_vector], "vector_aligned": [v[1] for v in per_vector],
            "loss_share": loss_share, "loss_aligned": loss_aligned}


def token_projections(fn: FunctionalTokenLoss, theta: torch.Tensor, batch: dict, directions: dict) -> dict:
    """Per loss-bearing token (one backward each, never all gradients at once: 200 tokens of
    the paper's model would be 7.6 GB): its gradient's norm and its products with each row of
    every ``directions[name]`` (``[r, d]``), as ``{"norm": [tokens], name: [tokens, r]}``."""
    theta = theta.detach().requires_grad_(True)
    loss, mask, _ = fn(theta, batch)
    picked = loss[mask]
    out = {"norm": [], **{name: [] for name in directions}}
    for j in range(picked.numel()):
        (g,) = torch.autograd.grad(picked[j], theta, retain_graph=j + 1 < picked.numel())
        out["norm"].append(g.norm())
        for name, rows in directions.items():
            out[name].append(rows @ g)
    return {name: torch.stack(values) for name, values in out.items()}


def derivatives(ds, config: dict, random: torch.Tensor, basis: torch.Tensor, snapshots: list[int], problems: int,
                model: torch.nn.Module) -> dict:
    """|∇ℓ_x|, RMS g over the random directions and |g| per basis vector, in units of |∇ℓ_x|/sqrt(d)."""
    space = ParameterSpace.from_module(model)
    fn = FunctionalTokenLoss(model, causal_lm_token_loss, space)
    data = addition_data(problems, seed=10_000 + int(config.get("seed", 0)), symbols=False)
    batch = {"input_ids": data["input_ids"], "labels": data["labels"]}
    d = space.dim
    out = {"snapshot_step": [], "grad_norm_median": [], "random_rms": [], "basis_median": [], "tokens": [],
           "random_corr": [], "basis_corr": [], "random_sign": [], "basis_sign": []}
    for s in snapshots:
        theta = torch.from_numpy(np.asarray(ds["weights"][s].values, dtype=np.float32))
        step = torch.from_numpy(np.asarray(ds["weights"][s + 1].values, dtype=np.float32)) - theta  # [d]
        with evaluation_mode(model):
            proj = token_projections(fn, theta, batch, {"random": random, "basis": basis, "step": step[None, :]})
        norms = proj["norm"]  # [tokens]
        unit = norms / d ** 0.5
        g_random, g_basis = proj["random"], proj["basis"]  # [tokens, r], [tokens, K]
        out["snapshot_step"].append(int(ds["step"][s]))
        out["tokens"].append(int(norms.shape[0]))
        out["grad_norm_median"].append(norms.median().item())
        out["random_rms"].append((g_random.pow(2).mean(1).sqrt() / unit).median().item())
        out["basis_median"].append((g_basis.abs() / unit[:, None]).median(0).values.tolist())
        # the interval that starts here: each token's full first-order change against its
        # allocation along each direction (g δ), across tokens
        full = proj["step"][:, 0].double().numpy()  # [tokens]
        for name, g, dirs in (("random", g_random, random), ("basis", g_basis, basis)):
            alloc = (g * (dirs @ step)[None, :]).double().numpy()  # [tokens, directions]
            out[f"{name}_corr"].append([_corr(full, a) for a in alloc.T])
            out[f"{name}_sign"].append([float(np.mean(np.sign(a) == np.sign(full))) for a in alloc.T])
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation across tokens (NaN when either is constant)."""
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def print_derivatives(derived: dict) -> None:
    print("directional derivatives, in units of each token's |∇ℓ_x|/sqrt(d) (median over tokens):")
    for i, s in enumerate(derived["snapshot_step"]):
        print(f"  step {s:>5}: |∇ℓ_x| median {derived['grad_norm_median'][i]:.3g}; random RMS "
              f"{derived['random_rms'][i]:.2f}; basis " + ", ".join(f"{v:.1f}" for v in derived["basis_median"][i]))
    print("each direction's allocation g·δ against the full first-order change <∇ℓ_x, Δθ> over the interval that "
          "starts there, across tokens: |correlation| (median over directions) and the share of tokens of the same sign:")
    for i, s in enumerate(derived["snapshot_step"]):
        print(f"  step {s:>5}: random {np.nanmedian(np.abs(derived['random_corr'][i])):.2f} / "
              f"{np.median(derived['random_sign'][i]):.2f}; basis "
              + ", ".join(f"{abs(c):.2f}/{sg:.2f}" for c, sg in zip(derived["basis_corr"][i], derived["basis_sign"][i])))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished run's folder (its polca.zarr)")
    p.add_argument("--random", type=int, default=16, help="random orthonormal directions")
    p.add_argument("--snapshots", type=int, nargs="*", default=[0, 5, 10, 20, 50],
                   help="snapshot indices of the directional derivatives (none: movement and shapes only)")
    p.add_argument("--problems", type=int, default=50, help="probe problems (4 tokens each)")
    p.add_argument("--out", help="write the figures here (JSON)")
    p.add_argument("--model", type=int, nargs=4, default=[512, 3, 4, 2048], metavar=("D", "LAYERS", "HEADS", "MLP"),
                   help="the run's model (default: --paper's); the digits format (vocabulary 10, context 14)")
    args = p.parse_args(argv)
    torch.set_grad_enabled(True)
    ds = open_store(Path(args.run) / "polca.zarr")
    config = json.loads(ds.attrs["config"]) if isinstance(ds.attrs.get("config"), str) else dict(ds.attrs["config"])
    basis = torch.from_numpy(np.asarray(ds["basis_vectors"].values, dtype=np.float32))
    d = basis.shape[1]
    random = random_directions(args.random, d, seed=12345)
    moved = movement(ds, random, basis)
    shaped = shapes(ds)
    snapshots = [s for s in args.snapshots if s + 1 < ds.sizes["snapshot"]]
    d_model, layers, heads, d_mlp = args.model
    model = TinyCausalLM(10, 14, d_model, layers, heads, d_mlp=d_mlp)
    derived = derivatives(ds, config, random, basis, snapshots, args.problems, model) if snapshots else None
    result = {"run": str(args.run), "d": d, "random_directions": args.random, "movement": moved, "shapes": shaped,
              "derivatives": derived}
    norm = np.array(moved["norm"])
    rand = np.array(moved["random_rms"])
    per_basis = np.array(moved["basis"])  # [interval, K]
    print(f"{args.run}: d = {d:,}, {len(norm)} intervals, {args.random} random directions")
    print(f"movement: |Δθ| per interval median {np.median(norm):.3g}; RMS δ along a random direction "
          f"{np.median(rand):.2f} × |Δθ|/sqrt(d) (theory: 1)")
    print("  per basis vector, median over intervals of |δ(b)| in units of |Δθ|/sqrt(d): "
          + ", ".join(f"{v:.1f}" for v in np.median(per_basis, 0)))
    print("one shape for every token? energy share of the first singular vector of the normalised trajectories "
          "/ share of tokens at |r| > 0.9 with it:")
    print("  per vector: " + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in zip(shaped["vector_share"],
                                                                          shaped["vector_aligned"]))
          + f"; exact loss {shaped['loss_share']:.2f}/{shaped['loss_aligned']:.2f}")
    if derived is not None:
        print_derivatives(derived)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
