"""Moved to :mod:`polca_lightning.core.polca`; this path keeps working for one release."""

import warnings as _warnings

from polca_lightning.core import polca as _moved


def __getattr__(name: str):
    value = getattr(_moved, name)  # AttributeError for a name the module never had
    _warnings.warn(f"polca_lightning.polca.{name} moved to polca_lightning.core.polca.{name}; "
                   "the old path goes away in the next release", DeprecationWarning, stacklevel=2)
    return value
