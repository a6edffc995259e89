"""HVPs per eigenvector for projected_hessian_eigs to reach relative residual 1e-3.

Two small models, each briefly trained so the Hessian is not that of a random init:
an MLP on a synthetic classification task and a 2-layer causal transformer on a
copy-ish sequence task. For each (k, K) the solver runs at tol=1e-3 (float32) and the
residuals are then recomputed explicitly (k extra HVPs, not counted). Also prints the
cost of one HVP with each hvp_of method relative to one loss+gradient evaluation.

    PYTHONPATH=. python benchmarks/hessian_lanczos.py
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from polca_lightning.core.hessian import hvp_of, projected_hessian_eigs


class TinyTransformer(nn.Module):
    def __init__(self, vocab=16, d=48, n_layers=2, n_heads=4, seq=12):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, d), nn.Parameter(0.02 * torch.randn(seq, d))
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(ln1=nn.LayerNorm(d), qkv=nn.Linear(d, 3 * d), out=nn.Linear(d, d),
                               ln2=nn.LayerNorm(d), fc=nn.Linear(d, 4 * d), proj=nn.Linear(4 * d, d)))
            for _ in range(n_layers))
        self.ln_f, self.head, self.n_heads = nn.LayerNorm(d), nn.Linear(d, vocab), n_heads

    def forward(self, x):  # x [b, t] -> logits [b, t, vocab]
        b, t = x.shape
        h = self.emb(x) + self.pos[:t]  # [b, t, d]
        mask = torch.ones(t, t, dtype=torch.bool).tril()
        for blk in self.blocks:
            q, k, v = blk["qkv"](blk["ln1"](h)).split(h.shape[-1], -1)  # 3 x [b, t, d]
            q, k, v = (z.view(b, t, self.n_heads, -1).transpose(1, 2) for z in (q, k, v))  # [b, nh, t, hd]
            att = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5  # [b, nh, t, t], math attention
            att = att.masked_fill(~mask, float("-inf")).softmax(-1)
            h = h + blk["out"]((att @ v).transpose(1, 2).reshape(b, t, -1))
            h = h + blk["proj"](F.gelu(blk["fc"](blk["ln2"](h))))
        return self.head(self.ln_f(h))


def make_mlp():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g)
    y = (x[:, :4].sum(1) > 0).long() + 2 * (x[:, 4:8].sum(1) > 0).long()  # 4 classes
    model = nn.Sequential(nn.Linear(32, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 4))
    return model, (x, y), lambda out, y: F.cross_entropy(out, y)


def make_transformer():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 16, (128, 12), generator=g)
    x[:, 6:] = x[:, :6]  # second half copies the first: learnable by attention
    model = TinyTransformer()
    return model, (x[:, :-1], x[:, 1:]), lambda out, y: F.cross_entropy(out[:, 5:].flatten(0, 1), y[:, 5:].flatten())


def prepare(make, steps=150):
    torch.manual_seed(0)
    model, (x, y), crit = make()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])  # [d]

    def loss_fn(t):  # flat [d] -> scalar
        params = {n: p.view(s) for n, p, s in zip(names, t.split(sizes), shapes)}
        return crit(functional_call(model, params, (x,)), y)

    return loss_fn, theta


def time_per_call(fn, v, reps=7):
    """Fastest of `reps` calls after a warm-up: the least disturbed by other load."""
    fn(v)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(v)
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    torch.set_num_threads(2)
    rows = []
    for name, make in [("mlp", make_mlp), ("transformer", make_transformer)]:
        loss_fn, theta = prepare(make)
        d = theta.numel()
        v = torch.randn(d)
        t_grad = time_per_call(torch.func.grad(loss_fn), theta)
        costs = {m: time_per_call(hvp_of(loss_fn, theta, m), v) / t_grad for m in ("double_backward", "forward_over_reverse")}
        print(f"{name}: d={d}, one HVP costs {costs['double_backward']:.2f} (double_backward) / "
              f"{costs['forward_over_reverse']:.2f} (forward_over_reverse) loss+gradient evaluations")
        hvp = hvp_of(loss_fn, theta, "forward_over_reverse")
        prev = None  # grow the basis as Algorithm 1 does: K = 0, then the first 10 found
        for K in (0, 10):
            B = None if K == 0 else prev.eigenvectors[:K]
            for k in (1, 5, 10, 20):
                t0 = time.perf_counter()
                res = projected_hessian_eigs(hvp, d, k, B, tol=1e-3, max_hvp=4000)
                secs = time.perf_counter() - t0
                if K == 0 and k == 10:
                    prev = res
                X = res.eigenvectors
                Bm = torch.zeros(0, d) if B is None else B
                PHPX = torch.stack([hvp(x - Bm.T @ (Bm @ x)) for x in X])  # [k, d]
                PHPX = PHPX - (PHPX @ Bm.T) @ Bm
                true_rel = ((PHPX - res.eigenvalues[:, None] * X).norm(dim=1) / res.eigenvalues.abs().max()).max()
                rows.append((name, d, K, k, res.n_hvp, res.n_hvp / k, true_rel.item(),
                             res.eigenvalues[0].item(), res.eigenvalues[-1].item(), secs))
    print()
    hdr = f"{'model':<12}{'d':>8}{'K':>4}{'k':>4}{'n_hvp':>7}{'hvp/eig':>9}{'max rel res':>13}{'λ_1':>10}{'λ_k':>10}{'sec':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        print(f"{r[0]:<12}{r[1]:>8}{r[2]:>4}{r[3]:>4}{r[4]:>7}{r[5]:>9.1f}{r[6]:>13.2e}{r[7]:>10.4f}{r[8]:>10.4f}{r[9]:>7.1f}")


if __name__ == "__main__":
    main()
