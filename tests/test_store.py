"""Tests of the POLCA store: layout, round trip, crash safety, modes, analysis variables."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from polca_lightning.store import (
    StoreError,
    StoreExistsError,
    StoreWriteError,
    StoreWriter,
    TokenIndex,
    open_store,
    write_analysis,
)

T, D = 7, 13  # tokens, parameters
PARAMETERS = [("layer.weight", (3, 4)), ("layer.bias", (1,))]
REPO = Path(__file__).resolve().parents[1]


def make_tokens() -> TokenIndex:
    return TokenIndex(
        sequence=np.array([0, 0, 0, 1, 1, 2, 2]),
        position=np.array([1, 2, 3, 1, 2, 1, 3]),
        target=np.array([5, 9, -1, 4, 4, 0, 2]),
        labels={"carry": np.array([0, 1, 0, 0, 1, 1, 0]), "digit": np.arange(T) % 3},
    )


def make_writer(path, mode="w-", config=None, **kwargs) -> StoreWriter:
    settings = dict(tokens=make_tokens(), parameters=PARAMETERS, order="trapezoid",
                    config={"lr": 1e-3, "every": 25, "dims": (2, 3)} if config is None else config,
                    max_basis=5, with_curvature=True)
    settings.update(kwargs)
    return StoreWriter(path, mode=mode, **settings)


def fill_run(writer: StoreWriter, n_snapshots: int = 4, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a run: basis of 2 vectors at snapshot 0, a 3rd at snapshot 2 (backfilled).

    Returns what was written, as dense arrays (NaN where nothing was written).
    """
    rng = np.random.default_rng(seed)
    S, K = 4, 3  # the reference is drawn for 4 snapshots whatever n_snapshots is
    ref = {
        "step": 10 * np.arange(S) + 5,
        "loss": rng.normal(size=(S, T)).astype(np.float32),
        "weights": rng.normal(size=(S, D)).astype(np.float32),
        "basis_vectors": np.linalg.qr(rng.normal(size=(D, K)))[0].T.astype(np.float32),
        "eigenvalue": np.array([3.0, np.nan, 0.5], np.float32),
        "basis_step": np.array([5, 5, 25]),
        "directional_grad": rng.normal(size=(S, K, T)).astype(np.float32),
        "curvature": rng.normal(size=(S, K, T)).astype(np.float32),
        "delta": rng.normal(size=(S - 1, K)).astype(np.float32),
        "polca": rng.normal(size=(S - 1, K, T)).astype(np.float32),
        "polca_first": rng.normal(size=(S - 1, K, T)).astype(np.float32),
    }

    def interval(i, lo, hi):
        writer.write_interval(i, lo, ref["delta"][i, lo:hi], ref["polca"][i, lo:hi], ref["polca_first"][i, lo:hi])

    for s in range(n_snapshots):
        k = 2 if s < 2 else 3
        writer.write_snapshot(s, int(ref["step"][s]), ref["loss"][s], ref["weights"][s])
        if s == 0:
            writer.write_basis(0, ref["basis_vectors"][:2], ref["eigenvalue"][:2], ref["basis_step"][:2])
        if s == 2:  # the basis grows: the new vector's values at every earlier snapshot
            writer.write_basis(2, ref["basis_vectors"][2:], ref["eigenvalue"][2:], ref["basis_step"][2:])
            for old in range(s):
                writer.write_directional_grad(old, 2, ref["directional_grad"][old, 2:])
                writer.write_curvature(old, 2, ref["curvature"][old, 2:])
            for i in range(s - 1):
                interval(i, 2, 3)
        writer.write_directional_grad(s, 0, ref["directional_grad"][s, :k])
        writer.write_curvature(s, 0, ref["curvature"][s, :k])
        if s > 0:
            interval(s - 1, 0, k)
        writer.commit(s + 1, k)
    return ref


