"""The module ``__getattr__`` of an import path that moved: the old path keeps working, with a warning."""

from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def moved_getattr(old: str, new: str) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for module ``old`` whose names now live in module ``new``.

    Each name is looked up in ``new`` (an ``AttributeError`` for a name it never had) and
    comes with a ``DeprecationWarning`` naming both paths.
    """

    def __getattr__(name: str) -> Any:
        value = getattr(importlib.import_module(new), name)
        warnings.warn(f"{old}.{name} moved to {new}.{name}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        return value

    return __getattr__
