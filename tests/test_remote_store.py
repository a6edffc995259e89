"""Stores at URLs: a real S3-compatible server (moto) on the loopback address, memory://, file://.

The S3 tests write with the callback and the store writer to ``s3://<bucket>/run.zarr``,
kill the run, reopen and resume it, and compare with the same run on a local path.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

from fsspec.registry import _registry as _fsspec_registry  # the filesystem classes fsspec loaded
import numpy as np
import pytest
import s3fs
import torch
import xarray as xr
import zarr
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from moto.server import ThreadedMotoServer

from _tiny import AdditionModule
from polca_lightning import open_store
from polca_lightning.cli import main as polca_main
from polca_lightning.report import default_report_dir
from polca_lightning.store import StoreExistsError
from test_callback import TRAIN, polca, trainer
from test_store import assert_matches, fill_run, make_writer

HERE = Path(__file__).resolve().parent
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "polca-test", "AWS_SECRET_ACCESS_KEY": "polca-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_endpoint():
    """An S3 server on 127.0.0.1 for this module, fake credentials in the environment."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in CREDENTIALS.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def bucket(s3_endpoint):
    """A new, empty bucket; returns (name, storage_options with the endpoint and credentials)."""
    name = f"polca-{uuid.uuid4().hex[:12]}"
    options = {"endpoint_url": s3_endpoint, "key": CREDENTIALS["AWS_ACCESS_KEY_ID"],
               "secret": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]}
    s3fs.S3FileSystem(**options).mkdir(name)
    return name, options


