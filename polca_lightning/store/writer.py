"""Writing a POLCA store: the background writer (:class:`StoreWriter`), :class:`NullWriter` (the
writer of a process that writes nothing) and :func:`write_analysis`.

Imports the schema (``store/schema.py``), never the reader.

One process writes. Every ``write_*`` call validates and copies its inputs in the
caller's thread and queues a closure; one thread runs the closures in order. Arrays
grow (``resize``) just before data lands in them, so a kill can leave shapes longer than
the data written: the group attributes ``committed_snapshots``/``committed_basis`` are
rewritten only after the data they cover is on disk, and readers trust only those.
"""

from __future__ import annotations

import atexit
import collections
import sys
import threading
import warnings
import weakref
from importlib import metadata
from typing import Any, Callable

import numpy as np
import zarr

from polca_lightning.store.location import resolve_store
from polca_lightning.store.schema import (
    BASIS, BASIS_STEP, BASIS_VECTORS, CURVATURE, DELTA, DIRECTIONAL_GRAD, EIGENVALUE, INTERVAL, INTERVAL_END_STEP,
    INTERVAL_START_STEP, LOSS, PARAM, POLCA, POLCA_FIRST, SEQUENCE, SNAPSHOT, STEP, TOKEN, WEIGHTS,
    BUILTIN_TOKEN_COORDS, FORMAT_KEY, FORMAT_VERSION, RESERVED_NAMES, TRAINING_SPECS, WEIGHTS_COMPRESSORS,
    StoreError, StoreWriteError, TokenIndex, _as_float32, _as_index, _as_int64, _chunk_plan, _consolidate,
    _fill_value_for, _jsonable, _lengths, _n_params, _open_polca_group, _remove_store, _same_json, _to_numpy,
    check_weights_compressors, check_store_path,
)


# --------------------------------------------------------------------- background queue
class BackgroundQueue:
    """Runs closures in submission order on one thread (or inline), holding at most
    `max_pending_bytes` of queued data; the first failure stops it and is re-raised,
    wrapped in StoreWriteError, by every later call."""

    def __init__(self, description: str, background: bool = True, max_pending_bytes: int = 1 << 30):
        self._description = description
        self._max_pending = max_pending_bytes
        self._jobs: collections.deque[tuple[Callable[[], None], int]] = collections.deque()
        self._pending_bytes = 0
        self._error: BaseException | None = None
        self._stopping = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="polca-store-writer", daemon=True)
            self._thread.start()
            # The thread is a daemon (a forgotten close() must not hang the interpreter);
            # at exit, finish what is queued so the committed part is as long as possible.
            # It must run before concurrent.futures shuts its executors down (zarr's I/O
            # runs on one), hence threading's exit hooks rather than atexit's, which run later.
            self._atexit = _weak_flush(self)
            _REGISTER_AT_EXIT(self._atexit)

    def raise_if_failed(self) -> None:
        if self._error is not None:
            raise StoreWriteError(f"writing {self._description} failed in the background writer: "
                                  f"{type(self._error).__name__}: {self._error}") from self._error

    def submit(self, job: Callable[[], None], nbytes: int = 0) -> None:
        self.raise_if_failed()
        if self._thread is None:
            try:
                job()
            except Exception as error:
                self._error = error
                self.raise_if_failed()
            return
        with self._cond:
            while self._jobs and self._pending_bytes + nbytes > self._max_pending and self._error is None:
                self._cond.wait()
            self.raise_if_failed()
            if self._stopping:
                raise StoreError(f"{self._description} is closed")
            self._jobs.append((job, nbytes))
            self._pending_bytes += nbytes
            self._cond.notify_all()

    def flush(self) -> None:
        if self._thread is not None:
            with self._cond:
                while self._jobs and self._error is None:
                    self._cond.wait()
        self.raise_if_failed()

    def stop(self) -> None:
        """Finish queued work, stop the thread; re-raise a failure."""
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            self._thread.join()
            self._atexit.cancelled = True
        self.raise_if_failed()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return
                job, nbytes = self._jobs[0]
            try:
                job()
            except BaseException as error:  # noqa: BLE001 - handed to the caller's thread
                with self._cond:
                    self._error = error
                    self._jobs.clear()
                    self._pending_bytes = 0
                    self._cond.notify_all()
                return
            with self._cond:
                self._jobs.popleft()
                self._pending_bytes -= nbytes
                self._cond.notify_all()