def assert_matches(ds: xr.Dataset, ref: dict[str, np.ndarray], n_snapshots: int, n_basis: int) -> None:
    S, K = n_snapshots, n_basis
    assert ds.sizes["snapshot"] == S and ds.sizes["interval"] == max(S - 1, 0) and ds.sizes["basis"] == K
    assert ds.sizes["token"] == T and ds.sizes["param"] == D
    np.testing.assert_array_equal(ds["step"].values, ref["step"][:S])
    np.testing.assert_array_equal(ds["interval_start_step"].values, ref["step"][: S - 1])
    np.testing.assert_array_equal(ds["interval_end_step"].values, ref["step"][1:S])
    for name in ("loss", "weights"):
        np.testing.assert_array_equal(ds[name].values, ref[name][:S])
    for name in ("basis_vectors", "eigenvalue", "basis_step"):
        np.testing.assert_array_equal(ds[name].values, ref[name][:K])
    for name in ("directional_grad", "curvature"):
        np.testing.assert_array_equal(ds[name].values, ref[name][:S, :K])
    for name in ("delta", "polca", "polca_first"):
        np.testing.assert_array_equal(ds[name].values, ref[name][: S - 1, :K])
    tokens = make_tokens()
    for name, values in tokens.coordinates().items():
        assert name in ds.coords
        np.testing.assert_array_equal(ds[name].values, values)
    assert ds["eigenvalue"].dtype == np.float32 and ds["step"].dtype == np.int64
    assert ds["polca"].dims == ("interval", "basis", "token")


@pytest.mark.parametrize("background", [True, False])
def test_round_trip_open_store_and_xarray(tmp_path, background):
    path = tmp_path / "run.zarr"
    writer = make_writer(path, background=background)
    ref = fill_run(writer)
    # Read side used by the callback for backfill and resume.
    assert writer.committed == (4, 3)
    np.testing.assert_array_equal(writer.read_steps(), ref["step"])
    np.testing.assert_array_equal(writer.read_weights(2), ref["weights"][2])
    vectors, eigenvalue, basis_step = writer.read_basis()
    np.testing.assert_array_equal(vectors, ref["basis_vectors"])
    np.testing.assert_array_equal(eigenvalue, ref["eigenvalue"])
    np.testing.assert_array_equal(basis_step, ref["basis_step"])
    np.testing.assert_array_equal(writer.read_directional_grad(1), ref["directional_grad"][1])
    with pytest.raises(ValueError):
        writer.read_weights(4)  # not committed

    live = open_store(path)  # opens while the writer is still open
    assert live.attrs["complete"] is False
    assert_matches(live, ref, 4, 3)
    writer.close()

    ds = open_store(path)
    assert not ds["polca"].variable._in_memory  # lazy until used
    assert_matches(ds, ref, 4, 3)
    # Lazy indexing of every kind reaches the right cells.
    np.testing.assert_array_equal(ds["polca"].isel(basis=[2, 0], token=slice(1, 6, 2)).values,
                                  ref["polca"][:, [2, 0]][:, :, 1:6:2])
    np.testing.assert_array_equal(ds["loss"].isel(token=slice(None, None, -2)).values, ref["loss"][:, ::-2])
    picked = ds["loss"].isel(snapshot=xr.DataArray([3, 0]), token=xr.DataArray([1, 6]))
    np.testing.assert_array_equal(picked.values, ref["loss"][[3, 0], [1, 6]])
    np.testing.assert_array_equal(ds["directional_grad"][-1, 1, 2].values, ref["directional_grad"][-1, 1, 2])
    assert ds.attrs["complete"] is True
    assert ds.attrs["order"] == "trapezoid" and ds["polca"].attrs["order"] == "trapezoid"
    assert ds.attrs["parameters"] == [["layer.weight", [3, 4]], ["layer.bias", [1]]]
    assert ds.attrs["config"] == {"lr": 1e-3, "every": 25, "dims": [2, 3]}
    assert ds.attrs["polca_lightning_format"] == 1

    raw = xr.open_zarr(path)  # plain xarray, consolidated metadata written at close
    assert_matches(raw, ref, 4, 3)
    assert set(raw.variables) == set(ds.variables) and set(raw.coords) == set(ds.coords)
    for name in ds.variables:
        assert raw[name].dims == ds[name].dims


def test_torch_inputs_are_copied_and_converted(tmp_path):
    torch = pytest.importorskip("torch")
    writer = make_writer(tmp_path / "run.zarr", with_curvature=False, store_weights=False)
    loss = torch.arange(T, dtype=torch.bfloat16)
    writer.write_snapshot(0, 0, loss, weights=torch.ones(D))  # weights ignored: store_weights=False
    loss.fill_(-1)  # the store must hold the values at call time
    writer.commit(1, 0)
    writer.close()
    ds = open_store(tmp_path / "run.zarr")
    np.testing.assert_array_equal(ds["loss"].values[0], np.arange(T, dtype=np.float32))
    assert "weights" not in ds and "curvature" not in ds


