"""from_checkpoints() over Hugging Face folders: a tiny GPT-NeoX (Pythia's architecture) trained by
``transformers.Trainer`` with POLCATrainerCallback, its ``checkpoint-N`` folders analysed
afterwards give the callback's store; a model factory over revision names (the way a public
suite such as Pythia's ``stepN`` branches is read) gives the same weights and losses."""

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the transformers extra is not installed: pip install -e '.[transformers]'")
pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate: pip install -e '.[transformers]'")

from transformers import AutoModelForCausalLM, GPTNeoXConfig, GPTNeoXForCausalLM, Trainer  # noqa: E402
from transformers import default_data_collator  # noqa: E402

import _hf  # noqa: E402
from _stores import same_stores  # noqa: E402
from polca_lightning import from_checkpoints, open_store  # noqa: E402
from polca_lightning.toy import ADDITION_VOCAB  # noqa: E402

SETTINGS = dict(probe_data=_hf.batches(24, 12, seed=1, labels=True), hessian_data=_hf.batches(16, 16, seed=2),
                token_labels=_hf.carry_and_place, snapshot_every=2, basis_every=4, k=1, max_basis=3,
                engine="forward", analyze=False, progress=False)


def tiny_neox(seed: int = 0) -> GPTNeoXForCausalLM:
    """GPT-NeoX with one layer of width 16 over the addition vocabulary: rotary embeddings on a
    quarter of each head, parallel attention and MLP, untied output (Pythia's choices); eager attention."""
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=ADDITION_VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=12, rotary_pct=0.25, hidden_dropout=0.0,
                           attention_dropout=0.0, use_parallel_residual=True, tie_word_embeddings=False,
                           use_cache=False, bos_token_id=None, eos_token_id=None)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager")


def test_the_checkpoint_folders_of_a_trainer_run_give_its_callbacks_store(tmp_path):
    out = tmp_path / "out"
    model = tiny_neox()
    model.save_pretrained(out / "checkpoint-0")  # the Trainer saves none before training
    polca = _hf.polca(tmp_path / "callback.zarr", **SETTINGS)
    Trainer(model=model, args=_hf.arguments(out, 8, save_strategy="steps", save_steps=2),
            train_dataset=_hf.Examples(_hf.TRAIN, seed=0), data_collator=default_data_collator, callbacks=[polca],
            optimizers=(torch.optim.SGD(model.parameters(), lr=_hf.LR), None)).train()

    ds = from_checkpoints(tiny_neox(seed=5), out, tmp_path / "checkpoints.zarr", basis_at=[0, 4, 8], **SETTINGS)
    a, b = open_store(polca.store).load(), ds.load()
    assert b.attrs["complete"] and b["step"].values.tolist() == [0, 2, 4, 6, 8]
    assert b["basis_step"].values.tolist() == [0, 4, 8]
    same_stores(a, b, rtol=1e-5, floor=1e-6)

    # a public suite's way: a factory over revision names (here folders named like Pythia's branches)
    suite = tmp_path / "suite"
    suite.mkdir()
    for step in (0, 2, 4, 6, 8):
        (suite / f"step{step}").symlink_to(out / f"checkpoint-{step}")
    revisions = [f"step{step}" for step in (0, 2, 4, 6, 8)]
    ds = from_checkpoints(lambda revision: GPTNeoXForCausalLM.from_pretrained(suite / revision,
                                                                              attn_implementation="eager"),
                          revisions, tmp_path / "suite.zarr", **{**SETTINGS, "basis": "random"})
    assert ds["step"].values.tolist() == [0, 2, 4, 6, 8]
    np.testing.assert_array_equal(ds["weights"].values, a["weights"].values)
    np.testing.assert_allclose(ds["loss"].values, a["loss"].values, rtol=1e-6)


