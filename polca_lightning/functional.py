"""Moved to :mod:`polca_lightning.core.functional`; this path keeps working for one release."""

from polca_lightning._moved import moved_getattr

__getattr__ = moved_getattr(__name__, "polca_lightning.core.functional")
