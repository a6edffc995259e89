"""Probe and Hessian data as users hold them: lists of examples are collated, anything that is
not a batch is refused before training with a message naming the argument."""

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from _tiny import AdditionModule, batches
from polca_lightning import POLCACallback, open_store
from polca_lightning.core.losses import causal_lm_token_loss
from polca_lightning.data import EXAMPLES_PER_BATCH, as_batches, collate_examples
from polca_lightning.toy import addition_data


def rows(n, seed, labels=False):
    """The examples of ``batches(n, ..., seed)``: one dict of 1-D tensors per sequence."""
    data = addition_data(n, seed=seed)
    keys = ["input_ids", "labels"] + (["carry", "place"] if labels else [])
    return [{k: data[k][i] for k in keys} for i in range(n)]


def test_a_list_of_example_dicts_is_collated_in_order_batch_size_at_a_time():
    got = as_batches("probe_data", rows(20, seed=1), batch_size=8)
    want = batches(20, 8, seed=1)  # slices of the same tensors
    assert [len(b["input_ids"]) for b in got] == [8, 8, 4]
    for g, w in zip(got, want):
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)
    assert len(as_batches("probe_data", rows(20, seed=1))) == -(-20 // EXAMPLES_PER_BATCH)  # the default


def test_tuples_of_tensors_token_id_lists_and_dataset_rows_are_examples_too():
    data = addition_data(6, seed=3)
    ids, labels = data["input_ids"], data["labels"]
    pairs = as_batches("probe_data", tuple((ids[i], labels[i]) for i in range(6)), batch_size=4)
    assert [torch.equal(p[0], ids[s]) and torch.equal(p[1], labels[s]) for p, s in
            zip(pairs, [slice(0, 4), slice(4, 6)])] == [True, True]
    lists = as_batches("probe_data", ids.tolist())  # token ids as Python lists: a [6, 12] batch
    assert len(lists) == 1 and torch.equal(lists[0], ids)
    hf_rows = [{"input_ids": ids[i].tolist(), "labels": labels[i].tolist()} for i in range(6)]  # a 🤗 dataset's rows
    (batch,) = as_batches("probe_data", hf_rows)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["labels"], labels)
    x, y = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    (xy,) = as_batches("probe_data", [(x[i], int(y[i])) for i in range(5)])  # a classifier's (features, class)
    assert torch.equal(xy[0], x) and torch.equal(xy[1], y)
    (again,) = as_batches("probe_data", TensorDataset(x, y))  # a dataset is examples
    assert torch.equal(again[0], x) and torch.equal(again[1], y)
    assert collate_examples([[1, 2], [3, 4]]).tolist() == [[1, 2], [3, 4]]


def test_batches_are_kept_as_they_come():
    given = batches(24, 12, seed=1)
    assert as_batches("probe_data", given) is not given and as_batches("probe_data", given) == given
    loader = DataLoader(TensorDataset(addition_data(8, seed=1)["input_ids"]), batch_size=4)
    assert [b[0].shape for b in as_batches("probe_data", loader)] == [torch.Size([4, 12])] * 2
    classifier = [(torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0]))]  # 1-D labels beside 2-D inputs
    assert as_batches("probe_data", classifier) == classifier


