"""The causal check on a constructed case: a direction that only some tokens can feel.

The model has two separate linear heads; a token of group 0 is classified by head ``a``,
a token of group 1 by head ``b``. A basis vector supported on ``a``'s parameters can
only change group-0 losses. The basis is given (a ``basis`` callable) so that every
vector lies in exactly one head.
"""

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from polca_lightning import POLCACallback, ablate_directions, open_store
from polca_lightning.ablation import ablated_parameters, ablation_figure, ablation_summary, ablation_table
from polca_lightning.cli import main as cli
from polca_lightning.report import open_analysed_store

N_IN, N_OUT = 6, 3


class TwoHeads(L.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(N_IN, N_OUT)
        self.b = nn.Linear(N_IN, N_OUT)

    def logits(self, batch):
        x, group = batch["x"], batch["group"]
        return torch.where(group[:, None] == 0, self.a(x), self.b(x))

    def token_loss(self, batch):
        loss = F.cross_entropy(self.logits(batch), batch["y"], reduction="none")
        return loss[:, None], torch.ones_like(loss, dtype=torch.bool)[:, None], batch["y"][:, None]

    def training_step(self, batch, _):
        return self.token_loss(batch)[0].mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def data(n, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, N_IN, generator=g)
    group = torch.randint(0, 2, (n,), generator=g)
    w = torch.randn(2, N_IN, N_OUT, generator=torch.Generator().manual_seed(99))  # the same teacher
    y = torch.einsum("ni,nio->no", x, w[group]).argmax(1)
    return [{"x": x[i:i + 50], "group": group[i:i + 50], "y": y[i:i + 50]} for i in range(0, n, 50)]


D_A = N_IN * N_OUT + N_OUT  # a.weight, a.bias come first in named_parameters()


def head_directions(module, step, basis):
    """Vector k lies in head a for even k, in head b for odd k."""
    k = 0 if basis is None else basis.shape[0]
    rng = np.random.default_rng(k)
    v = torch.zeros(1, 2 * D_A, dtype=torch.float64)
    sl = slice(0, D_A) if k % 2 == 0 else slice(D_A, 2 * D_A)
    v[0, sl] = torch.from_numpy(rng.normal(size=D_A))
    return v


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("ablation") / "polca.zarr"
    probe = data(400, seed=1)
    module = TwoHeads()
    cb = POLCACallback(store=path, probe_data=probe, basis=head_directions, snapshot_every=5, basis_every=5,
                       max_basis=4, token_labels=lambda batch: {"group": batch["group"][:, None]},
                       analysis_kwargs={"min_cluster_size": 20, "min_samples": 5}, progress=False)
    trainer = L.Trainer(max_steps=40, callbacks=[cb], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, DataLoader(data(2000, seed=2), batch_size=None))
    return path, module, probe


def reference_loss(theta, probe):
    """Per-token loss at flat parameters ``theta``, in float64, written out by hand."""
    theta = torch.as_tensor(theta, dtype=torch.float64)
    heads = []
    for h in range(2):
        p = theta[h * D_A:(h + 1) * D_A]
        heads.append((p[: N_IN * N_OUT].reshape(N_OUT, N_IN), p[N_IN * N_OUT:]))
    out = []
    for batch in probe:
        x, group, y = batch["x"].double(), batch["group"], batch["y"]
        logits = torch.stack([x @ w.T + c for w, c in heads])[group, torch.arange(len(y))]
        out.append(torch.logsumexp(logits, 1) - logits[torch.arange(len(y)), y])
    return torch.cat(out).numpy()


def test_a_vector_changes_only_the_tokens_that_depend_on_it(run):
    path, _, probe = run
    ds = open_store(path)
    assert ds.sizes["basis"] == 4 and "ablation_loss_change" in ds  # the callback ran it after fit
    change = ds["ablation_loss_change"].values
    group = ds["group"].values
    basis, weights = ds["basis_vectors"].values, ds["weights"].values
    for v in range(4):
        own = 0 if v % 2 == 0 else 1
        assert np.all(basis[v, own * D_A:(own + 1) * D_A] != 0)
        # the other head's tokens cannot feel this vector: their loss is bit for bit the same
        assert np.all(change[v, group != own] == 0.0), v
        assert np.abs(change[v, group == own]).mean() > 1e-3, v
        # against float64 losses computed by hand at theta_end - <theta_end - theta_0, b> b
        alpha = np.dot(weights[-1].astype(np.float64) - weights[0], basis[v].astype(np.float64))
        assert ds["ablation_coefficient"].values[v] == pytest.approx(alpha, rel=1e-6)
        expected = reference_loss(weights[-1] - alpha * basis[v].astype(np.float64), probe) - reference_loss(
            weights[-1], probe)
        np.testing.assert_allclose(change[v], expected, atol=2e-5)
    np.testing.assert_allclose(ds["ablation_end_loss"].values, reference_loss(weights[-1], probe), atol=2e-5)
    np.testing.assert_allclose(ds["ablation_end_loss"].values, ds["loss"].values[-1], atol=1e-6)
    # no W&B logger: the report folder beside the store has the tables and a figure per kept vector
    folder = path.with_name(path.name + ".report")
    assert (folder / "ablation.csv").exists() and (folder / "ablation_summary.csv").exists()
    ds = open_analysed_store(path)
    kept = np.flatnonzero(ds["kept"].values)
    clustered = [u for u in kept if (ds["cluster_size"].values[u] > 0).any()]  # no blank figures for the others
    assert clustered and all((folder / f"vector_{u:02d}_ablation.png").exists() for u in clustered)
    assert not any((folder / f"vector_{u:02d}_ablation.png").exists() for u in set(range(4)) - set(clustered))


def test_undoing_every_basis_vector_of_a_complete_basis_restores_theta_0():
    torch.manual_seed(0)
    d = 7
    theta_0, theta_end = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0].T
    theta = theta_end
    for b in basis:  # undo each direction's movement in turn: the others' are orthogonal to it
        theta = ablated_parameters(theta_0, theta, b)
    torch.testing.assert_close(theta, theta_0)
    one = ablated_parameters(theta_0, theta_end, basis[0])
    torch.testing.assert_close(torch.dot(one - theta_0, basis[0]), torch.tensor(0.0, dtype=torch.float64))
    torch.testing.assert_close((one - theta_end) @ basis[1:].T, torch.zeros(d - 1, dtype=torch.float64))


