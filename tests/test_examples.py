"""The examples end to end in their tiny modes, so none can rot."""

import glob
import sys
from pathlib import Path

import numpy as np

from _wandb import media_files, wandb_history

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))


def test_arithmetic_tiny_mode_logs_the_report_to_an_offline_wandb_run(tmp_path, capsys):
    import arithmetic

    from polca_lightning import open_store

    store = arithmetic.main(["--tiny", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    ds = open_store(store)
    assert ds.attrs["complete"] and ds.sizes["snapshot"] == 7 and ds.sizes["basis"] == 4
    assert set(ds["place"].values) == {0, 1, 2, 3} and set(ds["carry"].values) == {0, 1}
    assert "cluster" in ds and "carry_homogeneity" in ds  # the analysis was written back
    assert "best cluster of carry tokens" in out and "loss_change" in out

    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    images = media_files(run_dir, "images")
    tables = media_files(run_dir, "table")
    assert any(i.startswith("polca_report/coverage_plot_") for i in images)
    assert any(i.startswith("polca_report/appendix_g_carry_") for i in images)
    kept = [int(b) for b in np.flatnonzero(ds["kept"].values)]
    for u in kept:
        for name in ("projected_loss", "exact_loss", "labels"):
            assert any(i.startswith(f"polca_report/vector_{u:02d}/{name}_") for i in images), (u, name)
    for name in ("summary", "medoid_contexts", "appendix_g"):
        assert any(t.startswith(f"polca_report/{name}_") for t in tables), name
    history = wandb_history(Path(run_dir))
    assert any("polca/eigenvalue_0" in h for h in history)  # scalars logged while training ran
    assert any("train/loss" in h for h in history)
    # decoded contexts: the medoid table shows the problem with the digit bracketed
    import json

    (contexts,) = [p for p in Path(run_dir, "files", "media", "table").rglob("medoid_contexts_*.json")]
    data = json.loads(contexts.read_text())
    assert "text" in data["columns"]
    text = data["data"][0][data["columns"].index("text")]
    assert "+" in text and "=" in text and "[" in text
