"""Error of bf16 autocast against float32, and of float32 against float64, in g, c and POLCA.

A ``polca_lightning.toy.TinyTransformer`` (``--d-model``, ``--layers``) is trained for a
few AdamW steps on 3-digit addition; snapshots ``theta_0`` and ``theta_1`` are taken
``--interval`` steps apart, and ``K`` directions are the top Hessian eigenvectors of the
mean loss at ``theta_0`` (projected Lanczos, float64). At each precision the probe
tokens' ``g`` at both snapshots and ``c`` at ``theta_0`` are computed with
:class:`~polca_lightning.core.engine.DirectionalDerivatives` (forward mode; ``g`` also in
reverse mode), then POLCA of the interval in every order from them, with the same
``delta`` (float64). float64 is a float64 copy of the model; float32 the default;
bf16 ``compute_precision="bf16"`` (``torch.autocast("cpu", torch.bfloat16)``).

Errors: ``||a - ref|| / ||ref||`` over all (vector, token) entries, and ``max |a - ref| /
max |ref|``. The last row is the per-token loss under autocast, which the engine does not
use (it recomputes the loss in float32 when the precision is reduced): it shows why.
TF32 has no CPU mode; ``"tf32"`` is float32 here.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/precision.py
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from polca_lightning.core._precision import precision_scope
from polca_lightning.core.engine import DirectionalDerivatives
from polca_lightning.core.functional import FunctionalTokenLoss, ParameterSpace, evaluation_mode
from polca_lightning.core.hessian import projected_hessian_eigs
from polca_lightning.core.losses import causal_lm_token_loss
from polca_lightning.core.polca import polca_interval
from polca_lightning.toy import TinyTransformer, addition_data


def batches(n: int, seed: int, size: int) -> list[dict]:
    d = addition_data(n, seed=seed)
    return [{"input_ids": d["input_ids"][i : i + size], "labels": d["labels"][i : i + size]} for i in range(0, n, size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("-k", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="training steps before theta_0")
    parser.add_argument("--interval", type=int, default=25, help="steps from theta_0 to theta_1")
    parser.add_argument("--probe", type=int, default=256, help="probe sequences (4 loss tokens each)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = TinyTransformer(d_model=args.d_model, n_layers=args.layers, n_heads=max(1, args.d_model // 32))
    space = ParameterSpace.from_module(model)
    train = batches(64 * (args.steps + args.interval), 0, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch):
        loss, mask, _ = causal_lm_token_loss(model, batch)
        opt.zero_grad()
        loss[mask].mean().backward()
        opt.step()

    for batch in train[: args.steps]:
        step(batch)
    theta0 = space.flatten(model)
    for batch in train[args.steps :]:
        step(batch)
    theta1 = space.flatten(model)
    probe, hessian = batches(args.probe, 1, 64), batches(128, 2, 64)

    model64 = copy.deepcopy(model).double()
    fn64 = FunctionalTokenLoss(model64, causal_lm_token_loss, space)
    with evaluation_mode(model64):
        hvp = fn64.mean_loss_hvp(theta0.double(), hessian)
        eig = projected_hessian_eigs(hvp, space.dim, args.k, tol=1e-6, dtype=torch.float64)
    V64 = eig.eigenvectors  # [K, d]
    delta = V64 @ (theta1.double() - theta0.double())  # [K], the same for every precision

    results, seconds = {}, {}
    for name, net, dtype, precision in (("float64", model64, torch.float64, "float32"),
                                        ("float32", model, torch.float32, "float32"),
                                        ("bf16", model, torch.float32, "bf16")):
        V, t0, t1 = V64.to(dtype), theta0.to(dtype), theta1.to(dtype)
        out = {}
        for engine in ("forward", "reverse"):
            dd = DirectionalDerivatives(net, causal_lm_token_loss, space, engine=engine, compute_precision=precision)
            start = time.perf_counter()
            a = dd(t0, probe, V, curvature=engine == "forward")
            seconds[(name, engine)] = time.perf_counter() - start
            b = dd(t1, probe, V)
            out[engine] = (a.g.double(), b.g.double(), None if a.c is None else a.c.double())
        g0, g1, c0 = out["forward"]
        out["g (forward)"], out["g (reverse)"], out["c"] = g0, out["reverse"][0], c0
        for order in ("first", "trapezoid", "exact", "second"):
            out[f"polca {order}"] = polca_interval(order, g0, delta, g_end=g1, eigenvalue=eig.eigenvalues,
                                                   curvature=c0).values
        fn = FunctionalTokenLoss(net, causal_lm_token_loss, space)
        with evaluation_mode(net), torch.no_grad(), precision_scope(precision, "cpu"):
            out["loss under autocast"] = torch.cat([(lambda l, m: l[m])(*fn(t0, b)[:2]) for b in probe]).double()
        out["loss change"] = (dd(t1, probe).loss - dd(t0, probe).loss).double()  # float32 losses, as recorded
        results[name] = out

    def errors(a, ref):
        return ((a - ref).norm() / ref.norm()).item(), ((a - ref).abs().max() / ref.abs().max()).item()

    n_tokens = results["float32"]["g (forward)"].shape[1]
    print(f"TinyTransformer d_model={args.d_model} layers={args.layers}: d = {space.dim:,}, K = {args.k} Hessian "
          f"eigenvectors (eigenvalues {eig.eigenvalues[0]:.3g} .. {eig.eigenvalues[-1]:.3g}), {n_tokens} probe tokens, "
          f"interval of {args.interval} AdamW steps after {args.steps}")
    header = ["quantity", "f32 vs f64 (norm)", "f32 vs f64 (max)", "bf16 vs f32 (norm)", "bf16 vs f32 (max)",
              "bf16 vs f64 (norm)"]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(["---"] * len(header)) + "|")
    for key in ("g (forward)", "g (reverse)", "c", "polca first", "polca trapezoid", "polca exact", "polca second",
                "loss under autocast"):
        ref64, f32, bf = results["float64"][key], results["float32"][key], results["bf16"][key]
        a, b, c = errors(f32, ref64), errors(bf, f32), errors(bf, ref64)
        print(f"| {key} | {a[0]:.1e} | {a[1]:.1e} | {b[0]:.1e} | {b[1]:.1e} | {c[0]:.1e} |")
    change, loss = results["float32"]["loss change"], results["float32"]["loss under autocast"]
    print(f"for scale: the real loss change over the interval, ||l(theta_1) - l(theta_0)|| / ||l(theta_0)|| = "
          f"{(change.norm() / loss.norm()).item():.1e}")
    for engine in ("forward", "reverse"):
        print(f"CPU time of g{' and c' if engine == 'forward' else ''} at theta_0, {engine} mode: "
              f"bf16 / float32 = {seconds[('bf16', engine)] / seconds[('float32', engine)]:.2f}")


if __name__ == "__main__":
    main()
