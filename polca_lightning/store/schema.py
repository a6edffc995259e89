"""The POLCA store's data contract: layout, names, chunking, format version, errors, path checks.

The store is a Zarr v3 group that a training run fills and users reload.

Written during training by one process (:class:`StoreWriter`, used by the callback),
read lazily with :func:`open_store` or, as it is, with ``xarray.open_zarr(path)``
(every array carries ``dimension_names``). Names are stable; analysis code relies on them.
Each name has a constant below (``LOSS = "loss"``, ``SNAPSHOT = "snapshot"``, ...) that
the package's code uses in place of the spelled-out string.

A store is a local directory or a URL that fsspec opens (``s3://bucket/run.zarr``,
``gs://...``, ``memory://...``), with ``storage_options`` for its filesystem as
``xarray.open_zarr`` takes them; both behave the same (docs/store.md, "Remote stores").

Dimensions: ``snapshot`` (grows), ``interval`` (= snapshot - 1: interval ``i`` runs from
snapshot ``i`` to ``i+1``), ``basis`` (grows up to ``max_basis``), ``token``, ``param``.

=====================  ========================  =========================================
variable               dims                      meaning
=====================  ========================  =========================================
step (coord)           snapshot                  optimizer step of each snapshot (int64)
interval_start_step    interval                  step of snapshot i (coord, int64)
interval_end_step      interval                  step of snapshot i+1 (coord, int64)
loss                   snapshot, token           per-token loss
directional_grad       snapshot, basis, token    g_i(x,b)
curvature              snapshot, basis, token    c_i(x,b), only if ``with_curvature``
delta                  interval, basis           delta_i(b)
polca                  interval, basis, token    POLCA of the order in its attribute ``order``
polca_first            interval, basis, token    first-order POLCA
eigenvalue             basis                     lambda_b, NaN for vectors without one
basis_step (coord)     basis                     step at which b joined (int64)
basis_vectors          basis, param              B, rows orthonormal
weights                snapshot, param           parameter snapshots, if ``store_weights``
sequence, position,    token                     token coordinates (int64; target -1 where
target, <labels>                                 there is none; one per user label)
=====================  ========================  =========================================

Floats not computed yet are NaN, integers -1. Group attributes: ``parameters`` (list of
``[name, shape]`` in ``param`` order), ``order``, ``config``, ``max_basis``,
``with_curvature``, ``store_weights``, ``token_labels``, ``polca_lightning_version``,
``polca_lightning_format`` (marks a POLCA store), ``committed_snapshots`` and
``committed_basis`` (how much is complete), ``complete`` (the run closed the store),
``engine_calibration`` (the engine costs measured at the start with ``engine="auto"``,
which a run resumed from the store alone uses again).

Crash safety: arrays grow before data lands in them, so after a kill they may be longer
than what was written. The committed lengths are written only after the data they
cover; :func:`open_store` trims every variable to them, so a store being written, or
left by a crash, opens with its complete part. ``xarray.open_zarr`` shows the raw arrays
(identical once the run closed the store). Consolidated metadata is written only at
close, as it is a snapshot.

Analysis results (:func:`write_analysis`) are variables of their own beside these.
"""

from __future__ import annotations

import json
import math
import operator
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.abc.codec import BytesBytesCodec
from zarr.codecs import BloscCodec

from polca_lightning.store.location import StoreLocation, resolve_store


__all__ = ["FORMAT_KEY", "FORMAT_VERSION", "TRAINING_DIMS", "TRAINING_SPECS", "RESERVED_NAMES",
           "BUILTIN_TOKEN_COORDS", "WEIGHTS_COMPRESSORS", "StoreError", "StoreExistsError", "StoreWriteError",
           "TokenIndex", "check_store_path", "check_weights_compressors",
           # variable, dimension and token coordinate names
           "STEP", "INTERVAL_START_STEP", "INTERVAL_END_STEP", "LOSS", "DIRECTIONAL_GRAD", "CURVATURE", "DELTA",
           "POLCA", "POLCA_FIRST", "EIGENVALUE", "BASIS_STEP", "BASIS_VECTORS", "WEIGHTS",
           "SNAPSHOT", "INTERVAL", "BASIS", "TOKEN", "PARAM", "SEQUENCE", "POSITION", "TARGET"]

FORMAT_KEY = "polca_lightning_format"
FORMAT_VERSION = 1
#: group attribute: the engine costs measured at the start (``engine="auto"``)
ENGINE_CALIBRATION = "engine_calibration"

