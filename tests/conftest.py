import pytest


@pytest.fixture(autouse=True)
def _isolated_wandb(tmp_path, monkeypatch):
    """Keep W&B offline and inside the test's temporary directory."""
    for var in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        path = tmp_path / "wandb_env" / var.lower()
        path.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(var, str(path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