@pytest.mark.parametrize("data, message", [
    (lambda: iter(rows(4, seed=1)),  # a generator of examples
     r"^probe_data\[0\]\['input_ids'\] has 1 dimension; a batch is \[batch, positions\] \(a batch dimension "
     r"first\): pass batches that have one \(e.g. a DataLoader with a batch_size\), or the examples as a list"),
    (lambda: DataLoader(rows(4, seed=1), batch_size=None),  # a DataLoader that does not batch
     r"^probe_data\[0\]\['input_ids'\] has 1 dimension"),
    (lambda: iter([torch.arange(12)]), r"^probe_data\[0\] has 1 dimension; a batch is \[batch, positions\]"),
    (lambda: iter([(torch.randn(3), 1)]), r"^probe_data\[0\]\[1\] is a scalar; a batch is"),
    (lambda: rows(2, seed=1) + batches(4, 2, seed=1),
     r"^probe_data\[0\] is an example \(probe_data\[0\]\['input_ids'\] has 1 dimension\) but probe_data\[2\] is "
     r"a batch: expected a list of batches or a list of examples, not both"),
    (lambda: rows(3, seed=1) + [{"input_ids": torch.arange(9), "labels": torch.arange(9)}],
     r"^probe_data\[3\]\['input_ids'\] has shape \[9\] but probe_data\[0\]\['input_ids'\] \[12\]: the examples "
     r"of a batch must have one shape; pad them to one length, or pass a data_collator that pads"),
    (lambda: rows(3, seed=1) + [{"input_ids": torch.arange(12)}],
     r"^probe_data\[3\] holds \[\"\['input_ids'\]\"\] but probe_data\[0\]"),
])
def test_what_is_not_a_batch_is_refused_naming_the_argument_what_it_got_and_what_to_pass(data, message):
    with pytest.raises(ValueError, match=message):
        as_batches("probe_data", data())


def test_a_collator_that_fails_is_named_with_the_examples_it_had():
    def broken(examples):
        raise RuntimeError("no")

    with pytest.raises(ValueError, match=r"^hessian_data\[0:2\]: broken could not collate the examples "
                                         r"\(RuntimeError: no\)"):
        as_batches("hessian_data", rows(2, seed=1), collate=broken)
    with pytest.raises(ValueError, match=r"^_squeeze\(probe_data\[0:2\]\)\['input_ids'\] has 1 dimension; a batch "
                                         r"is \[batch, positions\] \(a batch dimension first\): the data_collator must"):
        as_batches("probe_data", rows(2, seed=1), collate=_squeeze, batch_size=2)


def _squeeze(examples):
    """A collator that forgets the batch dimension."""
    return examples[0]


def test_the_callback_takes_a_list_of_examples_and_stores_the_models_own_losses(tmp_path):
    probe = rows(12, seed=1, labels=True)
    cb = POLCACallback(tmp_path / "polca.zarr", probe, rows(16, seed=2), batch_size=5, k=1, max_basis=1,
                       snapshot_every=2, basis_every=2, token_labels=lambda b: {"carry": b["carry"]},
                       analyze=False, progress=False)
    assert [len(b["input_ids"]) for b in cb.probe_batches] == [5, 5, 2]
    assert [len(b["input_ids"]) for b in cb.hessian_batches] == [5, 5, 5, 1]
    module = AdditionModule()
    L.Trainer(default_root_dir=tmp_path, max_steps=2, callbacks=[cb], logger=False, enable_checkpointing=False,
              enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
              ).fit(module, DataLoader(batches(32, 16, seed=0), batch_size=None))
    ds = open_store(cb.store)
    assert ds.attrs["complete"] and ds["step"].values.tolist() == [0, 2]
    # the trained module's own per-token losses, on the original batch of all 12 sequences
    (whole,) = batches(12, 12, seed=1, labels=True)
    with torch.no_grad():
        loss, mask, _ = causal_lm_token_loss(module.eval(), whole)
    np.testing.assert_allclose(ds["loss"].values[-1], loss[mask].numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(ds["carry"].values, whole["carry"][mask].numpy())


def test_the_callback_refuses_data_that_are_not_batches_when_it_is_made(tmp_path):
    with pytest.raises(ValueError, match=r"^hessian_data\[0\]\['input_ids'\] has 1 dimension"):
        POLCACallback(tmp_path / "polca.zarr", rows(4, seed=1), iter(rows(4, seed=2)))
    with pytest.raises(ValueError, match="batch_size: expected a positive int or None, got 0"):
        POLCACallback(tmp_path / "polca.zarr", rows(4, seed=1), rows(4, seed=2), batch_size=0)
    assert not (tmp_path / "polca.zarr").exists()