def test_the_polca_checkpoints_command_over_hugging_face_folders(tmp_path, capsys):
    from polca_lightning.cli import main as polca

    folder = tmp_path / "run"
    model = tiny_neox()
    for step in (0, 2, 4, 6, 8):  # a run's folders: the weights move between them
        model.save_pretrained(folder / f"checkpoint-{step}")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    probe = _hf.batches(24, 12, seed=1)
    torch.save(probe, tmp_path / "probe.pt")  # a list of batches
    hessian = _hf.batches(16, 16, seed=2)[0]
    torch.save(hessian, tmp_path / "hessian.pt")  # a dict of tensors, cut into batches of --batch-size
    store = tmp_path / "polca.zarr"
    assert polca(["checkpoints", str(store), str(folder), "--probe", str(tmp_path / "probe.pt"), "--hessian",
                  str(tmp_path / "hessian.pt"), "--batch-size", "8", "--basis-every", "4", "--max-basis", "2",
                  "--basis", "random", "--engine", "forward", "--quiet"]) == 0
    assert "5 checkpoints (steps 0..8), 2 basis vectors; analysed" in capsys.readouterr().out
    ds = open_store(store)
    assert ds.attrs["complete"] and ds["step"].values.tolist() == [0, 2, 4, 6, 8]
    assert ds["basis_step"].values.tolist() == [0, 4] and "cluster" in ds  # the analysis, written back
    assert (tmp_path / "polca.zarr.report" / "index.md").exists()  # no W&B run: the report folder

    # each snapshot holds the per-token losses of its checkpoint's own model (Hugging Face shifts the labels)
    for i, step in enumerate((0, 2, 4, 6, 8)):
        own = GPTNeoXForCausalLM.from_pretrained(folder / f"checkpoint-{step}", attn_implementation="eager").eval()
        losses = []
        with torch.no_grad():
            for batch in probe:
                logits = own(input_ids=batch["input_ids"]).logits[:, :-1]  # [B, P-1, vocab]: predicts 1..P-1
                target = batch["labels"][:, 1:]
                mask = target != -100
                nll = -logits.log_softmax(-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]  # [B, P-1]
                losses.append(nll[mask])
        np.testing.assert_allclose(ds["loss"].values[i], torch.cat(losses).numpy(), rtol=1e-5, atol=1e-6)

    # the store's own weight snapshots, read again along the same (seeded) random basis: the same store
    (tmp_path / "build.py").write_text(  # the architecture; its weights (the last checkpoint's) are replaced
        "from transformers import GPTNeoXForCausalLM\n\ndef build(snapshot):\n"
        f"    return GPTNeoXForCausalLM.from_pretrained({str(folder / 'checkpoint-8')!r}, attn_implementation='eager')\n")
    again = tmp_path / "again.zarr"
    assert polca(["checkpoints", str(again), str(store), "--model", f"{tmp_path / 'build.py'}:build", "--probe",
                  str(tmp_path / "probe.pt"), "--batch-size", "8", "--basis-every", "4", "--max-basis", "2",
                  "--basis", "random", "--engine", "forward", "--quiet", "--no-analyze"]) == 0
    assert "5 checkpoints (steps 0..8), 2 basis vectors" in capsys.readouterr().out
    for name in ("loss", "directional_grad", "polca", "weights"):
        np.testing.assert_allclose(open_store(again)[name].values, ds[name].values, rtol=1e-5, atol=1e-7, err_msg=name)
    assert polca(["checkpoints", str(tmp_path / "y.zarr"), str(store), "--probe", str(tmp_path / "probe.pt"),
                  "--quiet"]) == 2
    assert "--model: needed for the weight snapshots" in capsys.readouterr().err

    assert polca(["checkpoints", str(tmp_path / "x.zarr"), str(folder / "checkpoint-0" / "model.safetensors"),
                  "--steps", "0", "--probe", str(tmp_path / "probe.pt"), "--quiet"]) == 2
    assert "--model: needed for" in capsys.readouterr().err