def test_table_means_match_the_tokens(run):
    path, _, _ = run
    ds = open_analysed_store(path)
    table = ablation_table(ds, units=[0, 1, 2, 3])
    col = {c: i for i, c in enumerate(table.columns)}
    change = ds["ablation_loss_change"].values
    group = ds["group"].values
    for row in table.rows:
        u, c = row[col["vector"]], row[col["cluster"]]
        cl = ds["cluster"].values[u]
        sel = np.ones_like(cl, bool) if c is None else cl == c
        assert row[col["size"]] == sel.sum()
        assert row[col["loss_change"]] == pytest.approx(change[u, sel].mean(), rel=1e-5, abs=1e-9)
        assert row[col["polca_total"]] == pytest.approx(ds["polca"].values[:, u, sel].sum(0).mean(), rel=1e-4,
                                                        abs=1e-7)
        if c is not None and c >= 0 and np.all(group[sel] != u % 2):
            assert row[col["loss_change"]] == 0.0  # a cluster of the other head's tokens
    with_group = ablation_table(ds, units=[0], labels="group")
    gcol = {c: i for i, c in enumerate(with_group.columns)}
    for row in with_group.rows:
        cl = ds["cluster"].values[0]
        sel = np.ones_like(cl, bool) if row[gcol["cluster"]] is None else cl == row[gcol["cluster"]]
        share = max(np.mean(group[sel] == 0), np.mean(group[sel] == 1))
        assert row[gcol["group_share"]] == pytest.approx(share)
    fig = ablation_figure(ds, 0)
    bars = [p for p in fig.axes[0].patches if p.get_gid() == "ablation"]
    rows0 = [row for row in table.rows if row[col["vector"]] == 0]
    np.testing.assert_allclose([b.get_height() for b in bars], [r[col["loss_change"]] for r in rows0])
    summary = ablation_summary(ds, units=[0, 1, 2, 3])
    assert [r[0] for r in summary.rows] == [0, 1, 2, 3]
    for r in summary.rows:
        assert r[summary.columns.index("mean_loss_change")] == pytest.approx(change[r[0]].mean(), rel=1e-5)


def test_cli_prints_the_tables_and_explains_a_store_without_ablation(run, tmp_path, capsys):
    path, module, probe = run
    assert cli(["ablate", str(path), "--vectors", "0", "1", "--labels", "group", "--csv", str(tmp_path / "t.csv")]) == 0
    out = capsys.readouterr().out
    assert "vector 0" in out and "vector 1" in out and "most affected" in out and "group_share" in out
    assert (tmp_path / "t.csv").read_text().startswith("vector,coefficient,tokens,cluster")
    assert cli(["ablate", str(path), "--vectors", "9"]) == 2
    assert "vector 9 was not ablated" in capsys.readouterr().err

    import shutil
    import zarr

    copy = tmp_path / "copy.zarr"
    shutil.copytree(path, copy)
    group = zarr.open_group(copy, mode="r+", use_consolidated=False)
    for name in ("ablation_loss_change", "ablation_coefficient", "ablation_end_loss"):
        del group[name]
    assert cli(["ablate", str(copy)]) == 2
    assert "holds no ablation" in capsys.readouterr().err
    # the function computes it again, the same
    out = ablate_directions(copy, module, lambda m, b: type(m).token_loss(m, b), probe, vectors=[1])
    np.testing.assert_array_equal(np.isnan(out["loss_change"]).all(1), [True, False, True, True])
    np.testing.assert_allclose(out["loss_change"][1], open_store(path)["ablation_loss_change"].values[1], atol=1e-7)


def test_bad_inputs_are_named(run):
    path, module, probe = run
    token_loss = lambda m, b: type(m).token_loss(m, b)  # noqa: E731
    with pytest.raises(ValueError, match="vectors"):
        ablate_directions(path, module, token_loss, probe, vectors=[7], write=False)
    with pytest.raises(ValueError, match="probe_batches"):
        ablate_directions(path, module, token_loss, probe[:2], write=False)
    with pytest.raises(ValueError, match="parameter"):
        ablate_directions(path, nn.Linear(3, 2), token_loss, probe, write=False)