# threading._register_atexit (3.9+, what concurrent.futures uses) runs hooks at
# interpreter shutdown before the executors stop; atexit is the fallback.
_REGISTER_AT_EXIT = getattr(threading, "_register_atexit", atexit.register)


def _weak_flush(queue: BackgroundQueue) -> Callable[[], None]:
    ref = weakref.ref(queue)

    def flush_at_exit() -> None:
        live = ref()
        if live is not None and not flush_at_exit.cancelled:
            try:
                live.flush()
            except Exception as error:  # noqa: BLE001 - nobody left to raise to
                warnings.warn(f"POLCA store writer failed at exit: {error}", RuntimeWarning, stacklevel=1)

    flush_at_exit.cancelled = False  # type: ignore[attr-defined]
    return flush_at_exit



# -------------------------------------------------------------------------- the writer
class StoreWriter:
    """Writes one training run into a POLCA store, in the background.

    Args:
        path: directory of the Zarr v3 store, or a URL that fsspec opens
            (``s3://bucket/run.zarr``; see :func:`~polca_lightning.store.open_store`).
        mode: ``'w-'`` create, refusing if anything (but an empty directory) is at
            `path`; ``'w'`` overwrite a previous POLCA store (never anything else);
            ``'a'`` resume an existing store after checking it was written with the same
            settings (created if absent). On resume, data past the committed lengths
            (left by a crash) is dropped.
        tokens: the probe tokens.
        parameters: ``[(name, shape), ...]`` of the selected parameters, in order.
        order: POLCA order of the ``polca`` variable.
        config: JSON-able run settings, stored as the ``config`` attribute.
        resumable_changes: keys of ``config`` a resume may set otherwise (the others must
            match the stored ones).
        max_basis: most basis vectors the run will find.
        with_curvature: create the ``curvature`` variable.
        store_weights: create the ``weights`` variable (needed for backfill).
        background: write on a background thread (``False``: inline, for debugging).
        storage_options: options of a URL's filesystem (``key``, ``secret``,
            ``endpoint_url``, ... for S3), as ``xarray.open_zarr`` takes them.
        weights_compressors: zarr 3 compressors of the ``weights`` snapshots (a codec, a
            list of codecs, or ``None`` for raw bytes); default
            :data:`~polca_lightning.store.WEIGHTS_COMPRESSORS`. A resumed store keeps the
            codecs it was created with (zarr records them per array).

    Raises:
        StoreExistsError: mode ``'w-'`` and something is at `path`.
        StoreError: mode ``'a'`` and a setting differs, or `path` is not a POLCA store.
        PermissionError, NotADirectoryError: `path` cannot be written.
        FileNotFoundError: the bucket of a URL does not exist.
        ValueError, ImportError: a URL fsspec cannot open (the message names a missing package).

    Example:
        >>> w = StoreWriter("run.zarr", tokens=tokens, parameters=[("w", (3, 4))], order="first",
        ...                 config={}, max_basis=8, with_curvature=False)
        >>> w.write_snapshot(0, step=0, loss=loss0, weights=theta0); w.commit(1, 0); w.close()
    """

    writes = True  #: it writes a store (:class:`NullWriter`: ``False``)

    def __init__(self, path: Any, *, mode: str = "w-", tokens: TokenIndex,
                 parameters: list[tuple[str, tuple[int, ...]]], order: str, config: dict,
                 max_basis: int, with_curvature: bool, store_weights: bool = True,
                 background: bool = True, storage_options: dict | None = None,
                 weights_compressors: Any = WEIGHTS_COMPRESSORS, resumable_changes: tuple[str, ...] = ()):
        if mode not in ("w-", "w", "a"):
            raise ValueError(f"mode must be 'w-', 'w' or 'a', got {mode!r}")
        if not isinstance(tokens, TokenIndex):
            raise TypeError(f"tokens must be a TokenIndex, got {type(tokens).__name__}")
        if len(tokens) == 0:
            raise ValueError("tokens: the probe data has no loss-bearing token")
        self.location = resolve_store(path, storage_options)
        self.path = self.location.target  # a Path, or the URL of a remote store
        self.weights_compressors = check_weights_compressors(weights_compressors)
        self.tokens = tokens
        self.parameters = [(str(name), tuple(_as_index(s, f"shape of {name}") for s in shape))
                           for name, shape in parameters]
        self.n_tokens, self.n_params = len(tokens), _n_params(self.parameters)
        if self.n_params == 0:
            raise ValueError("parameters: no parameter selected")
        self.max_basis = _as_index(max_basis, "max_basis", low=1)
        self.with_curvature, self.store_weights = bool(with_curvature), bool(store_weights)
        self.order = str(order)
        self._settings = {  # what a resume must match, as stored in the attributes
            "order": self.order, "with_curvature": self.with_curvature, "store_weights": self.store_weights,
            "max_basis": self.max_basis, "parameters": _jsonable(self.parameters, "parameters"),
            "config": _jsonable(dict(config), "config"), "token_labels": list(tokens.labels),
        }
        self._resumable_changes = frozenset(resumable_changes)
        exists = check_store_path(self.location, mode)
        if mode == "w":
            _remove_store(self.location)
        if mode == "a" and exists:
            self._group = _open_polca_group(self.location, mode="r+")
            self._verify_resume()
        else:
            self._group = self._create()
        # Writer-thread state: array handles, current lengths of the growing dims, steps.
        self._arrays = {name: arr for name, arr in self._group.arrays() if name in TRAINING_SPECS}
        attrs = self._group.attrs
        self._steps: dict[int, int] = {}
        self._truncate_now(int(attrs["committed_snapshots"]), int(attrs["committed_basis"]))  # drop crash leftovers
        self._steps = {i: int(s) for i, s in enumerate(self._arrays[STEP][: self._committed[0]])}
        if attrs.get("complete", False):  # being written again; this rewrite of zarr.json
            self._group.update_attributes({"complete": False})  # also drops the stale consolidated metadata
        self._queue = BackgroundQueue(f"the POLCA store {str(self.path)!r}", background)
        self._closed = False

    # ------------------------------------------------------------------ creation/resume
    def _create(self) -> zarr.Group:
        try:
            version = metadata.version("polca-lightning")
        except metadata.PackageNotFoundError:  # running from a source tree
            version = getattr(sys.modules.get("polca_lightning"), "__version__", "unknown")
        labels = list(self.tokens.labels)
        coords = [*BUILTIN_TOKEN_COORDS, *labels] + [n for n, s in TRAINING_SPECS.items() if s.coordinate]
        group = zarr.open_group(self.location.zarr_store(), mode="w", zarr_format=3, attributes={
            FORMAT_KEY: FORMAT_VERSION, "polca_lightning_version": version, **self._settings,
            "committed_snapshots": 0, "committed_basis": 0, "complete": False,
            "coordinates": " ".join(coords),
        })
        chunks = _chunk_plan(self.n_tokens, self.n_params, self.max_basis)
        sizes = {SNAPSHOT: 0, INTERVAL: 0, BASIS: 0, TOKEN: self.n_tokens, PARAM: self.n_params}
        for name, spec in TRAINING_SPECS.items():
            if (name == CURVATURE and not self.with_curvature) or (name == WEIGHTS and not self.store_weights):
                continue
            attributes = {"description": spec.description}
            if name == POLCA:
                attributes["order"] = self.order
            # The big float arrays other than the weights are stored raw: zstd saved ~8% on
            # float32 data here and made writing 2.5x slower (and held the GIL away from
            # training). The weights get WEIGHTS_COMPRESSORS (see its comment for the figures).
            big = TOKEN in spec.dims or PARAM in spec.dims
            compressors = self.weights_compressors if name == WEIGHTS else (None if big else "auto")
            group.create_array(name, shape=tuple(sizes[d] for d in spec.dims), chunks=chunks[name],
                               dtype=spec.dtype, fill_value=_fill_value_for(np.dtype(spec.dtype)),
                               compressors=compressors, dimension_names=spec.dims,
                               attributes=attributes)
        for name, values in self.tokens.coordinates().items():
            arr = group.create_array(name, shape=(self.n_tokens,), chunks=chunks["token_coord"], dtype="int64",
                                     fill_value=-1, dimension_names=(TOKEN,),
                                     attributes={"description": "token label" if name in labels else f"token {name}"})
            arr[:] = values
        return group

    def _verify_resume(self) -> None:
        attrs = self._group.attrs
        stored_tokens = {name: self._group[name][:] for name in (*BUILTIN_TOKEN_COORDS, *attrs.get("token_labels", []))}
        checks = [("number of probe tokens", len(stored_tokens[SEQUENCE]), self.n_tokens)]
        checks += [(k, attrs.get(k), v) for k, v in self._settings.items() if k not in ("config", "parameters")]
        checks.append(("parameters", attrs.get("parameters"), self._settings["parameters"]))
        for name, values in self.tokens.coordinates().items():
            old = stored_tokens.get(name)
            if old is not None and old.shape == values.shape and not np.array_equal(old, values):
                i = int(np.flatnonzero(old != values)[0])
                checks.append((f"token coordinate {name!r} at token {i}", int(old[i]), int(values[i])))
        old_config, new_config = attrs.get("config", {}), self._settings["config"]
        compared = (set(old_config) | set(new_config)) - self._resumable_changes
        for key in sorted(compared, key=lambda k: (k not in new_config, k)):
            checks.append((f"config[{key!r}]", old_config.get(key, "<absent>"), new_config.get(key, "<absent>")))
        for name, old, new in checks:
            if not _same_json(old, new):
                raise StoreError(f"cannot resume the POLCA store {str(self.path)!r}: {name} differs "
                                 f"(store: {old!r}, this run: {new!r}). Use mode='w' to overwrite it "
                                 "or choose another path.")

    # ------------------------------------------------------------------ writer-thread side
    def _ensure(self, dim: str, n: int) -> None:
        """Grow every array along `dim` to at least `n` (interval stays snapshot - 1)."""
        if dim == INTERVAL:
            return self._ensure(SNAPSHOT, n + 1)
        if n <= self._lengths[dim]:
            return None
        self._lengths[dim] = n
        if dim == SNAPSHOT:
            self._lengths[INTERVAL] = n - 1
        self._resize_all(grow=True)
        return None

    def _resize_all(self, grow: bool) -> None:
        for name, arr in self._arrays.items():
            shape = tuple(self._lengths.get(d, s) for d, s in zip(TRAINING_SPECS[name].dims, arr.shape))
            if shape != tuple(arr.shape):
                arr.resize(shape) if grow else _shrink_array(arr, shape)

    def _truncate_now(self, n_snapshots: int, n_basis: int) -> None:
        # Commit the shorter lengths first: a kill during the shrink leaves a valid store.
        self._group.update_attributes({"committed_snapshots": n_snapshots, "committed_basis": n_basis})
        self._committed = (n_snapshots, n_basis)
        self._lengths = {SNAPSHOT: n_snapshots, INTERVAL: max(n_snapshots - 1, 0), BASIS: n_basis}
        self._resize_all(grow=False)
        self._steps = {i: s for i, s in self._steps.items() if i < n_snapshots}

    def _write_snapshot(self, index: int, step: int, loss: np.ndarray, weights: np.ndarray | None) -> None:
        self._ensure(SNAPSHOT, index + 1)
        a = self._arrays
        a[STEP][index] = step
        a[LOSS][index, :] = loss
        if weights is not None:
            a[WEIGHTS][index, :] = weights
        self._steps[index] = step
        if index - 1 in self._steps:  # interval index-1 ends here
            a[INTERVAL_START_STEP][index - 1] = self._steps[index - 1]
            a[INTERVAL_END_STEP][index - 1] = step
        if index + 1 in self._steps:  # rewriting an earlier snapshot
            a[INTERVAL_START_STEP][index] = step

    def _write_rows(self, name: str, time_dim: str, index: int, basis_start: int, values: np.ndarray) -> None:
        self._ensure(time_dim, index + 1)
        self._ensure(BASIS, basis_start + len(values))
        self._arrays[name][index, basis_start: basis_start + len(values)] = values

    def _write_basis(self, start: int, vectors: np.ndarray, eigenvalue: np.ndarray, step: np.ndarray) -> None:
        stop = start + len(vectors)
        self._ensure(BASIS, stop)
        self._arrays[BASIS_VECTORS][start:stop] = vectors
        self._arrays[EIGENVALUE][start:stop] = eigenvalue
        self._arrays[BASIS_STEP][start:stop] = step

    def _write_interval(self, i: int, start: int, delta, polca, polca_first) -> None:
        self._write_rows(DELTA, INTERVAL, i, start, delta)
        self._write_rows(POLCA, INTERVAL, i, start, polca)
        self._write_rows(POLCA_FIRST, INTERVAL, i, start, polca_first)

    def _commit(self, n_snapshots: int, n_basis: int) -> None:
        self._ensure(SNAPSHOT, n_snapshots)  # a reader trims to these; never beyond the shapes
        self._ensure(BASIS, n_basis)
        self._group.update_attributes({"committed_snapshots": n_snapshots, "committed_basis": n_basis})
        self._committed = (n_snapshots, n_basis)

    # ------------------------------------------------------------------ public writes
    def _submit(self, job: Callable[[], None], *arrays: np.ndarray | None) -> None:
        if self._closed:
            raise StoreError(f"the POLCA store writer for {str(self.path)!r} is closed")
        self._queue.submit(job, sum(a.nbytes for a in arrays if a is not None))

    def _rows(self, basis_start: int, values: Any, name: str) -> tuple[int, np.ndarray]:
        start = _as_index(basis_start, "basis_start", high=self.max_basis - 1)
        array = np.array(_to_numpy(values), dtype=np.float32, copy=True)
        kb = array.shape[0] if array.ndim == 2 else -1
        if array.ndim != 2 or array.shape[1] != self.n_tokens or not 1 <= kb <= self.max_basis - start:
            raise ValueError(f"{name} must have shape [kb, {self.n_tokens}] with 1 <= kb <= "
                             f"{self.max_basis - start} (max_basis {self.max_basis}, basis_start {start}), "
                             f"got {tuple(array.shape)}")
        return start, array

    def write_snapshot(self, index: int, step: int, loss: Any, weights: Any = None) -> None:
        """Queue snapshot `index`: its optimizer `step`, `loss` [T], `weights` [d] (optional)."""
        index, step = _as_index(index, "index"), _as_index(step, "step", low=-(1 << 62))
        loss = _as_float32(loss, "loss", (self.n_tokens,))
        weights = (_as_float32(weights, "weights", (self.n_params,))
                   if weights is not None and self.store_weights else None)
        self._submit(lambda: self._write_snapshot(index, step, loss, weights), loss, weights)

    def write_directional_grad(self, snapshot: int, basis_start: int, g: Any) -> None:
        """Queue ``g`` [kb, T] for basis rows ``basis_start:basis_start+kb`` at `snapshot`."""
        snapshot = _as_index(snapshot, "snapshot")
        start, g = self._rows(basis_start, g, "g")
        self._submit(lambda: self._write_rows(DIRECTIONAL_GRAD, SNAPSHOT, snapshot, start, g), g)

    def write_curvature(self, snapshot: int, basis_start: int, c: Any) -> None:
        """Queue ``c`` [kb, T] like :meth:`write_directional_grad` (``with_curvature`` runs only)."""
        if not self.with_curvature:
            raise StoreError("this store was created with with_curvature=False: it has no curvature variable")
        snapshot = _as_index(snapshot, "snapshot")
        start, c = self._rows(basis_start, c, "c")
        self._submit(lambda: self._write_rows(CURVATURE, SNAPSHOT, snapshot, start, c), c)

    def write_basis(self, basis_start: int, vectors: Any, eigenvalue: Any, basis_step: Any) -> None:
        """Queue basis rows: `vectors` [kb, d], `eigenvalue` [kb] (NaN allowed), `basis_step` [kb]."""
        start = _as_index(basis_start, "basis_start", high=self.max_basis - 1)
        vectors = np.array(_to_numpy(vectors), dtype=np.float32, copy=True)
        kb = vectors.shape[0] if vectors.ndim == 2 else -1
        if vectors.ndim != 2 or vectors.shape[1] != self.n_params or not 1 <= kb <= self.max_basis - start:
            raise ValueError(f"vectors must have shape [kb, {self.n_params}] with 1 <= kb <= "
                             f"{self.max_basis - start}, got {tuple(vectors.shape)}")
        eigenvalue = _as_float32(np.reshape(_to_numpy(eigenvalue), -1), "eigenvalue", (kb,))
        steps = _as_int64(np.reshape(_to_numpy(basis_step), -1), "basis_step")
        if steps.shape != (kb,):
            raise ValueError(f"basis_step must have shape ({kb},), got {steps.shape}")
        self._submit(lambda: self._write_basis(start, vectors, eigenvalue, steps), vectors)

    def write_interval(self, interval: int, basis_start: int, delta: Any, polca: Any, polca_first: Any) -> None:
        """Queue interval values: `delta` [kb], `polca` and `polca_first` [kb, T]."""
        interval = _as_index(interval, "interval")
        start, polca = self._rows(basis_start, polca, POLCA)
        _, polca_first = self._rows(basis_start, polca_first, POLCA_FIRST)
        delta = _as_float32(np.reshape(_to_numpy(delta), -1), "delta", (len(polca),))
        if polca_first.shape != polca.shape:
            raise ValueError(f"polca_first has shape {polca_first.shape}, polca {polca.shape}")
        self._submit(lambda: self._write_interval(interval, start, delta, polca, polca_first),
                     delta, polca, polca_first)

    def commit(self, n_snapshots: int, n_basis: int) -> None:
        """Queue: declare the first `n_snapshots` snapshots and `n_basis` vectors complete.

        Readers see exactly this much (and ``n_snapshots - 1`` intervals). Runs after the
        writes queued before it, so it only ever covers data already on disk.
        """
        n_snapshots = _as_index(n_snapshots, "n_snapshots")
        n_basis = _as_index(n_basis, "n_basis", high=self.max_basis)
        self._submit(lambda: self._commit(n_snapshots, n_basis))

    def set_attributes(self, attributes: dict) -> None:
        """Queue: add JSON-able ``attributes`` to the store's group attributes (beside the
        run's settings; a resume does not compare them)."""
        attributes = _jsonable(dict(attributes), "attributes")
        self._submit(lambda: self._group.update_attributes(attributes))

    def flush(self) -> None:
        """Block until everything queued is on disk; re-raise a writer failure."""
        self._queue.flush()

    def close(self, complete: bool = True) -> None:
        """Flush and stop the writer. ``complete=True`` marks the run finished: arrays are
        cut to the committed lengths and the metadata consolidated. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.stop()
        if complete:
            self._truncate_now(*self._committed)
            self._group.update_attributes({"complete": True})
            _consolidate(self.location)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close(complete=True)
        else:
            try:
                self.close(complete=False)
            except StoreWriteError:
                pass  # the exception in flight says more

    # ------------------------------------------------------------------ read side (committed data)
    @property
    def committed(self) -> tuple[int, int]:
        """``(n_snapshots, n_basis)`` on disk and committed, after a flush."""
        self.flush()
        return self._committed

    def _snapshot_index(self, snapshot: int) -> int:
        return _as_index(snapshot, "snapshot", high=self.committed[0] - 1)

    def read_weights(self, snapshot: int) -> np.ndarray:
        """Flattened parameters [d] of committed `snapshot`."""
        if not self.store_weights:
            raise StoreError("this store was created with store_weights=False: it holds no weights")
        return self._arrays[WEIGHTS][self._snapshot_index(snapshot), :]

    def read_steps(self) -> np.ndarray:
        """Steps [S] of the committed snapshots."""
        return self._arrays[STEP][: self.committed[0]]

    def read_basis(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Committed basis: vectors [K, d], eigenvalue [K], basis_step [K]."""
        k = self.committed[1]
        a = self._arrays
        return a[BASIS_VECTORS][:k], a[EIGENVALUE][:k], a[BASIS_STEP][:k]

    def read_directional_grad(self, snapshot: int) -> np.ndarray:
        """g [K, T] of committed `snapshot` over the committed basis."""
        index = self._snapshot_index(snapshot)
        return self._arrays[DIRECTIONAL_GRAD][index, : self._committed[1], :]

    def truncate(self, n_snapshots: int, n_basis: int) -> None:
        """Drop everything past `n_snapshots` snapshots and `n_basis` vectors (resume from an
        earlier checkpoint). Raises StoreError if more is asked than is committed."""
        done_s, done_b = self.committed
        n_snapshots = _as_index(n_snapshots, "n_snapshots")
        n_basis = _as_index(n_basis, "n_basis")
        if n_snapshots > done_s or n_basis > done_b:
            raise StoreError(f"cannot truncate {str(self.path)!r} to {n_snapshots} snapshots and {n_basis} "
                             f"basis vectors: only {done_s} and {done_b} are committed")
        self._submit(lambda: self._truncate_now(n_snapshots, n_basis))
        self.flush()


