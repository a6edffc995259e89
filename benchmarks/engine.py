"""Cost of one snapshot's directional derivatives, in plain forward passes over the probe set.

Two shapes: the paper's arithmetic (3-digit addition, 12-token sequences, 4 loss tokens,
a 2-layer d=128 transformer, 1250 probe sequences) and a language-model shape (128-token
sequences, every position a loss token), each with K = 1, 16, 50 directions. For each:
forward mode, reverse mode, the engine's choice (``auto``) and the naive reference (one
``autograd.grad`` per token over the batch graph; timed on a sample of tokens and
scaled to all of them). Then the Hessian-vector products per eigenvector that the
projected Lanczos spends to reach a relative residual of 1e-3.

Usage:
    python benchmarks/engine.py            # full table (several minutes on 2 CPU cores)
    python benchmarks/engine.py --quick    # smaller probe sets, for a smoke run
"""

from __future__ import annotations

import argparse
import time

import torch

from polca_lightning.core.engine import DirectionalDerivatives
from polca_lightning.core.functional import FunctionalTokenLoss, ParameterSpace, evaluation_mode
from polca_lightning.core.hessian import projected_hessian_eigs
from polca_lightning.core.losses import causal_lm_token_loss
from polca_lightning.toy import TinyTransformer, addition_data


def timed(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def orthonormal(k: int, d: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, k))
    return q.T.contiguous()  # [k, d]


def naive_seconds_per_token(model, space, batches, directions, sample_tokens: int) -> tuple[float, int]:
    """One autograd.grad per token over the whole batch graph, projected on the directions."""
    fn = FunctionalTokenLoss(model, causal_lm_token_loss, space)
    theta = space.flatten(model).requires_grad_(True)
    batch = batches[0]
    with evaluation_mode(model):
        loss, mask, _ = fn(theta, batch)
        tokens = loss[mask]
        n = min(sample_tokens, tokens.numel())
        start = time.perf_counter()
        for i in range(n):
            (grad,) = torch.autograd.grad(tokens[i], theta, retain_graph=True)
            _ = directions @ grad
        per_token = (time.perf_counter() - start) / n
    total_tokens = sum(int(fn(theta.detach(), b)[1].sum()) for b in batches)
    return per_token, total_tokens


def bench_shape(name, model, batches, ks, naive_sample, memory_cap):
    space = ParameterSpace.from_module(model)
    theta = space.flatten(model)
    engines = {e: DirectionalDerivatives(model, causal_lm_token_loss, space, engine=e, memory_cap=memory_cap) for e in ("forward", "reverse", "auto")}
    engines["auto"].calibrate(theta, batches[0])  # as the callback does before training
    fwd = timed(lambda: engines["auto"](theta, batches), repeat=3)
    with torch.no_grad():
        _, mask, _ = engines["auto"].fn(theta, batches[0])
    per_seq = float(mask.sum(1).float().mean())
    rows = []
    for k in ks:
        V = orthonormal(k, space.dim)
        # best of two after a warm-up (the first reverse call also checks the activation-based
        # path against per-sample Jacobians, once per model)
        t = {}
        for e in ("forward", "reverse", "auto"):
            engines[e](theta, batches[:1], V)
            t[e] = timed(lambda e=e: engines[e](theta, batches, V), repeat=2)
        chosen = engines["auto"].choose(theta, batches, k, False)
        per_token, n_tokens = naive_seconds_per_token(model, space, batches, V, naive_sample)
        naive = per_token * n_tokens
        best = min(t["forward"], t["reverse"])
        rows.append(
            (name, k, t["forward"] / fwd, t["reverse"] / fwd, chosen, t["auto"] / fwd, naive / fwd,
             t["forward"] / fwd / k, t["reverse"] / fwd / per_seq, t["auto"] / best, naive / t["auto"])
        )
    return fwd, space.dim, per_seq, rows


def hvps_per_eigenvector(model, batches, k: int, tol: float):
    space = ParameterSpace.from_module(model)
    fn = FunctionalTokenLoss(model, causal_lm_token_loss, space)
    theta = space.flatten(model)
    with evaluation_mode(model):
        hvp = fn.mean_loss_hvp(theta, batches)
        basis = None
        out = []
        for step in range(2):  # a second basis step, projected against the first
            res = projected_hessian_eigs(hvp, space.dim, k, basis, tol=tol, seed=step)
            rel = (res.residuals / res.eigenvalues.abs().max()).max().item()
            out.append((step, res.n_hvp, res.n_hvp / k, rel, res.eigenvalues[0].item()))
            basis = res.eigenvectors if basis is None else torch.cat([basis, res.eigenvectors])
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small probe sets (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n_arith = 250 if args.quick else 1250
    n_lm = 4 if args.quick else 16
    ks = (1, 16) if args.quick else (1, 16, 50)

    arith_model = TinyTransformer(d_model=128, n_layers=2, n_heads=4, max_len=12)
    data = addition_data(n_arith, seed=0)
    arith = [
        {"input_ids": data["input_ids"][i : i + 250], "labels": data["labels"][i : i + 250]}
        for i in range(0, n_arith, 250)
    ]
    lm_model = TinyTransformer(vocab=256, d_model=128, n_layers=2, n_heads=4, max_len=128)
    lm = [torch.randint(0, 256, (n_lm, 128))]

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu")
    results = []
    for name, model, batches, sample in (("arithmetic", arith_model, arith, 40), ("language", lm_model, lm, 40)):
        fwd, d, per_seq, rows = bench_shape(name, model, batches, ks, sample, memory_cap=1 << 30)
        print(f"{name}: {d:,} parameters, {sum(len(b['input_ids']) if isinstance(b, dict) else len(b) for b in batches)} "
              f"sequences, {per_seq:.0f} loss tokens per sequence, plain forward pass {fwd * 1e3:.1f} ms")
        results += rows

    head = ("shape", "K", "forward", "reverse", "choice", "auto", "naive", "fwd/dir", "rev/pos", "auto/best", "naive/auto")
    print()
    print("Cost per snapshot, in plain forward passes over the probe set")
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]} | {r[5]:.1f} | {r[6]:.0f} | {r[7]:.2f} | {r[8]:.2f} | {r[9]:.2f} | {r[10]:.0f}x |")

    print()
    print("Projected Lanczos on the arithmetic model (Hessian batch: 250 sequences), relative residual 1e-3")
    print("| basis step | k | HVPs | HVPs per eigenvector | max relative residual | top eigenvalue |")
    print("|---|---|---|---|---|---|")
    for k in (1, 5):
        for step, n_hvp, per, rel, top in hvps_per_eigenvector(arith_model, arith[:1], k, 1e-3):
            print(f"| {step} | {k} | {n_hvp} | {per:.1f} | {rel:.1e} | {top:.4g} |")


if __name__ == "__main__":
    main()