# Names of the dimensions, the training variables and the built-in token coordinates.
#: Dimension: one entry per snapshot of the weights (grows during training).
SNAPSHOT = "snapshot"
#: Dimension: interval ``i`` runs from snapshot ``i`` to ``i+1`` (one fewer than snapshots).
INTERVAL = "interval"
#: Dimension: one entry per basis vector (grows up to ``max_basis``).
BASIS = "basis"
#: Dimension: one entry per probe token.
TOKEN = "token"
#: Dimension: one entry per (flattened) model parameter.
PARAM = "param"

#: Coordinate ``[snapshot]``: optimizer step of each snapshot.
STEP = "step"
#: Coordinate ``[interval]``: step of snapshot i, where interval i starts.
INTERVAL_START_STEP = "interval_start_step"
#: Coordinate ``[interval]``: step of snapshot i+1, where interval i ends.
INTERVAL_END_STEP = "interval_end_step"
#: Variable ``[snapshot, token]``: per-token loss.
LOSS = "loss"
#: Variable ``[snapshot, basis, token]``: directional derivative g_i(x,b).
DIRECTIONAL_GRAD = "directional_grad"
#: Variable ``[snapshot, basis, token]``: directional curvature c_i(x,b), only if ``with_curvature``.
CURVATURE = "curvature"
#: Variable ``[interval, basis]``: parameter change along b, delta_i(b).
DELTA = "delta"
#: Variable ``[interval, basis, token]``: POLCA of the order in its attribute ``order``.
POLCA = "polca"
#: Variable ``[interval, basis, token]``: first-order POLCA.
POLCA_FIRST = "polca_first"
#: Variable ``[basis]``: eigenvalue lambda_b, NaN for vectors without one.
EIGENVALUE = "eigenvalue"
#: Coordinate ``[basis]``: optimizer step at which b joined the basis.
BASIS_STEP = "basis_step"
#: Variable ``[basis, param]``: the basis B, rows orthonormal.
BASIS_VECTORS = "basis_vectors"
#: Variable ``[snapshot, param]``: parameter snapshots, only if ``store_weights``.
WEIGHTS = "weights"

#: Token coordinate: index of the probe sequence the token comes from.
SEQUENCE = "sequence"
#: Token coordinate: position of the token in its sequence.
POSITION = "position"
#: Token coordinate: target token id, -1 where there is none.
TARGET = "target"

TRAINING_DIMS = (SNAPSHOT, INTERVAL, BASIS, TOKEN, PARAM)
BUILTIN_TOKEN_COORDS = (SEQUENCE, POSITION, TARGET)

_BYTES_PER_CHUNK = 4 << 20  # aim for chunks of at most ~4 MiB (float32)

#: Default compressors of the ``weights`` snapshots: blosc lz4 on bit-shuffled float32,
#: lossless. On real training snapshots (benchmarks/snapshot_compression.py) it stored
#: 0.874 of the raw bytes, the best saving of the codecs that kept the raw layout's write
#: and read rates (zstd saved less and wrote at half the rate). The other arrays are raw.
WEIGHTS_COMPRESSORS = (BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=4),)


@dataclass(frozen=True)
class _Spec:
    dims: tuple[str, ...]
    dtype: str
    description: str
    coordinate: bool = False


# name -> layout; `curvature` and `weights` exist only when the run asks for them.
TRAINING_SPECS: dict[str, _Spec] = {
    STEP: _Spec((SNAPSHOT,), "int64", "optimizer step of each snapshot", True),
    INTERVAL_START_STEP: _Spec((INTERVAL,), "int64", "step of snapshot i, where interval i starts", True),
    INTERVAL_END_STEP: _Spec((INTERVAL,), "int64", "step of snapshot i+1, where interval i ends", True),
    LOSS: _Spec((SNAPSHOT, TOKEN), "float32", "per-token loss l_x(theta_i)"),
    DIRECTIONAL_GRAD: _Spec((SNAPSHOT, BASIS, TOKEN), "float32", "g_i(x,b) = <b, grad l_x(theta_i)>"),
    CURVATURE: _Spec((SNAPSHOT, BASIS, TOKEN), "float32", "c_i(x,b) = b^T hess l_x(theta_i) b"),
    DELTA: _Spec((INTERVAL, BASIS), "float32", "delta_i(b) = <b, theta_{i+1} - theta_i>"),
    POLCA: _Spec((INTERVAL, BASIS, TOKEN), "float32", "POLCA of the configured order (attribute `order`)"),
    POLCA_FIRST: _Spec((INTERVAL, BASIS, TOKEN), "float32", "first-order POLCA g_i(x,b) delta_i(b)"),
    EIGENVALUE: _Spec((BASIS,), "float32", "eigenvalue found for b (NaN when none)"),
    BASIS_STEP: _Spec((BASIS,), "int64", "optimizer step at which b joined the basis", True),
    BASIS_VECTORS: _Spec((BASIS, PARAM), "float32", "basis B, rows orthonormal"),
    WEIGHTS: _Spec((SNAPSHOT, PARAM), "float32", "flattened parameters at each snapshot"),
}
# Names analysis results may never take (token label coordinates are added per store).
RESERVED_NAMES = frozenset(TRAINING_SPECS) | frozenset(TRAINING_DIMS) | frozenset(BUILTIN_TOKEN_COORDS)