StoreWriter.__module__ = "polca_lightning.store"


class NullWriter:
    """The writer of a process that writes no store: a DDP rank other than 0.

    Takes every call :class:`StoreWriter` takes and keeps nothing; :attr:`writes` is
    ``False``, and the reads return ``None``, so that a tracker holding one receives the
    data from the writing rank instead (a broadcast).
    """

    writes = False
    committed = (0, 0)

    def write_snapshot(self, *args: Any, **kwargs: Any) -> None:
        """Nothing is written."""

    write_directional_grad = write_curvature = write_basis = write_interval = write_snapshot
    commit = truncate = flush = close = set_attributes = write_snapshot

    def read_weights(self, snapshot: int) -> None:
        """Nothing was written: ``None``."""

    def read_basis(self) -> None:
        """Nothing was written: ``None``."""


NullWriter.__module__ = "polca_lightning.store"


def _shrink_array(array: zarr.Array, new_shape: tuple[int, ...]) -> None:
    """Resize `array` down to `new_shape`, resetting dropped cells in kept chunks.

    zarr deletes the chunks that fall wholly outside the new shape but keeps the
    partial ones as they are, so without the reset old values would reappear when the
    array grows again.
    """
    shape = tuple(array.shape)
    for axis, (old, new) in enumerate(zip(shape, new_shape)):
        if new < old:
            chunk = array.chunks[axis]
            end = min(old, -(-new // chunk) * chunk)  # end of the chunk holding index new-1
            if end > new:
                region = [slice(None)] * len(shape)
                region[axis] = slice(new, end)
                array[tuple(region)] = array.fill_value
    if tuple(new_shape) != shape:
        array.resize(tuple(new_shape))


# --------------------------------------------------------------------------- analysis
def write_analysis(path: Any, variables: dict[str, tuple[tuple[str, ...], Any, dict]], *,
                   overwrite: bool = True, storage_options: dict | None = None) -> None:
    """Add analysis results to a store, as variables beside the training data.

    Args:
        path: the store.
        variables: name -> ``(dims, values, attrs)``. Dims may be the store's own
            (``basis``, ``token``, ..., at their committed lengths) or new ones
            (``cluster_id``, ``method``); a variable named like its only dim becomes
            that dim's coordinate.
        overwrite: replace analysis variables of the same names (re-running an analysis);
            with ``False`` an existing name raises StoreError.
        storage_options: options of a URL's filesystem (see :func:`open_store`).

    Raises:
        StoreError: a training name, a size that does not match the store or the other
            analysis variables, or a value that zarr cannot hold.

    Example:
        >>> write_analysis("runs/polca.zarr", {"cluster": (("basis", "token"), labels, {"method": "hdbscan"})})
    """
    location = resolve_store(path, storage_options)
    group = _open_polca_group(location, mode="r+")
    attrs = dict(group.attrs)
    reserved = RESERVED_NAMES | set(attrs.get("token_labels", [])) | {"coordinates"}
    existing = {name: arr for name, arr in group.arrays()}
    sizes = {**_lengths(attrs), TOKEN: existing[SEQUENCE].shape[0], PARAM: _n_params(attrs["parameters"])}
    for name, arr in existing.items():  # dims of the analysis variables that stay
        if name not in reserved and name not in variables and arr.metadata.dimension_names:
            for d, n in zip(arr.metadata.dimension_names, arr.shape):
                sizes.setdefault(d, n)
    prepared = {}
    for name, spec in variables.items():
        if not isinstance(name, str) or not name or "/" in name or name.startswith((".", "__")):
            raise StoreError(f"write_analysis: {name!r} is not a valid variable name")
        if name in reserved:
            raise StoreError(f"write_analysis: {name!r} is a training variable, dimension or coordinate "
                             "of the store; analysis results need names of their own")
        if name in existing and not overwrite:
            raise StoreError(f"write_analysis: {name!r} already exists in {path!r} (pass overwrite=True to replace it)")
        try:
            dims, values, var_attrs = spec
        except (TypeError, ValueError):
            raise StoreError(f"write_analysis: {name!r} must be (dims, values, attrs)") from None
        dims = (dims,) if isinstance(dims, str) else tuple(dims)
        values = np.asarray(_to_numpy(values))
        if values.dtype.kind == "O":
            values = values.astype(str)
        if values.dtype.kind not in "fiubU":
            raise StoreError(f"write_analysis: {name!r} has dtype {values.dtype}, not numbers, booleans or strings")
        if values.ndim != len(dims):
            raise StoreError(f"write_analysis: {name!r} has {values.ndim} dimensions but dims {dims}")
        for d, n in zip(dims, values.shape):
            if sizes.setdefault(d, n) != n:
                raise StoreError(f"write_analysis: {name!r} has {n} entries along {d!r}, the store has {sizes[d]}")
        prepared[name] = (dims, values, _jsonable(dict(var_attrs or {}), f"attrs of {name!r}"))
    for name, (dims, values, var_attrs) in prepared.items():
        if name in existing:
            del group[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # string dtypes: "no Zarr V3 specification yet"
            arr = group.create_array(name, shape=values.shape, dtype=values.dtype,
                                     chunks=tuple(max(1, n) for n in values.shape) if values.size == 0 else "auto",
                                     fill_value=_fill_value_for(values.dtype), dimension_names=dims,
                                     attributes=var_attrs)
            if values.size:
                arr[...] = values
    if attrs.get("complete", False):
        _consolidate(location)  # keep the snapshot in step for xarray.open_zarr


def drop_marked_variables(path: Any, keep: set[str], mark: str, *, storage_options: dict | None = None) -> list[str]:
    """Delete the arrays of a store that carry the attribute ``mark`` and are not in ``keep``
    (results of an earlier analysis that a new one does not replace, so their sizes cannot
    clash); returns their names. Training data never carries an analysis mark."""
    location = resolve_store(path, storage_options)
    group = _open_polca_group(location, mode="r+")
    dropped = [name for name, arr in list(group.arrays()) if name not in keep and mark in arr.attrs]
    for name in dropped:
        del group[name]
    return dropped