def test_a_stores_committed_weight_snapshots_are_checkpoints_of_its_parameters(tmp_path):
    from polca_lightning.checkpoints import read_state_dict, step_of, store_snapshots

    path = tmp_path / "run.zarr"
    writer = make_writer(path)
    ref = fill_run(writer, n_snapshots=3)
    writer.write_snapshot(3, 99, np.ones(T), np.ones(D))  # written, never committed: not a checkpoint
    writer.flush()
    snapshots = store_snapshots(path)
    assert [step_of(s) for s in snapshots] == [5, 15, 25]
    for s in snapshots:
        state = read_state_dict(s)
        assert list(state) == ["layer.weight", "layer.bias"] and state["layer.weight"].shape == (3, 4)
        flat = np.concatenate([state["layer.weight"].numpy().ravel(), state["layer.bias"].numpy()])
        np.testing.assert_array_equal(flat, ref["weights"][s.index])
    writer.close()

    bare = make_writer(tmp_path / "bare.zarr", store_weights=False)
    bare.write_snapshot(0, 0, np.ones(T))
    bare.commit(1, 0)
    bare.close()
    with pytest.raises(ValueError, match="holds no weight snapshots"):
        store_snapshots(tmp_path / "bare.zarr")
    with pytest.raises(FileNotFoundError, match="no POLCA store"):
        store_snapshots(tmp_path / "nothing.zarr")


def test_uncommitted_data_is_invisible(tmp_path):
    path = tmp_path / "run.zarr"
    writer = make_writer(path)
    ref = fill_run(writer, n_snapshots=3)
    # Written but never committed: a 4th snapshot and a 4th basis vector.
    writer.write_snapshot(3, 99, np.ones(T), np.ones(D))
    writer.write_basis(3, np.ones((1, D)), [1.0], [99])
    writer.write_directional_grad(3, 0, np.ones((4, T)))
    writer.flush()
    writer._arrays["loss"].resize((9, T))  # as if a kill came between a resize and the data
    ds = open_store(path)
    assert ds.attrs["complete"] is False
    assert_matches(ds, ref, 3, 3)


