"""POLCACallback end to end on tiny runs: recomputed independently, crash and resume, bad input."""


import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from _tiny import AdditionModule, batches, tiny_lm
from polca_lightning import POLCACallback, open_store
from polca_lightning.core.engine import EngineError
from polca_lightning.core.functional import FunctionalTokenLoss, ParameterSpace, evaluation_mode
from polca_lightning.core.losses import causal_lm_token_loss
from polca_lightning.store import StoreExistsError


def trainer(tmp_path, max_steps, callbacks, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(
        default_root_dir=tmp_path, max_steps=max_steps, callbacks=callbacks, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", devices=1, **kw,
    )


def polca(tmp_path, name="polca.zarr", **kw):
    kw.setdefault("probe_data", batches(24, 12, seed=1, labels=True))
    kw.setdefault("hessian_data", batches(32, 16, seed=2))
    kw.setdefault("token_labels", lambda b: {"carry": b["carry"], "place": b["place"]})
    kw.setdefault("snapshot_every", 2)
    kw.setdefault("basis_every", 4)
    kw.setdefault("k", 2)
    kw.setdefault("max_basis", 5)
    kw.setdefault("analyze", False)
    kw.setdefault("progress", False)
    kw.setdefault("store", tmp_path / name)  # or a URL
    return POLCACallback(**kw)


TRAIN = DataLoader(batches(80, 16, seed=0), batch_size=None)  # 5 batches per epoch


def test_store_matches_an_independent_float64_recomputation(tmp_path):
    cb = polca(tmp_path, order="trapezoid")
    module = AdditionModule()
    trainer(tmp_path, 10, [cb]).fit(module, TRAIN)
    ds = open_store(cb.store).load()
    assert ds.attrs["complete"] and ds.sizes["snapshot"] == 6 and ds.sizes["basis"] == 5
    assert ds["step"].values.tolist() == [0, 2, 4, 6, 8, 10]
    assert ds["basis_step"].values.tolist() == [0, 0, 4, 4, 8]
    for name in ("loss", "directional_grad", "delta", "polca", "polca_first", "basis_vectors", "weights"):
        assert not np.isnan(ds[name].values).any(), name

    B = torch.from_numpy(ds["basis_vectors"].values).double()  # [K, d]
    assert torch.allclose(B @ B.T, torch.eye(B.shape[0], dtype=torch.float64), atol=1e-5)

    # an independent recomputation: float64 copy of the model, one autograd.grad per token
    ref = tiny_lm(d_model=8)
    space = ParameterSpace.from_module(ref)
    assert [list(s) for s in space.shapes] == [s for _, s in ds.attrs["parameters"]]
    fn = FunctionalTokenLoss(ref, causal_lm_token_loss, space)
    probe = cb.probe_batches
    W = torch.from_numpy(ds["weights"].values).double()  # [S, d]
    grads, losses = [], []
    with evaluation_mode(ref):
        for theta in W:
            t = theta.clone().requires_grad_(True)
            per_token = torch.cat([fn(t, b)[0][fn(t, b)[1]] for b in probe])
            losses.append(per_token.detach())
            grads.append(torch.stack([torch.autograd.grad(l, t, retain_graph=True)[0] for l in per_token]))
    losses, grads = torch.stack(losses), torch.stack(grads)  # [S, T], [S, T, d]

    def close(stored, expected, what):
        stored = torch.from_numpy(np.asarray(stored)).double()
        err = (stored - expected).abs().max() / expected.abs().max()
        assert err <= 1e-4, f"{what}: relative error {err:.2e}"

    close(ds["loss"].values, losses, "loss")
    g = torch.einsum("std,kd->skt", grads, B)  # [S, K, T]
    close(ds["directional_grad"].values, g, "directional_grad")
    delta = (W[1:] - W[:-1]) @ B.T  # [I, K]
    close(ds["delta"].values, delta, "delta")
    close(ds["polca_first"].values, g[:-1] * delta[:, :, None], "polca_first")
    close(ds["polca"].values, 0.5 * (g[:-1] + g[1:]) * delta[:, :, None], "polca (trapezoid)")
    # token coordinates
    carry = torch.cat([b["carry"][b["labels"] != -100] for b in probe]).numpy()
    assert (ds["carry"].values == carry).all() and (ds["position"].values[:4] == [8, 9, 10, 11]).all()

    # each Hessian vector satisfies its eigen-equation for P H P at its basis step
    hessian = cb.hessian_batches
    steps = ds["step"].values.tolist()
    for row in range(B.shape[0]):
        s = int(ds["basis_step"][row])
        theta = W[steps.index(s)]
        hvp = fn.mean_loss_hvp(theta, hessian)
        earlier = B[ds["basis_step"].values < s]  # P projects out the basis before this step
        P = lambda v: v - earlier.T @ (earlier @ v) if len(earlier) else v  # noqa: E731
        with evaluation_mode(ref):
            b = B[row]
            lam = float(ds["eigenvalue"][row])
            residual = (P(hvp(P(b))) - lam * b).norm().item() / abs(lam)
        print(f"basis vector {row} (step {s}): eigenvalue {lam:.4g}, relative residual {residual:.2e}")
        assert residual < 5e-3


def test_crash_then_resume_equals_an_uninterrupted_run(tmp_path):
    ref_cb = polca(tmp_path, "ref.zarr")
    trainer(tmp_path / "ref", 14, [ref_cb]).fit(AdditionModule(), TRAIN)

    class Crash(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 13:
                raise RuntimeError("simulated crash")

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    cb = polca(tmp_path, "run.zarr")
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "run", 14, [cb, ckpt, Crash()], enable_checkpointing=True).fit(AdditionModule(), TRAIN)
    crashed = open_store(cb.store)
    assert not crashed.attrs["complete"] and crashed.sizes["snapshot"] >= 6  # up to step 12 (after a flush)

    resumed = polca(tmp_path, "run.zarr", mode="a")
    path = tmp_path / "ckpt" / "epoch=1-step=10.ckpt"  # saved at step 10, data order continues exactly
    trainer(tmp_path / "run", 14, [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")], enable_checkpointing=True).fit(
        AdditionModule(seed=5), TRAIN, ckpt_path=path
    )
    a, b = open_store(ref_cb.store).load(), open_store(resumed.store).load()
    assert b.attrs["complete"] and a.sizes == b.sizes
    # the engine choice is made from timings, so two independent runs may use different
    # engines for some K: equal to float32 rounding of each variable's scale
    for name in a.variables:
        scale = float(np.abs(a[name].values).max()) if a[name].size else 0.0
        np.testing.assert_allclose(b[name].values, a[name].values, rtol=1e-5, atol=1e-6 * scale + 1e-9, err_msg=name)
    # the resumed run makes the crashed run's engine choices: its measured costs come from the checkpoint
    saved = torch.load(path, weights_only=False)["callbacks"][resumed.state_key]["engine_calibration"]
    assert saved and resumed.tracker.dd.calibration == saved


def test_resume_refuses_changed_settings_and_new_stores_refuse_existing(tmp_path):
    cb = polca(tmp_path)
    trainer(tmp_path, 4, [cb]).fit(AdditionModule(), TRAIN)
    module = AdditionModule()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(StoreExistsError, match="mode='a' to resume"):
        trainer(tmp_path, 4, [polca(tmp_path)]).fit(module, TRAIN)
    with pytest.raises(ValueError, match="k"):
        trainer(tmp_path, 4, [polca(tmp_path, mode="a", k=3)]).fit(module, TRAIN)
    with pytest.raises(RuntimeError, match="did not resume from a checkpoint"):
        trainer(tmp_path, 4, [polca(tmp_path, mode="a")]).fit(module, TRAIN)
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters()))  # training never started


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    cb = polca(tmp_path, snapshot_every=2, basis_every=4, max_basis=2)
    trainer(tmp_path, 6, [cb], accumulate_grad_batches=2).fit(AdditionModule(), TRAIN)
    ds = open_store(cb.store)
    assert ds["step"].values.tolist() == [0, 2, 4, 6]


