"""The comparisons of ``benchmarks/device_check.py``: the CUDA paths against the CPU.

Each ``check_*`` function takes a :class:`Setting` (the device, the sizes, a work folder)
and returns JSON-able figures; their ``checks`` list holds every comparison with its
bound, and the driver marks the step failed when one is out of its bound. The reference
is always the same computation on the CPU in float64 (a float64 copy of the model).
Without CUDA the "device" side is the CPU: everything runs, and ``cuda_check`` is false.
``benchmarks/_device_costs.py`` has the cost measurements.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from polca_lightning.core._precision import PRECISIONS, cuda_tf32
from polca_lightning.core._streaming import host_rows, orthonormalize_rows
from polca_lightning.core.engine import DirectionalDerivatives, check_rtol
from polca_lightning.core.functional import FunctionalTokenLoss, ParameterSpace, evaluation_mode
from polca_lightning.core.hessian import projected_hessian_eigs
from polca_lightning.core.losses import causal_lm_token_loss
from polca_lightning.toy import ADDITION_VOCAB, TinyTransformer, addition_data

F64 = torch.float64


@dataclass(frozen=True)
class Sizes:
    """How large each check is: a small model for the comparisons, the paper's for the costs."""

    d_model: int  # the small model of the comparisons: width, layers, heads
    layers: int
    heads: int
    train_steps: int  # AdamW steps before the comparisons, so that they are not at the initialisation
    probe: int  # probe problems of the comparisons, in batches of `batch`
    batch: int
    hessian: int  # Hessian problems of the eigensolver check
    k: int  # directions of the host-basis and precision checks
    eig_k: int  # eigenpairs per basis step of the eigensolver check
    fit_steps: int  # steps of the callback run with the basis in host memory
    paper_d_model: int  # the example's --paper model at these sizes (3 layers, d 512, 4 heads: 9.5M)
    paper_layers: int
    paper_heads: int
    paper_probe: int  # probe problems, in batches of `paper_batch` (the example's 200)
    paper_batch: int
    paper_hessian: int  # Hessian problems, in batches of `hessian_batch` (the example's 256)
    hessian_batch: int
    ks: tuple[int, ...]  # directions at which the engines are timed
    repeat: int  # timings: the best of this many


DEVICE = Sizes(d_model=64, layers=2, heads=2, train_steps=50, probe=256, batch=64, hessian=128, k=8, eig_k=4,
               fit_steps=12, paper_d_model=512, paper_layers=3, paper_heads=4, paper_probe=1250, paper_batch=200,
               paper_hessian=1250, hessian_batch=256, ks=(1, 16, 50), repeat=2)
DRY = Sizes(d_model=16, layers=1, heads=2, train_steps=5, probe=24, batch=8, hessian=16, k=3, eig_k=2, fit_steps=6,
            paper_d_model=16, paper_layers=1, paper_heads=2, paper_probe=16, paper_batch=8, paper_hessian=16,
            hessian_batch=8, ks=(1, 4), repeat=1)


@dataclass
class Setting:
    """Where the checks run and how large they are."""

    device: torch.device
    sizes: Sizes
    workdir: Path
    _small: "Small | None" = field(default=None, repr=False)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def small(self) -> "Small":
        """The small model and its data, built once."""
        if self._small is None:
            self._small = Small.build(self)
        return self._small