class StoreError(ValueError):
    """A path is not a POLCA store, or a store does not match the run (a ``ValueError``)."""


class StoreExistsError(StoreError, FileExistsError):
    """Something is already at the path and mode ``'w-'`` refuses to touch it."""


class StoreWriteError(StoreError, RuntimeError):
    """The background writer failed; the original exception is ``__cause__``."""


@dataclass
class TokenIndex:
    """The probe tokens, in probe order (one entry per loss-bearing token).

    Args:
        sequence: ``[T]`` int, index of the probe sequence the token comes from.
        position: ``[T]`` int, position of the token in its sequence.
        target: ``[T]`` int, target token id, ``-1`` where there is none.
        labels: name -> ``[T]`` int, one coordinate per user label.

    Example:
        >>> TokenIndex(np.zeros(3), np.arange(3), np.array([5, 6, -1]), {"carry": np.array([0, 1, 0])})
    """

    sequence: np.ndarray
    position: np.ndarray
    target: np.ndarray
    labels: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sequence = _as_int64(self.sequence, "TokenIndex.sequence")
        self.position = _as_int64(self.position, "TokenIndex.position")
        self.target = _as_int64(self.target, "TokenIndex.target")
        self.labels = {str(k): _as_int64(v, f"TokenIndex.labels[{k!r}]") for k, v in dict(self.labels).items()}
        n = len(self.sequence)
        for name, values in self.coordinates().items():
            if values.shape != (n,):
                raise ValueError(f"TokenIndex: {name} has {len(values)} entries, sequence has {n}")
        for name in self.labels:
            if not name or name in RESERVED_NAMES or "/" in name or name.startswith(("_", ".")):
                raise ValueError(f"TokenIndex: label name {name!r} is reserved or not a valid variable name")

    def __len__(self) -> int:
        return len(self.sequence)

    def coordinates(self) -> dict[str, np.ndarray]:
        """All token coordinates by name: sequence, position, target, then the labels."""
        return {SEQUENCE: self.sequence, POSITION: self.position, TARGET: self.target, **self.labels}


def _as_int64(values: Any, name: str) -> np.ndarray:
    array = np.asarray(_to_numpy(values))
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
            raise ValueError(f"{name} must hold integers, got dtype {array.dtype}")
    return array.astype(np.int64)


def _to_numpy(values: Any) -> Any:
    """A torch tensor (any device, any dtype) as a CPU array; anything else unchanged."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):
        values = values.detach().cpu()
        if values.dtype.is_floating_point:
            values = values.float()  # bfloat16/float16 have no exact numpy twin
        return values.numpy()
    return values


def _as_float32(values: Any, name: str, shape: tuple[int, ...]) -> np.ndarray:
    """A private float32 copy of `values` with the exact `shape`, or ValueError."""
    array = np.array(_to_numpy(values), dtype=np.float32, copy=True)
    if array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")
    return array


def _as_index(value: Any, name: str, low: int = 0, high: int | None = None) -> int:
    """`value` as a Python int in [low, high]; ValueError/TypeError naming `name` otherwise."""
    try:
        index = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if index < low or (high is not None and index > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {index}")
    return index


def _jsonable(value: Any, where: str = "config") -> Any:
    """`value` as plain JSON types (tuples become lists), or StoreError naming the key."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise StoreError(f"{where}: keys must be strings, got {key!r}")
            out[key] = _jsonable(item, f"{where}[{key!r}]")
        return out
    raise StoreError(f"{where} = {value!r} ({type(value).__name__}) cannot be stored as JSON; "
                     "pass numbers, strings, booleans, lists or dicts")


