"""The POLCA store: a Zarr v3 group that a training run fills and users reload.

- ``schema``: the data contract: variable names and layout, dimensions, chunking, the
  format version, the store errors and the path checks (layout table in its docstring).
- ``reader``: :func:`open_store`, a lazy ``xarray.Dataset`` trimmed to what is committed.
- ``writer``: :class:`StoreWriter` (the background writer the callback uses),
  :class:`NullWriter` (what the ranks that do not write hold) and :func:`write_analysis` (analysis results beside the training data).
- ``location``: local paths and fsspec URLs (``s3://bucket/run.zarr``) with their
  ``storage_options``.

The reader and the writer import the schema and never each other.
"""

from polca_lightning.store.reader import open_store
from polca_lightning.store.schema import (
    BASIS,
    BASIS_STEP,
    BASIS_VECTORS,
    BUILTIN_TOKEN_COORDS,
    CURVATURE,
    DELTA,
    DIRECTIONAL_GRAD,
    EIGENVALUE,
    ENGINE_CALIBRATION,
    FORMAT_KEY,
    FORMAT_VERSION,
    INTERVAL,
    INTERVAL_END_STEP,
    INTERVAL_START_STEP,
    LOSS,
    PARAM,
    POLCA,
    POLCA_FIRST,
    POSITION,
    RESERVED_NAMES,
    SEQUENCE,
    SNAPSHOT,
    STEP,
    TARGET,
    TOKEN,
    TRAINING_DIMS,
    TRAINING_SPECS,
    WEIGHTS,
    WEIGHTS_COMPRESSORS,
    StoreError,
    StoreExistsError,
    StoreWriteError,
    TokenIndex,
    check_store_path,
    check_weights_compressors,
)
from polca_lightning.store.writer import NullWriter, StoreWriter, drop_marked_variables, write_analysis

__all__ = [
    "open_store",
    "StoreWriter",
    "NullWriter",
    "write_analysis",
    "drop_marked_variables",
    "TokenIndex",
    "StoreError",
    "StoreExistsError",
    "StoreWriteError",
    "check_store_path",
    "check_weights_compressors",
    "WEIGHTS_COMPRESSORS",
    "FORMAT_KEY",
    "FORMAT_VERSION",
    "TRAINING_DIMS",
    "TRAINING_SPECS",
    "RESERVED_NAMES",
    "BUILTIN_TOKEN_COORDS",
    # variable, dimension and token coordinate names (schema's constants)
    "STEP",
    "INTERVAL_START_STEP",
    "INTERVAL_END_STEP",
    "LOSS",
    "DIRECTIONAL_GRAD",
    "CURVATURE",
    "DELTA",
    "POLCA",
    "POLCA_FIRST",
    "EIGENVALUE",
    "ENGINE_CALIBRATION",
    "BASIS_STEP",
    "BASIS_VECTORS",
    "WEIGHTS",
    "SNAPSHOT",
    "INTERVAL",
    "BASIS",
    "TOKEN",
    "PARAM",
    "SEQUENCE",
    "POSITION",
    "TARGET",
]