# ------------------------------------------------------------------------------ helpers
def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a timer sees it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn, device: torch.device, repeat: int = 1) -> float:
    """Wall seconds of ``fn()``, the best of ``repeat``, the device's queue drained around each."""
    best = math.inf
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def rel(a: Tensor, b: Tensor) -> float:
    """``||a - b|| / ||b||`` over all entries, in float64 on the CPU."""
    a, b = a.detach().to("cpu", F64), b.detach().to("cpu", F64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


class Checks(list):
    """Comparisons with their bounds, as JSON-able dicts."""

    def bound(self, name: str, value: float, upper: float | None = None, lower: float | None = None,
              why: str = "") -> bool:
        value = float(value)
        ok = math.isfinite(value) and (upper is None or value <= upper) and (lower is None or value >= lower)
        self.append({"name": name, "value": value, "lower": lower, "upper": upper, "passed": ok, "why": why})
        return ok

    def holds(self, name: str, condition: bool, why: str = "") -> bool:
        self.append({"name": name, "value": bool(condition), "passed": bool(condition), "why": why})
        return bool(condition)


def on(batches: list[dict], device: torch.device) -> list[dict]:
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


def addition_batches(n: int, seed: int, size: int, symbols: bool = True) -> list[dict]:
    data = addition_data(n, seed=seed, symbols=symbols)
    return [{"input_ids": data["input_ids"][i : i + size], "labels": data["labels"][i : i + size]}
            for i in range(0, n, size)]


def orthonormal(k: int, d: int, seed: int) -> Tensor:
    """``[k, d]`` orthonormal rows in float64 on the CPU (small d only: a QR of ``[d, k]``)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=gen, dtype=F64)).Q.T.contiguous()


def tf32_flags() -> tuple:
    """The CUDA TF32 switches for matmuls and convolutions, through the API this torch has."""
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and conv is not None and hasattr(conv, "fp32_precision"):
        return matmul.fp32_precision, conv.fp32_precision
    return matmul.allow_tf32, torch.backends.cudnn.allow_tf32


@dataclass
class Small:
    """A small addition transformer after a few AdamW steps: a float32 copy on the device and a
    float64 copy on the CPU, with probe and Hessian batches on both."""

    model64: nn.Module
    model_dev: nn.Module
    space: ParameterSpace
    theta64: Tensor
    theta_dev: Tensor
    probe_cpu: list
    probe_dev: list
    hessian_cpu: list
    hessian_dev: list

    @classmethod
    def build(cls, s: Setting) -> "Small":
        z = s.sizes
        torch.manual_seed(0)
        model = TinyTransformer(vocab=ADDITION_VOCAB, d_model=z.d_model, n_layers=z.layers, n_heads=z.heads, max_len=12)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for batch in addition_batches(64 * z.train_steps, 0, 64):
            loss, mask, _ = causal_lm_token_loss(model, batch)
            opt.zero_grad()
            loss[mask].mean().backward()
            opt.step()
        space = ParameterSpace.from_module(model)
        model64 = copy.deepcopy(model).double()
        model_dev = copy.deepcopy(model).to(s.device)
        probe, hessian = addition_batches(z.probe, 1, z.batch), addition_batches(z.hessian, 2, z.batch)
        return cls(model64, model_dev, space, space.flatten(model64), space.flatten(model_dev),
                   probe, on(probe, s.device), hessian, on(hessian, s.device))


# ------------------------------------------------------------------- a. host basis
def check_host_basis(s: Setting) -> dict:
    """Directions in (pinned) host memory, streamed to the device a chunk of rows at a time;
    host rows orthonormalised with their products on the device; a callback run with
    ``basis_on_device=False``. Each against the CPU in float64."""
    m, z, checks = s.small, s.sizes, Checks()
    d, k = m.space.dim, z.k
    tol = check_rtol("float32", d)
    why = ("float32 arithmetic against float64: rounding is ~1e-7 of the scale; the bound is the engine's own "
           "float32 check tolerance, max(1e-4, 8 eps sqrt(d)), 100x below TF32's rounding, so a matmul in TF32 fails it")
    V64 = orthonormal(k, d, seed=0)
    ref = DirectionalDerivatives(m.model64, causal_lm_token_loss, m.space, engine="forward")(
        m.theta64, m.probe_cpu, V64, curvature=True)
    host = host_rows(k, d, torch.float32)  # pinned where CUDA is available
    host.copy_(V64)
    out = {"cuda_check": s.cuda, "d": d, "k": k, "tokens": int(ref.g.shape[1]), "pinned": host.is_pinned(),
           "tolerance": tol}
    checks.holds("the host rows are pinned exactly where CUDA is available", host.is_pinned() == torch.cuda.is_available())
    cap = 4 * d * 4  # memory_cap: two float32 rows a chunk (half the cap); the engines' chunks get the rest
    for engine in ("forward", "reverse"):
        curvature = engine == "forward"
        dd = DirectionalDerivatives(m.model_dev, causal_lm_token_loss, m.space, engine=engine, memory_cap=cap)
        chunks = dd.n_direction_chunks(host, m.theta_dev)
        got = dd(m.theta_dev, m.probe_dev, host, curvature=curvature)
        whole = DirectionalDerivatives(m.model_dev, causal_lm_token_loss, m.space, engine=engine)(
            m.theta_dev, m.probe_dev, host.to(s.device), curvature=curvature)
        fig = {"direction_chunks": chunks, "g_vs_cpu_float64": rel(got.g, ref.g),
               "g_streamed_vs_on_device": rel(got.g, whole.g), "loss_vs_cpu_float64": rel(got.loss, ref.loss)}
        checks.bound(f"{engine}: g along the host basis, against the CPU in float64", fig["g_vs_cpu_float64"], tol,
                     why=why)
        checks.holds(f"{engine}: the host basis came in chunks of two rows on CUDA (one piece on the CPU)",
                     chunks == (math.ceil(k / 2) if s.cuda else 1))
        if curvature:
            fig["c_vs_cpu_float64"] = rel(got.c, ref.c)
            checks.bound("forward: c along the host basis, against the CPU in float64", fig["c_vs_cpu_float64"], tol,
                         why=why)
        out[engine] = fig
    # two new rows orthonormalised against the host basis, in place in host memory, their
    # products formed on the device in chunks of 64 KiB (CPU float64 with its default chunks
    # as the reference)
    gen = torch.Generator().manual_seed(1)
    new = host_rows(2, d, torch.float32)
    new.copy_(torch.randn(2, d, generator=gen))
    want = orthonormalize_rows(new.to(F64), host.to(F64))
    got = orthonormalize_rows(new, host, memory_cap=64 << 10, device=s.device).to(F64)
    both = torch.cat([got, host.to(F64)])  # [2 + k, d]
    gram = got @ both.T - torch.eye(2, 2 + k, dtype=F64)
    out["orthonormalize"] = {"max_abs_vs_cpu_float64": float((got - want).abs().max()),
                             "orthonormality": float(gram.abs().max())}
    checks.bound("orthonormalised host rows, against the CPU in float64 (max abs)",
                 out["orthonormalize"]["max_abs_vs_cpu_float64"], 1e-6,
                 why="unit rows over d entries stored in float32: entries differ by float32 rounding, ~1e-8 here")
    checks.bound("orthonormalised host rows: max |Q [Q; B]ᵀ - [I 0]|", out["orthonormalize"]["orthonormality"], 1e-5,
                 why="float32 rows orthonormalised in float64: ~1e-7; 1e-5 is the eigensolver tests' bound")
    out["callback"] = _callback_with_host_basis(s, checks)
    out["checks"] = checks
    return out


def _callback_with_host_basis(s: Setting, checks: Checks) -> dict:
    """A short ``Trainer.fit`` with ``basis_on_device=False`` on the device; every stored ``g``
    against the CPU in float64 from the stored weights and basis."""
    import lightning as L
    from torch.utils.data import DataLoader

    from polca_lightning import POLCACallback, open_store
    from polca_lightning.toy import TinyCausalLM

    z = s.sizes
    store = s.workdir / "host_basis.zarr"
    shutil.rmtree(store, ignore_errors=True)
    probe = addition_batches(z.probe, 1, z.batch)
    L.seed_everything(0, verbose=False)
    module = TinyCausalLM(vocab=ADDITION_VOCAB, max_len=12, d_model=z.d_model, n_layers=z.layers, n_heads=z.heads,
                          lr=3e-3, warmup=1)
    callback = POLCACallback(store=store, probe_data=probe, hessian_data=addition_batches(z.hessian, 2, z.batch),
                             snapshot_every=2, basis_every=4, k=1, max_basis=3, basis_on_device=False,
                             analyze=False, progress=False)
    trainer = L.Trainer(max_steps=z.fit_steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=s.workdir,
                        accelerator="gpu" if s.cuda else "cpu", devices=1)
    start = time.perf_counter()
    trainer.fit(module, DataLoader(addition_batches(64 * z.fit_steps, 0, 64), batch_size=None))
    basis = callback.tracker.basis
    out = {"fit_s": time.perf_counter() - start, "model_device": str(module.device), "basis_device": str(basis.device),
           "basis_pinned": basis.is_pinned()}
    checks.holds("callback: the basis lives in host memory, pinned exactly where CUDA is",
                 basis.device.type == "cpu" and basis.is_pinned() == s.cuda)
    ds = open_store(store)
    ref_model = TinyCausalLM(vocab=ADDITION_VOCAB, max_len=12, d_model=z.d_model, n_layers=z.layers,
                             n_heads=z.heads).double()
    space = ParameterSpace.of_store(ref_model, ds, "the check")
    B = torch.from_numpy(ds["basis_vectors"].values).to(F64)  # [K, d]
    dd = DirectionalDerivatives(ref_model, causal_lm_token_loss, space, engine="forward")
    errors = []
    for i in range(ds.sizes["snapshot"]):
        theta = torch.from_numpy(ds["weights"][i].values).to(F64)
        errors.append(rel(torch.from_numpy(ds["directional_grad"][i].values), dd(theta, probe, B).g))
    gram = B @ B.T - torch.eye(B.shape[0], dtype=F64)
    out |= {"snapshots": ds.sizes["snapshot"], "basis": ds.sizes["basis"], "g_vs_cpu_float64": max(errors),
            "basis_orthonormality": float(gram.abs().max())}
    checks.bound("callback: every stored g against the CPU in float64 from the stored weights and basis",
                 out["g_vs_cpu_float64"], check_rtol("float32", space.dim),
                 why="the derivatives were computed in float32 on the device, backfilled ones included")
    checks.bound("callback: stored basis max |B Bᵀ - I|", out["basis_orthonormality"], 1e-5,
                 why="re-orthonormalised in float64, stored in float32")
    return out


# ---------------------------------------------------------------- a. precision scopes
def check_precision(s: Setting) -> dict:
    """``compute_precision`` float32, tf32 and bf16 on the device against the CPU in float64."""
    m, z, checks = s.small, s.sizes, Checks()
    d = m.space.dim
    V64 = orthonormal(z.k, d, seed=2)
    ref = DirectionalDerivatives(m.model64, causal_lm_token_loss, m.space, engine="forward")(
        m.theta64, m.probe_cpu, V64, curvature=True)
    V = V64.float().to(s.device)
    tol32 = check_rtol("float32", d)
    out = {"cuda_check": s.cuda, "d": d, "k": z.k, "tokens": int(ref.g.shape[1])}
    got = {}
    for precision in PRECISIONS:
        for engine in ("forward", "reverse"):
            dd = DirectionalDerivatives(m.model_dev, causal_lm_token_loss, m.space, engine=engine,
                                        compute_precision=precision)

            def call(dd=dd, engine=engine):
                return dd(m.theta_dev, m.probe_dev, V, curvature=engine == "forward")

            if precision == "float32":  # as after a training script's torch.set_float32_matmul_precision("high")
                with cuda_tf32(True):
                    before = tf32_flags()
                    res = call()
                    after = tf32_flags()
                checks.holds(f"{engine}: the CUDA TF32 flags the training set are restored after the float32 scope",
                             before == after)
            else:
                res = call()
            fig = {"g": rel(res.g, ref.g), "loss": rel(res.loss, ref.loss), "seconds": seconds(call, s.device)}
            if res.c is not None:
                fig["c"] = rel(res.c, ref.c)
            got[precision, engine] = res
            out[f"{precision}_{engine}"] = fig
            for q in ("g", "c"):
                if q not in fig:
                    continue
                name = f"{precision} {engine}: {q} against the CPU in float64"
                if precision == "float32":
                    checks.bound(name, fig[q], tol32, why="float32 rounding, with TF32 on outside the scope")
                elif precision == "tf32" and s.cuda:
                    checks.bound(name, fig[q], 1e-2, 1e-5, why="TF32's 10-bit mantissa (unit roundoff 4.9e-4): above "
                                 "1e-5 shows TF32 in use, below 1e-2 is the engine's TF32 check tolerance")
                elif precision == "bf16":
                    checks.bound(name, fig[q], 5e-2, 1e-3, why="bfloat16's 8-bit mantissa under autocast: measured "
                                 "0.8-1.6e-2 on CPU (benchmarks/precision.py); above 1e-3 shows autocast in use")
            checks.bound(f"{precision} {engine}: the loss against the CPU in float64", fig["loss"], 1e-5,
                         why="the loss is computed in float32 whatever the precision")
    if not s.cuda:
        for engine in ("forward", "reverse"):
            checks.holds(f"tf32 {engine} without CUDA is float32 exactly",
                         torch.equal(got["tf32", engine].g, got["float32", engine].g))
    # bf16 on the CPU, for scale: how far the device's bf16 lies from the CPU's
    cpu = DirectionalDerivatives(copy.deepcopy(m.model64).float(), causal_lm_token_loss, m.space, engine="forward",
                                 compute_precision="bf16")(m.theta64.float(), m.probe_cpu, V64.float())
    out["bf16_forward_device_vs_cpu_bf16"] = rel(got["bf16", "forward"].g, cpu.g)
    out["bf16_forward_cpu_vs_cpu_float64"] = rel(cpu.g, ref.g)
    out["checks"] = checks
    return out


# ------------------------------------------------------------- a. streamed eigensolver
def check_eigensolver(s: Setting) -> dict:
    """Two basis steps of the projected Lanczos on the device, its Krylov vectors and results in
    host memory and every product chunked to 1 MiB, in float64 and float32, against the CPU in
    float64 with its default chunks."""
    m, z, checks = s.small, s.sizes, Checks()
    d, k = m.space.dim, z.eig_k

    def hvp_on(model, theta, batches):
        hvp = FunctionalTokenLoss(model, causal_lm_token_loss, m.space).mean_loss_hvp(theta, batches)

        def call(v):
            with evaluation_mode(model):  # the math attention kernel: double backward goes through it
                return hvp(v)

        return call

    hvp64 = hvp_on(m.model64, m.theta64, m.hessian_cpu)
    start = time.perf_counter()
    ref1 = projected_hessian_eigs(hvp64, d, k, tol=1e-6, dtype=F64)
    ref2 = projected_hessian_eigs(hvp64, d, k, ref1.eigenvectors, tol=1e-6, dtype=F64, seed=1)
    out = {"cuda_check": s.cuda, "d": d, "k": k, "cpu_float64_seconds": time.perf_counter() - start,
           "eigenvalues_cpu_float64": [ref1.eigenvalues.tolist(), ref2.eigenvalues.tolist()]}
    model64_dev = copy.deepcopy(m.model64).to(s.device)
    runs = (("float64", model64_dev, m.theta64.to(s.device), F64, 1e-6),
            ("float32", m.model_dev, m.theta_dev, torch.float32, 1e-4))
    for name, model, theta, dtype, tol in runs:
        hvp = hvp_on(model, theta, m.hessian_dev)
        kw = dict(tol=tol, dtype=dtype, device=s.device, storage_device="cpu", memory_cap=1 << 20)
        start = time.perf_counter()
        r1 = projected_hessian_eigs(hvp, d, k, **kw)
        r2 = projected_hessian_eigs(hvp, d, k, r1.eigenvectors, seed=1, **kw)
        sync(s.device)
        fig = {"seconds": time.perf_counter() - start, "n_hvp": [r1.n_hvp, r2.n_hvp], "tol": tol,
               "eigenvectors_device": str(r1.eigenvectors.device), "pinned": r1.eigenvectors.is_pinned()}
        checks.holds(f"{name}: eigenvectors in host memory, pinned exactly where CUDA is",
                     r1.eigenvectors.device.type == "cpu" and r1.eigenvectors.is_pinned() == s.cuda)
        B = r1.eigenvectors.to(F64)
        for step, (res, want, basis) in enumerate(((r1, ref1, None), (r2, ref2, B))):
            V, lam = res.eigenvectors.to(F64), res.eigenvalues.to("cpu", F64)
            scale = want.eigenvalues.abs().max()
            hv = torch.stack([hvp64(v) for v in V])  # [k, d] H v in float64 on the CPU
            if basis is not None:
                hv = hv - (hv @ basis.T) @ basis  # P H v (v is orthogonal to B already)
            residual = (hv - lam[:, None] * V).norm(dim=1).max() / scale
            ortho = (V @ V.T - torch.eye(k, dtype=F64)).abs().max()
            if basis is not None:
                ortho = torch.maximum(ortho, (V @ basis.T).abs().max())
            fig[f"step{step}"] = {
                "eigenvalues": lam.tolist(),
                "eigenvalue_error": float((lam - want.eigenvalues).abs().max() / scale),
                "subspace_cosine": float(torch.linalg.svdvals(V @ want.eigenvectors.T).min()),
                "residual": float(residual), "orthonormality": float(ortho)}
            f = fig[f"step{step}"]
            floor = 1e-5 if dtype == torch.float32 else 0.0  # float32 HVPs: H itself differs by ~1e-6
            checks.bound(f"{name} step {step}: eigenvalues against the CPU in float64, relative to the largest",
                         f["eigenvalue_error"], 2 * tol + floor,
                         why="both solves stop at a relative residual of tol, and |λ - θ| <= ||r||")
            checks.bound(f"{name} step {step}: residual ||P H P v - λ v|| / max|λ| by float64 HVPs on the CPU",
                         f["residual"], 10 * tol + floor, why="the solver's own residual estimate is below tol")
            checks.bound(f"{name} step {step}: orthonormality (to each other and to the basis)", f["orthonormality"],
                         1e-5 if dtype == torch.float32 else 1e-10,
                         why="re-orthogonalised in float64; float32 rows keep ~1e-7")
        out[name] = fig
    out["checks"] = checks
    return out