def _same_json(a: Any, b: Any) -> bool:
    """Equality of JSON values, NaN equal to NaN and tuples equal to lists."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _chunk_plan(n_tokens: int, n_params: int, max_basis: int) -> dict[str, tuple[int, ...]]:
    """Chunk shape of every training array.

    One snapshot (or interval) per chunk along time, so writing a snapshot touches only
    its own chunks and never reads back older data. Token rows are grouped by basis
    vector so that a chunk holds ~4 MiB: writing g for all K vectors of a snapshot is
    one or a few chunk writes, and a backfilled row rewrites one chunk per snapshot.
    Parameter axes are cut at 1M float32 (4 MiB) so a weights snapshot streams in
    pieces and a reader can fetch one parameter tensor without the whole model.
    """
    tok = min(n_tokens, _BYTES_PER_CHUNK // 16)                      # <= 1 MiB per basis row
    bas = max(1, min(max_basis, _BYTES_PER_CHUNK // (4 * tok)))      # rows per chunk, <= ~4 MiB
    par = min(n_params, _BYTES_PER_CHUNK // 4)                       # <= 1M params per chunk
    small = max(1, min(max_basis, 1 << 16))
    return {
        STEP: (1024,), INTERVAL_START_STEP: (1024,), INTERVAL_END_STEP: (1024,),
        LOSS: (1, tok),
        DIRECTIONAL_GRAD: (1, bas, tok), CURVATURE: (1, bas, tok),
        POLCA: (1, bas, tok), POLCA_FIRST: (1, bas, tok),
        DELTA: (64, small), EIGENVALUE: (small,), BASIS_STEP: (small,),
        BASIS_VECTORS: (1, par), WEIGHTS: (1, par),
        "token_coord": (min(n_tokens, 1 << 20),),
    }


def check_weights_compressors(value: Any) -> tuple | None:
    """`value` as zarr 3 compressors (a tuple of bytes-to-bytes codecs) or None; TypeError otherwise."""
    if value is None:
        return None
    codecs = tuple(value) if isinstance(value, (list, tuple)) else (value,)
    for codec in codecs:
        if not isinstance(codec, BytesBytesCodec):
            raise TypeError(f"weights_compressors: expected zarr 3 compressors (e.g. zarr.codecs.ZstdCodec(), "
                            f"a list of them) or None for raw bytes, got {codec!r}")
    return codecs or None


def _fill_value_for(dtype: np.dtype) -> Any:
    """NaN for floats, -1 for signed ints, 0 for unsigned, False, '' for strings."""
    kind = np.dtype(dtype).kind
    return {"f": np.nan, "i": -1, "u": 0, "b": False, "U": ""}.get(kind, None)




# ---------------------------------------------------------------------- paths & groups
def _writable(path: Path) -> bool:
    effective = os.access in os.supports_effective_ids  # the user the process acts as
    return os.access(path, os.W_OK | os.X_OK, effective_ids=effective)


def check_store_path(path: Any, mode: str, storage_options: dict | None = None) -> bool:
    """Fail now, not after hours of training, if a store cannot be written at ``path`` in ``mode``.

    Args:
        path: a local directory or a URL (``s3://bucket/run.zarr``).
        mode: ``'w-'``, ``'w'`` or ``'a'``.
        storage_options: options of a URL's filesystem (see :func:`open_store`).

    Returns:
        Whether something (not an empty directory) is at ``path``.

    Raises:
        NotADirectoryError, PermissionError: ``path`` cannot hold a store.
        FileNotFoundError: the bucket of a URL does not exist.
        StoreExistsError: mode ``'w-'`` and something is at ``path``.
        ValueError, ImportError: a URL that cannot be opened (see ``resolve_store``).
    """
    location = resolve_store(path, storage_options)
    if location.remote:
        exists = _check_remote_location(location)
    else:
        path = location.target
        _check_location(path)
        exists = path.exists() and any(path.iterdir())
    if mode == "w-" and exists:
        raise StoreExistsError(f"{str(location)!r} already exists; use mode='a' to resume that "
                               "store (with ckpt_path) or mode='w' to overwrite it")
    return exists


def _remote_exists(location: StoreLocation) -> bool:
    """Whether anything is stored at or under a remote store's URL."""
    fs, root = location.filesystem()
    if not fs.exists(root):
        return False
    if fs.isfile(root):
        raise NotADirectoryError(f"POLCA store URL {str(location)!r} is an object (a file), not a prefix")
    return bool(fs.ls(root, detail=False))


def _check_remote_location(location: StoreLocation) -> bool:
    """:func:`_check_location` of a URL: reachable, in a bucket that exists; whether something is there."""
    try:
        exists = _remote_exists(location)
        fs, root = location.filesystem()
        if not exists and hasattr(fs, "split_path"):  # object stores (s3fs, gcsfs, adlfs): the bucket must exist
            bucket = fs.split_path(root)[0]
            if not fs.exists(bucket):
                raise FileNotFoundError(f"cannot create POLCA store {str(location)!r}: the bucket {bucket!r} does "
                                        "not exist or cannot be reached with these credentials")
    except PermissionError as error:
        raise PermissionError(f"POLCA store {str(location)!r} cannot be accessed: {error}") from error
    return exists


def _check_location(path: Path) -> None:
    """Fail now, not after hours of training, if `path` cannot hold a store."""
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"POLCA store path {str(path)!r} is a file, not a directory")
        if not _writable(path):
            raise PermissionError(f"POLCA store directory {str(path)!r} is not writable")
        return
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"cannot create POLCA store {str(path)!r}: {str(parent)!r} is a file, not a directory")
    if not _writable(parent):
        raise PermissionError(f"cannot create POLCA store {str(path)!r}: {str(parent)!r} is not writable")


