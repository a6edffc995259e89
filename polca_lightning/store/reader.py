"""Reading a POLCA store: :func:`open_store`, a lazy ``xarray.Dataset`` trimmed to what is committed.

Imports the schema (``store/schema.py``), never the writer.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import xarray as xr
import zarr
from xarray.backends import BackendArray
from xarray.core import indexing

from polca_lightning.store.schema import (
    BASIS_STEP, INTERVAL_END_STEP, INTERVAL_START_STEP, STEP, TRAINING_SPECS, StoreError, _lengths, _open_polca_group,
)

__all__ = ["open_store", "STEP_INDEXES"]

#: step coordinates that :func:`open_store` indexes, so that ``.sel`` takes optimizer steps
STEP_INDEXES = (STEP, INTERVAL_START_STEP, INTERVAL_END_STEP, BASIS_STEP)


# ---------------------------------------------------------------------------- reading
class _ZarrBackendArray(BackendArray):
    """Lazy view of one zarr array for xarray (outer indexing maps onto ``oindex``)."""

    def __init__(self, array: zarr.Array):
        self._array = array
        self.shape = tuple(array.shape)
        self.dtype = np.dtype(array.dtype.to_native_dtype() if hasattr(array.dtype, "to_native_dtype") else array.dtype)

    def __getitem__(self, key: indexing.ExplicitIndexer) -> np.ndarray:
        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.OUTER, self._raw)

    def _raw(self, key: tuple) -> np.ndarray:
        if all(isinstance(k, slice) for k in key):
            return np.asarray(self._array[key])
        return np.asarray(self._array.oindex[key])


def open_store(path: Any, *, storage_options: dict | None = None, analysis: bool = True) -> xr.Dataset:
    """Open a POLCA store lazily as a labelled :class:`xarray.Dataset`.

    Every variable is cut to the committed lengths, so a store still being written (or
    left by a crash) shows its complete part. Nothing is read until values are used;
    dask is not needed. ``ds.attrs["complete"]`` tells whether the run closed the store.

    Args:
        path: directory of the store, or a URL that fsspec opens (``s3://bucket/run.zarr``,
            ``gs://...``, ``memory://...``; ``file://`` is a local path).
        storage_options: options of the URL's filesystem, as
            ``xarray.open_zarr(url, storage_options=...)`` takes them (for S3: ``key``,
            ``secret``, ``endpoint_url`` or ``client_kwargs={"endpoint_url": ...}``);
            without them the filesystem reads its environment (``AWS_*`` variables).
        analysis: with the analysis results (:func:`write_analysis`'s variables); ``False``:
            the training data alone (the layout's variables and the token coordinates).

    Returns:
        The Dataset: the variables of the module docstring plus analysis results.

    Raises:
        FileNotFoundError: nothing at `path`.
        StoreError: `path` is not a POLCA store.
        ValueError, ImportError: a URL fsspec cannot open (an unknown scheme, its package
            missing: the message names it), storage options for a local path.

    Example:
        >>> ds = open_store("runs/polca.zarr")
        >>> ds.polca.sel(basis=0).sum("interval")      # projected loss change per token
        >>> ds.loss.sel(step=100)                       # the snapshot at optimizer step 100
        >>> ds.polca.sel(interval_end_step=100)         # the interval that ends there
        >>> open_store("runs/polca.zarr", analysis=False)  # the training data, without the results
        >>> ds = open_store("s3://bucket/run.zarr", storage_options={"endpoint_url": "http://minio:9000"})
    """
    group = _open_polca_group(path, storage_options=storage_options)
    attrs = dict(group.attrs)
    lengths = _lengths(attrs)
    coord_names = set(attrs.pop("coordinates", "").split())
    variables: dict[str, xr.Variable] = {}
    for name, array in sorted(group.arrays(), key=lambda item: item[0]):
        if not analysis and name not in TRAINING_SPECS and name not in coord_names:
            continue
        dims = array.metadata.dimension_names
        if dims is None or any(d is None for d in dims):
            warnings.warn(f"open_store: skipping array {name!r}: it has no dimension_names", UserWarning, stacklevel=2)
            continue
        var = xr.Variable(dims, indexing.LazilyIndexedArray(_ZarrBackendArray(array)), dict(array.attrs))
        short = [d for d in dims if d in lengths and var.sizes[d] < lengths[d]]
        if short:
            if name in TRAINING_SPECS or name in coord_names:
                raise StoreError(f"{path!r} is damaged: {name!r} is shorter along {short[0]!r} "
                                 f"({var.sizes[short[0]]}) than the committed {lengths[short[0]]}")
            warnings.warn(f"open_store: skipping analysis variable {name!r}: computed for "
                          f"{var.sizes[short[0]]} {short[0]} entries, the store now has "
                          f"{lengths[short[0]]}; run the analysis again", UserWarning, stacklevel=2)
            continue
        variables[name] = var.isel({d: slice(0, lengths[d]) for d in dims if d in lengths})
    coords = {k: v for k, v in variables.items() if k in coord_names or (v.dims == (k,))}
    data_vars = {k: v for k, v in variables.items() if k not in coords}
    ds = xr.Dataset(data_vars, coords, attrs)
    # optimizer steps as indexes: ds.sel(step=100), ds.polca.sel(interval_end_step=100)
    for name in STEP_INDEXES:
        if name in ds.coords and ds[name].ndim == 1 and ds.sizes[ds[name].dims[0]]:
            ds = ds.set_xindex(name)
    return ds