def test_random_and_callable_bases_are_orthonormalised(tmp_path):
    def first_coordinates(module, step, basis):
        d = sum(p.numel() for p in module.parameters())
        return torch.roll(torch.eye(2, d) + 0.5, step, dims=1)  # not orthonormal: the callback makes it so

    for basis in ("random", first_coordinates):
        cb = polca(tmp_path, f"{getattr(basis, '__name__', basis)}.zarr", basis=basis, max_basis=4)
        trainer(tmp_path, 4, [cb]).fit(AdditionModule(), TRAIN)
        ds = open_store(cb.store)
        B = ds["basis_vectors"].values.astype(np.float64)
        np.testing.assert_allclose(B @ B.T, np.eye(4), atol=1e-5)
        assert np.isnan(ds["eigenvalue"].values).all()

    def the_same_again(module, step, basis):
        return torch.ones(1, sum(p.numel() for p in module.parameters()))

    with pytest.raises(ValueError, match="linearly dependent"):
        trainer(tmp_path, 4, [polca(tmp_path, "same.zarr", basis=the_same_again, k=1)]).fit(AdditionModule(), TRAIN)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"probe_data": []}, ValueError, "probe_data: expected at least one batch"),
        ({"probe_data": torch.zeros(3)}, TypeError, "probe_data: expected a DataLoader"),
        ({"snapshot_every": 0}, ValueError, "snapshot_every: expected a positive int, got 0"),
        ({"basis_every": 5}, ValueError, "basis_every: expected a multiple of snapshot_every"),
        ({"order": "third"}, ValueError, "order: expected one of"),
        ({"mode": "r"}, ValueError, "mode: expected 'w-'"),
        ({"basis": "pca"}, ValueError, "basis: expected 'hessian', 'random' or a callable"),
        ({"hessian_data": None}, ValueError, "hessian_data: expected a DataLoader"),
        ({"token_labels": "carry"}, TypeError, "token_labels: expected a callable"),
        ({"decode_target": "words"}, TypeError, "decode_target: expected a callable token_id -> str"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        polca(tmp_path, **kwargs)


def _untouched(module, before):
    return all(torch.equal(a, b) for a, b in zip(before, module.parameters()))


def test_bad_input_fails_before_training(tmp_path):
    masked = batches(8, 8, seed=1)
    for b in masked:
        b["labels"][:] = -100
    cases = [
        (dict(probe_data=masked, token_labels=None), ValueError, "every token is masked"),
        (dict(token_loss=lambda m, b: (m(b["input_ids"]).sum(-1).flatten(), b["labels"] != -100)), ValueError, r"\[batch, positions\]"),
        (dict(token_labels=lambda b: {"carry": b["carry"][:, :3]}), ValueError, "token_labels: expected 'carry'"),
    ]
    for i, (kwargs, error, message) in enumerate(cases):
        module = AdditionModule()
        before = [p.detach().clone() for p in module.parameters()]
        with pytest.raises(error, match=message):
            trainer(tmp_path, 4, [polca(tmp_path, f"bad{i}.zarr", **kwargs)]).fit(module, TRAIN)
        assert _untouched(module, before)
        assert not (tmp_path / f"bad{i}.zarr").exists()  # refused before the store was created


def test_read_only_store_path_fails_before_training(tmp_path):
    (tmp_path / "a_file").write_text("not a directory")
    module = AdditionModule()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(NotADirectoryError):
        trainer(tmp_path, 4, [POLCACallback(tmp_path / "a_file" / "polca.zarr", batches(8, 8, 1), batches(8, 8, 2))]).fit(module, TRAIN)
    assert _untouched(module, before)


def test_an_op_no_engine_can_differentiate_fails_before_training(tmp_path):
    class OpaqueModule(AdditionModule):
        def forward(self, input_ids):  # zeta has no derivative in its first argument, in either mode
            return torch.special.zeta(2.0 + torch.nn.functional.softplus(self.net(input_ids)), torch.tensor(1.0))

    module = OpaqueModule()
    before = [p.detach().clone() for p in module.parameters()]
    cb = polca(tmp_path)
    with pytest.raises(EngineError, match="op zeta.*no derivative in torch"):
        trainer(tmp_path, 4, [cb]).fit(module, TRAIN)
    assert _untouched(module, before)
    assert not cb.store.exists()  # nothing left behind to refuse the next attempt


def test_non_finite_probe_losses_are_recorded_as_nan_and_training_goes_on(tmp_path):
    def poisoned(module, batch):
        loss, mask, target = causal_lm_token_loss(module, batch)
        bad = (batch["input_ids"][:, :1] == 3) & (torch.arange(loss.shape[1]) == 9)  # some sequences, one place
        return torch.where(bad, torch.full_like(loss, float("nan")), loss), mask, target

    cb = polca(tmp_path, token_loss=poisoned)
    with pytest.warns(RuntimeWarning, match="not finite") as record:
        t = trainer(tmp_path, 6, [cb])
        t.fit(AdditionModule(), TRAIN)
    assert t.global_step == 6
    assert sum("not finite" in str(w.message) for w in record) == 1  # warned once
    ds = open_store(cb.store)
    nan_tokens = np.isnan(ds["loss"].values).any(0)
    assert 0 < nan_tokens.sum() < ds.sizes["token"]
    assert np.isnan(ds["polca"].values[:, :, nan_tokens]).all()
    assert not np.isnan(ds["polca"].values[:, :, ~nan_tokens]).any()


def test_sharded_strategies_are_refused():
    cb = POLCACallback("unused.zarr", batches(8, 8, 1), batches(8, 8, 2))

    class FSDPStrategy:  # the name is what the callback checks
        pass

    fake = type("T", (), {"strategy": FSDPStrategy(), "global_rank": 0})()
    with pytest.raises(RuntimeError, match="FSDPStrategy strategy shards parameters"):
        cb.setup(fake, None, "fit")


def test_lca_baseline_matches_per_token_gradients_of_the_largest_parameters(tmp_path):
    from polca_lightning.lca import lca_baseline

    cb = polca(tmp_path, max_basis=2, lca_directions=0)
    module = AdditionModule()
    trainer(tmp_path, 6, [cb]).fit(module, TRAIN)
    chosen = lca_baseline(cb.store, module, causal_lm_token_loss, cb.probe_batches, 3)
    ds = open_store(cb.store).load()
    W = torch.from_numpy(ds["weights"].values).double()  # [S, d]
    assert sorted(chosen.tolist()) == sorted(W[-1].abs().topk(3).indices.tolist())
    assert ds["lca_parameter"].values.tolist() == chosen.tolist() and ds["lca_polca"].attrs["order"] == "trapezoid"
    ref = tiny_lm(d_model=8)
    space = ParameterSpace.from_module(ref)
    fn = FunctionalTokenLoss(ref, causal_lm_token_loss, space)
    with evaluation_mode(ref):
        g = []
        for theta in W:
            t = theta.clone().requires_grad_(True)
            per_token = torch.cat([fn(t, b)[0][fn(t, b)[1]] for b in cb.probe_batches])
            grads = torch.stack([torch.autograd.grad(l, t, retain_graph=True)[0] for l in per_token])  # [T, d]
            g.append(grads[:, chosen].T)  # [n, T]
    g = torch.stack(g)  # [S, n, T]
    delta = W[1:, chosen] - W[:-1, chosen]  # [I, n]
    expected = 0.5 * (g[:-1] + g[1:]) * delta[:, :, None]
    got = torch.from_numpy(ds["lca_polca"].values).double()
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_tracker_timings_count_nested_work_once():
    import time

    from polca_lightning.tracker import POLCATracker

    tracker = POLCATracker.__new__(POLCATracker)  # only the timer is exercised
    tracker.timings, tracker._nested = {"outer": 0.0, "io": 0.0}, []
    start = time.perf_counter()
    with tracker._timed("outer"):
        time.sleep(0.05)
        with tracker._timed("io"):
            time.sleep(0.05)
    wall = time.perf_counter() - start
    assert tracker.timings["io"] >= 0.05 and tracker.timings["outer"] >= 0.05
    assert tracker.timings["outer"] + tracker.timings["io"] <= wall + 1e-6  # not 0.15 s: the I/O counted once