def _open_polca_group(path: Any, mode: str = "r", storage_options: dict | None = None) -> zarr.Group:
    """The zarr group at `path` (a path, URL or StoreLocation) if it is a POLCA store;
    FileNotFoundError or StoreError."""
    location = resolve_store(path, storage_options)
    if location.remote:
        path = str(location)
        store = location.zarr_store(read_only=mode == "r")
    else:
        local = location.target
        if not local.exists():
            raise FileNotFoundError(f"no POLCA store at {str(local)!r}: the path does not exist")
        if not local.is_dir():
            raise StoreError(f"{str(local)!r} is a file, not a POLCA store (a Zarr directory)")
        store = path = local if isinstance(path, StoreLocation) else path
    try:
        group = zarr.open_group(store, mode=mode, use_consolidated=False)
    except (FileNotFoundError, zarr.errors.BaseZarrError) as error:
        if location.remote and not _remote_exists(location):
            raise FileNotFoundError(f"no POLCA store at {path!r}: nothing is stored there") from None
        raise StoreError(f"{path!r} is not a POLCA store: it is not a Zarr group ({error})") from None
    version = group.attrs.get(FORMAT_KEY)
    if version is None:
        raise StoreError(f"{path!r} is a Zarr group but not a POLCA store (no {FORMAT_KEY!r} attribute)")
    if version > FORMAT_VERSION:
        raise StoreError(f"{path!r} has store format {version}; this polca_lightning reads up to "
                         f"{FORMAT_VERSION}: upgrade polca_lightning")
    return group


def _is_polca_store(path: Path | StoreLocation) -> bool:
    try:
        _open_polca_group(path)
    except (OSError, ValueError):
        return False
    return True


def _remove_store(path: Path | StoreLocation) -> None:
    """Delete a previous POLCA store (or an empty directory) at `path`; refuse anything else."""
    location = resolve_store(path)
    if location.remote:
        if not _remote_exists(location):
            return
    else:
        path = location.target
        if not path.exists():
            return
        if path.is_dir() and not any(path.iterdir()):
            return
    if not _is_polca_store(location):
        raise StoreError(f"mode='w' refuses to delete {str(location)!r}: it is not a POLCA store. "
                         "Choose another path or remove it yourself.")
    if location.remote:
        fs, root = location.filesystem()
        fs.rm(root, recursive=True)
    else:
        shutil.rmtree(path)


def _consolidate(path: Any) -> None:
    location = resolve_store(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "consolidated metadata is not part of the v3 spec"
        zarr.consolidate_metadata(location.zarr_store())



def _n_params(parameters: list[tuple[str, tuple[int, ...]]]) -> int:
    return sum(math.prod(shape) for _, shape in parameters)






def _lengths(attrs: dict) -> dict[str, int]:
    n_snapshots, n_basis = int(attrs.get("committed_snapshots", 0)), int(attrs.get("committed_basis", 0))
    return {SNAPSHOT: n_snapshots, INTERVAL: max(n_snapshots - 1, 0), BASIS: n_basis}