def test_killed_writer_leaves_committed_part_and_resumes(tmp_path):
    path = tmp_path / "run.zarr"
    script = textwrap.dedent(f"""
        import os, numpy as np, sys
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_store import make_writer, fill_run
        writer = make_writer({str(path)!r})
        fill_run(writer, n_snapshots=3)
        writer.write_snapshot(3, 99, np.ones(7), np.ones(13))      # never committed
        writer.write_basis(3, np.ones((1, 13)), [1.0], [99])
        writer.write_directional_grad(1, 3, np.ones((1, 7)))
        writer.flush()
        os._exit(1)                                                 # no close, no atexit
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    with make_writer(tmp_path / "ref.zarr") as reference:
        ref = fill_run(reference)  # same seed: the same values

    ds = open_store(path)
    assert ds.attrs["complete"] is False
    assert_matches(ds, ref, 3, 3)

    # Resume: the leftovers past the committed part are dropped, the run goes on.
    writer = make_writer(path, mode="a")
    assert writer.committed == (3, 3)
    writer.write_snapshot(3, int(ref["step"][3]), ref["loss"][3], ref["weights"][3])
    writer.write_directional_grad(3, 0, ref["directional_grad"][3])
    writer.write_curvature(3, 0, ref["curvature"][3])
    writer.write_interval(2, 0, ref["delta"][2], ref["polca"][2], ref["polca_first"][2])
    writer.commit(4, 3)
    writer.close()
    assert_matches(open_store(path), ref, 4, 3)
    assert_matches(xr.open_zarr(path), ref, 4, 3)


def test_truncate_leaves_no_stale_values(tmp_path):
    path = tmp_path / "run.zarr"
    writer = make_writer(path)
    ref = fill_run(writer)
    writer.truncate(2, 2)
    assert writer.committed == (2, 2)
    assert_matches(open_store(path), ref, 2, 2)
    with pytest.raises(StoreError, match="only 2 and 2 are committed"):
        writer.truncate(3, 2)
    # Grow again without rewriting row 2 at snapshot 0: it must read NaN, not the old value.
    writer.write_snapshot(2, 1000, np.zeros(T), np.zeros(D))
    writer.write_basis(2, np.zeros((1, D)), [np.nan], [1000])
    writer.commit(3, 3)
    writer.close()
    ds = open_store(path)
    assert np.isnan(ds["directional_grad"].values[0, 2]).all()
    assert np.isnan(ds["polca"].values[1]).all()
    np.testing.assert_array_equal(ds["step"].values, [5, 15, 1000])


def test_mode_w_minus_refuses_and_w_overwrites(tmp_path):
    path = tmp_path / "run.zarr"
    with make_writer(path) as writer:
        fill_run(writer, n_snapshots=2)
    with pytest.raises(StoreExistsError) as info:
        make_writer(path)
    assert isinstance(info.value, FileExistsError) and isinstance(info.value, StoreError)
    assert str(path) in str(info.value) and "mode='a'" in str(info.value) and "mode='w'" in str(info.value)

    writer = make_writer(path, mode="w", order="first")
    writer.close()
    ds = open_store(path)
    assert ds.sizes["snapshot"] == 0 and ds.attrs["order"] == "first"

    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="not a POLCA store"):
        make_writer(other, mode="w")
    assert (other / "precious.txt").exists()


def test_mode_a_resumes_and_refuses_mismatch(tmp_path):
    path = tmp_path / "run.zarr"
    writer = make_writer(path, mode="a")  # absent: created
    ref = fill_run(writer, n_snapshots=2)
    writer.close()

    with pytest.raises(StoreError) as info:
        make_writer(path, mode="a", config={"lr": 1e-2, "every": 25, "dims": (2, 3)})
    assert "config['lr']" in str(info.value) and "0.001" in str(info.value) and "0.01" in str(info.value)
    with pytest.raises(StoreError, match="order"):
        make_writer(path, mode="a", order="exact")
    with pytest.raises(StoreError, match="with_curvature"):
        make_writer(path, mode="a", with_curvature=False)
    with pytest.raises(StoreError, match="config\\['new_key'\\]"):
        make_writer(path, mode="a", config={"lr": 1e-3, "every": 25, "dims": (2, 3), "new_key": 1})
    tokens = make_tokens()
    tokens.target[3] = 8
    with pytest.raises(StoreError, match="'target' at token 3"):
        make_writer(path, mode="a", tokens=tokens)
    with pytest.raises(StoreError, match="parameters"):
        make_writer(path, mode="a", parameters=[("layer.weight", (4, 3)), ("layer.bias", (1,))])

    writer = make_writer(path, mode="a")  # the same settings: resumes, data kept
    assert writer.committed == (2, 2)
    assert open_store(path).attrs["complete"] is False  # being written again
    writer.close()
    assert_matches(open_store(path), ref, 2, 2)


def test_bad_locations_fail_at_construction(tmp_path):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError):
        make_writer(a_file)
    with pytest.raises(NotADirectoryError):
        make_writer(a_file / "run.zarr")


def test_read_only_directory(tmp_path):
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        # Root writes anywhere: try as an unprivileged user, in a child process.
        with tempfile.TemporaryDirectory() as top:
            os.chmod(top, 0o755)
            locked = Path(top) / "locked"
            locked.mkdir(mode=0o555)
            script = textwrap.dedent(f"""
                import os, sys
                sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
                from test_store import make_writer
                os.setegid(65534); os.seteuid(65534)
                try:
                    make_writer({str(locked / "run.zarr")!r})
                except PermissionError as error:
                    print("PermissionError", error)
            """)
            result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert "PermissionError" in result.stdout and "not writable" in result.stdout, result.stderr
        return
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user ignores directory permissions")
        with pytest.raises(PermissionError, match="not writable"):
            make_writer(locked / "run.zarr")
    finally:
        locked.chmod(0o755)


def test_open_store_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        open_store(tmp_path / "missing.zarr")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "data.csv").write_text("a,b\n")
    with pytest.raises(StoreError, match="not a POLCA store"):
        open_store(plain)
    xr.Dataset({"x": ("a", np.arange(3))}).to_zarr(tmp_path / "other.zarr", zarr_format=3, consolidated=False)
    with pytest.raises(StoreError, match="not a POLCA store"):
        open_store(tmp_path / "other.zarr")
    with pytest.raises(StoreError):
        open_store(tmp_path / "other.zarr" / "zarr.json")


def test_input_validation(tmp_path):
    writer = make_writer(tmp_path / "run.zarr", with_curvature=False)
    with pytest.raises(ValueError, match="shape"):
        writer.write_snapshot(0, 0, np.zeros(T + 1))
    with pytest.raises(ValueError, match="max_basis"):
        writer.write_directional_grad(0, 4, np.zeros((2, T)))
    with pytest.raises(StoreError, match="with_curvature=False"):
        writer.write_curvature(0, 0, np.zeros((1, T)))
    writer.close()
    with pytest.raises(ValueError, match="reserved"):
        TokenIndex(np.zeros(2), np.zeros(2), np.zeros(2), {"polca": np.zeros(2)})
    with pytest.raises(ValueError, match="entries"):
        TokenIndex(np.zeros(2), np.zeros(3), np.zeros(2))
    with pytest.raises(StoreError, match="JSON"):
        make_writer(tmp_path / "other.zarr", config={"model": object()})


def test_background_error_is_raised_in_caller(tmp_path):
    class Broken:
        shape = (0, T)

        def __setitem__(self, key, value):
            raise OSError("No space left on device")

        def resize(self, shape):
            self.shape = shape

    writer = make_writer(tmp_path / "run.zarr")
    writer._arrays["loss"] = Broken()
    writer.write_snapshot(0, 0, np.zeros(T))  # queued; fails on the writer thread
    with pytest.raises(StoreWriteError) as info:
        writer.flush()
    assert isinstance(info.value.__cause__, OSError) and "No space left" in str(info.value)
    with pytest.raises(StoreWriteError):
        writer.commit(1, 0)
    with pytest.raises(StoreWriteError):
        writer.close()
    assert open_store(tmp_path / "run.zarr").attrs["committed_snapshots"] == 0


def test_write_analysis(tmp_path):
    path = tmp_path / "run.zarr"
    writer = make_writer(path)
    fill_run(writer)
    writer.close()

    for name in ("polca", "step", "carry", "basis", "sequence"):
        with pytest.raises(StoreError, match="training"):
            write_analysis(path, {name: (("basis",), np.zeros(3), {})})
    with pytest.raises(StoreError, match="'basis'"):
        write_analysis(path, {"cluster": (("basis", "token"), np.zeros((4, T), int), {})})

    cluster = np.arange(3 * T).reshape(3, T) % 4 - 1
    write_analysis(path, {
        "cluster": (("basis", "token"), cluster, {"method": "hdbscan", "min_cluster_size": 3}),
        "method": (("method",), np.array(["polca", "loss"]), {}),
        "homogeneity": (("method", "cluster_id"), np.array([[0.5, 0.9], [0.1, 0.2]]), {}),
    })
    for ds in (open_store(path), xr.open_zarr(path)):
        np.testing.assert_array_equal(ds["cluster"].values, cluster)
        assert ds["cluster"].dims == ("basis", "token") and ds["cluster"].attrs["min_cluster_size"] == 3
        assert list(ds["method"].values) == ["polca", "loss"]
        assert ds["homogeneity"].sel({"method": "loss"}).values.tolist() == [0.1, 0.2]  # `method` is also a keyword of .sel
        assert ds.sizes["basis"] == 3  # training data untouched
    with pytest.raises(StoreError, match="overwrite"):
        write_analysis(path, {"cluster": (("basis", "token"), cluster, {})}, overwrite=False)

    training = open_store(path, analysis=False)  # the training data alone
    assert not {"cluster", "method", "homogeneity", "cluster_id"} & set(training.variables)
    assert set(training.data_vars) == set(open_store(path).data_vars) - {"cluster", "homogeneity"}
    assert "carry" in training.coords and training.sizes["basis"] == 3

    # Re-running replaces: new values, new sizes of its own dims.
    write_analysis(path, {"homogeneity": (("method", "cluster_id"), np.ones((2, 3)), {})})
    for ds in (open_store(path), xr.open_zarr(path)):
        assert ds.sizes["cluster_id"] == 3 and float(ds["homogeneity"].sum()) == 6.0
        np.testing.assert_array_equal(ds["cluster"].values, cluster)


def test_reader_sees_only_complete_snapshots_while_writing(tmp_path):
    path = tmp_path / "run.zarr"
    writer = make_writer(path, with_curvature=False)
    writer.write_basis(0, np.eye(2, D), [1.0, 2.0], [0, 0])
    seen = set()
    for s in range(30):
        writer.write_snapshot(s, s, np.full(T, s), np.full(D, s))
        writer.write_directional_grad(s, 0, np.full((2, T), s))
        if s:
            writer.write_interval(s - 1, 0, np.ones(2), np.full((2, T), s), np.full((2, T), s))
        writer.commit(s + 1, 2)
        ds = open_store(path)  # races the writer thread on purpose
        n = ds.sizes["snapshot"]
        seen.add(n)
        if n == 0:  # nothing committed yet (not even the basis)
            continue
        assert ds.sizes["basis"] == 2
        expected = np.arange(n, dtype=np.float32)
        np.testing.assert_array_equal(ds["loss"].values[:, 0], expected)
        np.testing.assert_array_equal(ds["directional_grad"].values[:, 1, 0], expected)
        np.testing.assert_array_equal(ds["polca"].values[:, 0, 0], expected[1:])
    writer.close()
    assert open_store(path).sizes["snapshot"] == 30


def test_weights_are_compressed_and_uncompressed_stores_still_open_and_resume(tmp_path):
    """Stores written before the weights were compressed (every big array raw) open and
    resume; a resumed store keeps each array's codecs, whatever the writer's default."""
    import zarr

    from polca_lightning.store import WEIGHTS_COMPRESSORS

    def codecs(path, name):
        return [type(c).__name__ for c in zarr.open_group(path, mode="r")[name].compressors]

    new = tmp_path / "new.zarr"
    with make_writer(new) as writer:
        ref = fill_run(writer)
    assert codecs(new, "weights") == [type(c).__name__ for c in WEIGHTS_COMPRESSORS] == ["BloscCodec"]
    assert codecs(new, "loss") == codecs(new, "basis_vectors") == []
    np.testing.assert_array_equal(open_store(new)["weights"].values, ref["weights"])  # lossless, bit for bit

    old = tmp_path / "old.zarr"  # the earlier layout: no compressor on any array with a token or param axis
    writer = make_writer(old, weights_compressors=None)
    part = fill_run(writer, n_snapshots=3)
    writer.close(complete=False)
    assert codecs(old, "weights") == []
    assert_matches(open_store(old), part, 3, 3)
    assert_matches(xr.open_zarr(old), part, 3, 3)
    writer = make_writer(old, mode="a")  # the default compressors now; the store keeps its own
    writer.write_snapshot(3, int(ref["step"][3]), ref["loss"][3], ref["weights"][3])
    writer.write_directional_grad(3, 0, ref["directional_grad"][3])
    writer.write_curvature(3, 0, ref["curvature"][3])
    writer.write_interval(2, 0, ref["delta"][2], ref["polca"][2], ref["polca_first"][2])
    writer.commit(4, 3)
    writer.close()
    assert codecs(old, "weights") == []
    assert_matches(open_store(old), ref, 4, 3)
    with pytest.raises(TypeError, match="weights_compressors: expected zarr 3 compressors"):
        make_writer(tmp_path / "bad.zarr", weights_compressors="zstd")


def test_steps_are_indexes_for_sel(tmp_path):
    path = tmp_path / "run.zarr"
    writer = make_writer(path)
    ref = fill_run(writer)  # snapshots at steps 5, 15, 25, 35; vectors joined at 5, 5, 25
    writer.close()
    ds = open_store(path)
    np.testing.assert_array_equal(ds.loss.sel(step=25).values, ref["loss"][2])
    np.testing.assert_array_equal(ds.polca.sel(interval_end_step=25).values, ref["polca"][1])
    np.testing.assert_array_equal(ds.polca.sel(interval_start_step=25).values, ref["polca"][2])
    np.testing.assert_array_equal(ds.eigenvalue.sel(basis_step=5).values, ref["eigenvalue"][:2])  # two at step 5
    assert ds.loss.sel(step=slice(10, 30)).sizes["snapshot"] == 2
    with pytest.raises(KeyError):
        ds.loss.sel(step=20)  # no snapshot there