def test_crash_then_resume_on_s3_equals_a_local_run(tmp_path, bucket, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a URL mistaken for a path would land here
    name, options = bucket
    url = f"s3://{name}/run.zarr"
    ref_cb = polca(tmp_path, "ref.zarr")
    trainer(tmp_path / "ref", 14, [ref_cb]).fit(AdditionModule(), TRAIN)

    class Crash(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 13:
                raise RuntimeError("simulated crash")

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1)
    cb = polca(tmp_path, store=url, storage_options=options)
    assert cb.store == url
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer(tmp_path / "run", 14, [cb, ckpt, Crash()], enable_checkpointing=True).fit(AdditionModule(), TRAIN)
    assert not (tmp_path / "s3:").exists()  # what a URL taken for a path used to write
    assert s3fs.S3FileSystem(**options).exists(f"{name}/run.zarr/zarr.json")
    crashed = open_store(url, storage_options=options)
    assert not crashed.attrs["complete"] and crashed.sizes["snapshot"] >= 6  # up to step 12 (after a flush)
    with pytest.raises(StoreExistsError, match="mode='a' to resume"):  # before training starts
        trainer(tmp_path / "new", 2, [polca(tmp_path, store=url, storage_options=options)]).fit(AdditionModule(), TRAIN)

    resumed = polca(tmp_path, store=url, storage_options=options, mode="a")
    path = tmp_path / "ckpt" / "epoch=1-step=10.ckpt"  # saved at step 10, data order continues exactly
    trainer(tmp_path / "run", 14, [resumed, ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
            enable_checkpointing=True).fit(AdditionModule(seed=5), TRAIN, ckpt_path=path)
    a = open_store(ref_cb.store).load()
    # credentials from the environment, the endpoint the way botocore's client takes it
    b = open_store(url, storage_options={"client_kwargs": {"endpoint_url": options["endpoint_url"]}}).load()
    assert b.attrs["complete"] and a.sizes == b.sizes
    assert b.attrs["config"] == a.attrs["config"]
    # two independent runs may pick different engines for some K (timings): equal to float32 rounding
    for var in a.variables:
        scale = float(np.abs(a[var].values).max()) if a[var].size else 0.0
        np.testing.assert_allclose(b[var].values, a[var].values, rtol=1e-5, atol=1e-6 * scale + 1e-9, err_msg=var)
    saved = torch.load(path, weights_only=False)["callbacks"][resumed.state_key]["engine_calibration"]
    assert saved and resumed.tracker.dd.calibration == saved

    # xarray reads the store as it is, through the consolidated metadata written at close
    raw = xr.open_zarr(url, storage_options=options)
    assert set(b.data_vars) <= set(raw.variables)
    for var in ("loss", "directional_grad", "delta", "polca", "polca_first", "weights", "basis_vectors"):
        np.testing.assert_array_equal(raw[var].values, b[var].values, err_msg=var)
    weights = zarr.open_group(url, mode="r", storage_options=options)["weights"]
    assert [type(c).__name__ for c in weights.compressors] == ["BloscCodec"]


def test_killed_writer_on_s3_leaves_committed_part_and_resumes(tmp_path, bucket):
    name, options = bucket
    url = f"s3://{name}/killed.zarr"
    script = textwrap.dedent(f"""
        import os, sys, numpy as np
        sys.path.insert(0, {str(HERE)!r})
        from test_store import make_writer, fill_run
        writer = make_writer({url!r}, storage_options={options!r})
        fill_run(writer, n_snapshots=3)
        writer.write_snapshot(3, 99, np.ones(7), np.ones(13))      # never committed
        writer.write_basis(3, np.ones((1, 13)), [1.0], [99])
        writer.write_directional_grad(1, 3, np.ones((1, 7)))
        writer.flush()
        os._exit(1)                                                 # no close, no atexit
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr
    with make_writer(tmp_path / "ref.zarr") as reference:
        ref = fill_run(reference)  # same seed: the same values

    ds = open_store(url, storage_options=options)
    assert ds.attrs["complete"] is False
    assert_matches(ds, ref, 3, 3)
    raw = zarr.open_group(url, mode="r", storage_options=options)
    assert raw["loss"].shape[0] == 4 and raw["basis_vectors"].shape[0] == 4  # the leftovers are there, unseen

    writer = make_writer(url, mode="a", storage_options=options)
    assert writer.committed == (3, 3)
    writer.write_snapshot(3, int(ref["step"][3]), ref["loss"][3], ref["weights"][3])
    writer.write_directional_grad(3, 0, ref["directional_grad"][3])
    writer.write_curvature(3, 0, ref["curvature"][3])
    writer.write_interval(2, 0, ref["delta"][2], ref["polca"][2], ref["polca_first"][2])
    writer.commit(4, 3)
    writer.close()
    assert_matches(open_store(url, storage_options=options), ref, 4, 3)
    assert_matches(xr.open_zarr(url, storage_options=options), ref, 4, 3)

    # the command line reads it with --storage-option pairs
    argv = ["info", url, "--storage-option", f"endpoint_url={options['endpoint_url']}",
            "--storage-option", f"key={options['key']}", "--storage-option", f"secret={options['secret']}"]
    assert polca_main(argv) == 0
    # mode 'w' replaces a POLCA store at a URL, and refuses anything else there
    with make_writer(url, mode="w", storage_options=options) as writer:
        assert writer.committed == (0, 0)
    fs = s3fs.S3FileSystem(**options)
    fs.pipe(f"{name}/other/data.bin", b"not a store")
    with pytest.raises(ValueError, match="not a POLCA store"):
        make_writer(f"s3://{name}/other", mode="w", storage_options=options)
    assert fs.cat(f"{name}/other/data.bin") == b"not a store"


def test_bad_urls_fail_early_with_clear_errors(tmp_path, bucket, capsys, monkeypatch):
    name, options = bucket
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        make_writer("s3://no-such-bucket/run.zarr", storage_options=options)
    with pytest.raises(FileNotFoundError, match="no POLCA store at 's3://"):
        open_store(f"s3://{name}/nothing.zarr", storage_options=options)
    with pytest.raises(ValueError, match="URL scheme 'nosuch', which fsspec does not know"):
        polca(tmp_path, store="nosuch://bucket/run.zarr")
    with pytest.raises(ValueError, match="pathlib.Path collapsed"):
        polca(tmp_path, store=Path(f"s3://{name}/run.zarr"))
    with pytest.raises(ValueError, match="storage_options: .* is a local path"):
        polca(tmp_path, storage_options=options)
    with pytest.raises(TypeError, match="storage_options: expected a dict"):
        open_store(f"s3://{name}/run.zarr", storage_options="endpoint_url=x")
    with pytest.raises(TypeError, match="weights_compressors: expected zarr 3 compressors"):
        polca(tmp_path, weights_compressors="zstd")
    assert polca_main(["info", "nosuch://b/run.zarr"]) == 2
    assert polca_main(["info", f"s3://{name}/run.zarr", "--storage-option", "endpoint_url"]) == 2
    assert "fsspec does not know" in capsys.readouterr().err
    # a missing filesystem package is named, with the command that installs it: hide s3fs
    # (an import of it fails) and forget the class fsspec loaded
    monkeypatch.setitem(sys.modules, "s3fs", None)
    monkeypatch.delitem(_fsspec_registry, "s3", raising=False)
    with pytest.raises(ImportError, match=r"pip install s3fs"):
        open_store(f"s3://{name}/run.zarr", storage_options=options)
    with pytest.raises(ImportError, match=r"pip install s3fs"):
        polca(tmp_path, store=f"s3://{name}/run.zarr")


def test_memory_and_file_urls(tmp_path, monkeypatch):
    url = f"memory://polca-{uuid.uuid4().hex[:8]}/run.zarr"
    with make_writer(url) as writer:
        ref = fill_run(writer)
    assert_matches(open_store(url), ref, 4, 3)
    assert_matches(xr.open_zarr(url), ref, 4, 3)
    # file:// is a local path: the same directory layout as the plain path
    with make_writer(f"file://{tmp_path}/run.zarr") as writer:
        assert writer.path == tmp_path / "run.zarr"
        fill_run(writer)
    assert (tmp_path / "run.zarr" / "weights" / "zarr.json").is_file()
    assert_matches(open_store(tmp_path / "run.zarr"), ref, 4, 3)
    # the report folder of a URL store is named after it, in the working directory
    assert default_report_dir("s3://bucket/runs/a.zarr") == Path("a.zarr.report")
    assert default_report_dir(tmp_path / "b.zarr") == tmp_path / "b.zarr.report"
