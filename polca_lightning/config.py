"""``POLCAConfig``: the settings of one POLCA run, checked in one place.

:class:`~polca_lightning.POLCACallback` builds one from its keyword arguments (the
field names are the keywords) and hands it to the
:class:`~polca_lightning.tracker.POLCATracker`; the store records
:meth:`POLCAConfig.to_dict` as its ``config`` attribute (with a few facts of the run, see
:data:`RUN_FACTS`), and a resumed run is checked against it field by field, but for
the fields of :meth:`POLCAConfig.resumable_changes`. :meth:`POLCAConfig.from_dict` reads it back:

    >>> from polca_lightning import POLCAConfig, open_store
    >>> config = POLCAConfig.from_dict(open_store("runs/polca.zarr").attrs["config"])
    >>> config.k, config.order
    (1, 'trapezoid')
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from polca_lightning._docs import with_entries
from polca_lightning.core._precision import check_compute_precision
from polca_lightning.core.engine import check_engine, check_memory_cap
from polca_lightning.core.polca import ORDERS

__all__ = ["POLCAConfig", "RUN_FACTS", "BASES"]

BASES = ("hessian", "random")

#: Keys of a store's ``config`` attribute that the run decides rather than the user: the
#: number of probe and Hessian batches, the dtype the callback computes in, the training
#: precision and the frozen parameters left out of the decomposition. A resume must
#: match them too; :meth:`POLCAConfig.from_dict` skips them.
RUN_FACTS = ("n_probe_batches", "n_hessian_batches", "compute_dtype", "training_precision", "frozen_parameters")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _setting(default: Any, doc: str, *, resume: bool = True) -> Any:
    """A field and its documentation (in :class:`POLCAConfig`'s docstring and in every
    entry point's, through :mod:`polca_lightning.settings`); ``resume=False``: a resumed
    run may change it (how the numbers are computed, not which numbers)."""
    return field(default=default, metadata={"resume": resume, "doc": doc})


@dataclass(frozen=True)
class POLCAConfig:
    """What a POLCA run decomposes and how (a frozen dataclass; every field is checked on
    construction).

    Each field is documented where it is defined (``help()`` shows them under Attributes).
    A resumed run must use the same values, except for ``engine``, ``memory_cap`` and
    ``basis_on_device``, which change how the numbers are computed, not which.

    Raises:
        ValueError, TypeError: a bad field, naming it, what was expected and what came.

    Example:
        >>> config = POLCAConfig(snapshot_every=10, basis_every=100, k=2, max_basis=8)
        >>> config.replace(order="first").order
        'first'
    """

    snapshot_every: int = _setting(25, "N, optimizer steps between snapshots.")
    basis_every: int = _setting(200, "M, optimizer steps between basis steps (a multiple of N).")
    k: int = _setting(1, "vectors per basis step.")
    max_basis: int = _setting(15, "at most this many basis vectors.")
    order: str = _setting("trapezoid", """``"first"``, ``"second"``, ``"trapezoid"`` (default) or ``"exact"``: the
        POLCA of the store's ``polca`` variable (``polca_first`` is always stored too).""")
    basis: str | Callable = _setting("hessian", """``"hessian"`` (eigenvectors of the projected Hessian of the mean
        loss on the Hessian data, Algorithm 1 of the paper), ``"random"`` (orthonormal) or a callable
        ``(module, step, basis [K, d]) -> [k, d]`` whose rows are orthonormalised against the basis.""")
    parameters: tuple[str, ...] | None = _setting(None, """names or shell patterns of the parameters to decompose
        (``None``: all that require gradients); kept as a tuple.""")
    engine: str = _setting("auto", """``"auto"`` (the cheaper, by costs measured on the model at the start),
        ``"forward"`` or ``"reverse"``: how the directional derivatives are computed.""", resume=False)
    memory_cap: int = _setting(1 << 30, """bytes one chunk of derivative work (per-sample Jacobian rows
        included), of the eigensolver's products and of the orthonormalisation may use on the model's
        device; it also bounds how many random directions (up to 16, two at least) the engine calibration
        holds there.""", resume=False)
    basis_on_device: bool = _setting(True, """keep the basis and the eigensolver's Krylov vectors on the
        model's device (fastest); ``False``: in host memory (pinned with CUDA), streamed to the device in
        chunks of at most ``memory_cap`` bytes, for models whose basis does not fit there.""", resume=False)
    compute_precision: str = _setting("float32", """``"float32"`` (default), ``"tf32"`` (CUDA matmuls in TF32;
        a no-op without CUDA) or ``"bf16"`` (bfloat16 autocast, CUDA or CPU): the arithmetic of the
        directional derivatives ``g`` and ``c``; losses, HVPs and ``delta`` stay float32.""")
    lanczos_tol: float = _setting(1e-3, "relative residual at which the eigensolver stops, in (0, 1).")
    seed: int = _setting(0, "seed of the eigensolver's start vectors and of random bases.")

    def __post_init__(self) -> None:
        for name in ("snapshot_every", "basis_every", "k", "max_basis"):
            _positive_int(name, getattr(self, name))
        if self.basis_every % self.snapshot_every:
            raise ValueError(
                f"basis_every: expected a multiple of snapshot_every ({self.snapshot_every}), got {self.basis_every}"
            )
        if self.order not in ORDERS:
            raise ValueError(f"order: expected one of {ORDERS}, got {self.order!r}")
        if not (callable(self.basis) or self.basis in BASES):
            raise ValueError(f"basis: expected 'hessian', 'random' or a callable, got {self.basis!r}")
        params = self.parameters
        if params is not None:
            if isinstance(params, str) or not all(isinstance(p, str) for p in params):
                raise TypeError(f"parameters: expected a list of names or patterns, got {params!r}")
            object.__setattr__(self, "parameters", tuple(params))
        check_engine(self.engine)
        check_memory_cap(self.memory_cap)
        if not isinstance(self.basis_on_device, bool):
            raise TypeError(f"basis_on_device: expected True or False, got {self.basis_on_device!r}")
        check_compute_precision(self.compute_precision)
        if isinstance(self.lanczos_tol, bool) or not isinstance(self.lanczos_tol, float) or not 0 < self.lanczos_tol < 1:
            raise ValueError(f"lanczos_tol: expected a float in (0, 1), got {self.lanczos_tol!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed: expected an int, got {self.seed!r}")

    # ------------------------------------------------------------------ derived
    @property
    def basis_name(self) -> str:
        """``"hessian"``, ``"random"``, or the name of the basis callable."""
        return self.basis if isinstance(self.basis, str) else getattr(self.basis, "__name__", "callable")

    def replace(self, **changes: Any) -> "POLCAConfig":
        """A copy with ``changes`` (checked like a new config)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------- dict round trip
    def to_dict(self) -> dict:
        """The fields as JSON-able values (``parameters`` a list, a basis callable by its
        name): what the store records as its ``config`` attribute."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["basis"] = self.basis_name
        out["parameters"] = None if self.parameters is None else list(self.parameters)
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, basis: Callable | None = None) -> "POLCAConfig":
        """The config a dict of :meth:`to_dict` (or a store's ``config`` attribute) describes.

        Keys the store adds about the run (:data:`RUN_FACTS`) are skipped; fields a store
        written by an older version does not have take their defaults.

        Args:
            values: the dict.
            basis: the callable of a run whose basis was one (the store holds its name only).

        Raises:
            ValueError: an unknown key, a bad value, or a store written with a basis
                callable and no ``basis=``.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - set(RUN_FACTS))
        if unknown:
            raise ValueError(f"POLCAConfig.from_dict: unknown keys {unknown}; the fields are {sorted(names)}")
        kwargs = {k: v for k, v in values.items() if k in names}
        if basis is not None:
            kwargs["basis"] = basis
        elif kwargs.get("basis", "hessian") not in BASES:
            raise ValueError(
                f"POLCAConfig.from_dict: the run's basis was the callable {kwargs['basis']!r}; "
                "pass it as basis=..."
            )
        return cls(**kwargs)

    # ------------------------------------------------------------------- resume
    @classmethod
    def resumable_changes(cls) -> tuple[str, ...]:
        """Fields a resumed run may set otherwise than the stored run."""
        return tuple(f.name for f in dataclasses.fields(cls) if not f.metadata["resume"])


POLCAConfig.__doc__ = with_entries(
    POLCAConfig.__doc__, "Attributes", {f.name: f.metadata["doc"] for f in dataclasses.fields(POLCAConfig)}
)
