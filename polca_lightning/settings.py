"""The settings every POLCA entry point takes, defined once.

:class:`Settings` names each setting with its type, default, documentation and check; the
fields of :class:`~polca_lightning.POLCAConfig` (``snapshot_every`` to ``seed``) are
among them, with the default, documentation and checks of the dataclass. Every entry point
(:class:`~polca_lightning.POLCACallback`, :class:`~polca_lightning.hf.POLCATrainerCallback`,
:class:`~polca_lightning.session.POLCASession`, ...) takes them as ``**settings`` and is
decorated with :func:`takes_settings`, which gives it

- a signature that lists every setting, keyword-only, with its type and default
  (``inspect.signature``, ``help()``, IPython and Jupyter show it; static type checkers and
  editors read ``**settings: Unpack[Settings]``);
- the settings' documentation at the end of its docstring's ``Args:`` section, and the shared
  documentation of ``store``, ``probe_data`` and ``hessian_data`` (:data:`ARGUMENTS`) where the
  docstring does not document them itself;
- every setting in ``settings`` when it is called, the defaults filled in, and a
  ``TypeError`` for a keyword it does not take (with the nearest setting's name).

:class:`~polca_lightning.session.POLCASession` checks the values (:func:`check_settings`), so an
entry point that builds a session passes ``**settings`` on and is done. A new entry point::

    from polca_lightning.session import POLCASession
    from polca_lightning.settings import Settings, Unpack, takes_settings

    @takes_settings
    def track(model, store, probe_data, hessian_data=None, **settings: Unpack[Settings]):
        \"\"\"POLCA of a plain training loop.

        Args:
            model: the module being trained.
        \"\"\"
        session = POLCASession(store, owner="track", resume_hint="step= to track", **settings)
        probe, hessian = session.batches(probe_data, hessian_data)  # examples collated, batches checked
        ...

A new setting is one more line of :class:`Settings` (or one more field of ``POLCAConfig``,
then named in :class:`Settings` as ``CONFIG``); every entry point takes it from there.
"""

import dataclasses
import difflib
import functools
import inspect
from typing import Annotated, Any, Callable, Mapping, Sequence, TypedDict, TypeVar, get_type_hints

from torch import Tensor, nn

from polca_lightning._docs import documented, with_entries
from polca_lightning.config import POLCAConfig
from polca_lightning.store import WEIGHTS_COMPRESSORS, check_weights_compressors

try:
    from typing import Unpack
except ImportError:  # Python 3.10
    from typing_extensions import Unpack

__all__ = [
    "ARGUMENTS", "CONFIG", "SETTINGS", "Setting", "Settings", "Unpack", "callable_or_none", "check_settings",
    "takes_settings",
]


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: its default, its documentation and its check.

    Attributes:
        default: the value when the setting is not given.
        doc: what it means, for the entry points' docstrings.
        check: ``(name, value) -> value``: the value kept, or an exception naming the setting;
            ``None``: any value.
        name, annotation: filled in :data:`SETTINGS` from :class:`Settings`.
        in_config: a field of :class:`~polca_lightning.POLCAConfig`, which checks it.
    """

    default: Any = None
    doc: str = ""
    check: Callable[[str, Any], Any] | None = None
    name: str = ""
    annotation: Any = inspect.Parameter.empty
    in_config: bool = False


#: Marks a setting of :class:`Settings` that is a field of :class:`~polca_lightning.POLCAConfig`.
CONFIG = Setting(in_config=True)


def callable_or_none(name: str, value: Any, expected: str) -> Callable | None:
    """``value`` if it is ``None`` or callable.

    Raises:
        TypeError: anything else, naming ``name`` and the ``expected`` signature.
    """
    if value is not None and not callable(value):
        raise TypeError(f"{name}: expected a callable {expected}, got {value!r}")
    return value


def _callable(expected: str) -> Callable[[str, Any], Any]:
    return lambda name, value: callable_or_none(name, value, expected)


def _mode(name: str, value: Any) -> str:
    if value not in ("w-", "a", "w"):
        raise ValueError(f"{name}: expected 'w-' (new store), 'a' (resume) or 'w' (overwrite), got {value!r}")
    return value


def _dict_or_none(name: str, value: Any) -> dict:
    if value is not None and not isinstance(value, Mapping):
        raise TypeError(f"{name}: expected a dict of analyze() settings, got {type(value).__name__}")
    return dict(value or {})


def _int_or_none(low: int) -> Callable[[str, Any], int | None]:
    """The check of an int of at least ``low`` (0 or 1), or ``None``."""
    expected = "a positive int" if low == 1 else "a non-negative int"

    def check(name: str, value: Any) -> int | None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"{name}: expected {expected} or None, got {value!r}")
        return value

    return check


def _strict_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected True or False, got {value!r}")
    return value


def _truth(name: str, value: Any) -> bool:
    return bool(value)


class Settings(TypedDict, total=False):
    """The settings of a POLCA run, as ``**settings`` of every entry point (the keys, with
    their types; :data:`SETTINGS` holds their defaults, documentation and checks)."""

    token_loss: Annotated[Callable[[nn.Module, Any], Sequence[Tensor]] | None, Setting(None, """
        ``(module, batch) -> (loss, mask[, target])``, each ``[batch, positions]``; default: the
        module's ``token_loss`` method if it has one, else the causal-LM built-in
        (:func:`~polca_lightning.causal_lm_token_loss`).""", _callable("(module, batch) -> (loss, mask)"))]
    token_labels: Annotated[Callable[[Any], Mapping[str, Tensor]] | None, Setting(None, """
        ``batch -> {name: tensor[batch, positions]}``; each name becomes a token coordinate of the
        store.""", _callable("batch -> {name: tensor}"))]
    batch_size: Annotated[int | None, Setting(None, """
        examples per batch where ``probe_data`` or ``hessian_data`` holds examples (a dataset, or a
        list or tuple of examples); ``None``: 8 (:data:`polca_lightning.data.EXAMPLES_PER_BATCH`), and
        in ``POLCATrainerCallback`` the ``Trainer``'s ``per_device_eval_batch_size``.""", _int_or_none(1))]
    data_collator: Annotated[Callable[[list], Any] | None, Setting(None, """
        ``list of examples -> batch``, where ``probe_data`` or ``hessian_data`` holds examples;
        ``None``: :func:`polca_lightning.data.collate_examples` (``torch.utils.data.default_collate``),
        and in ``POLCATrainerCallback`` the ``Trainer``'s data collator
        (:func:`polca_lightning.hf.trainer_collator`).""", _callable("list of examples -> batch"))]
    snapshot_every: Annotated[int, CONFIG]
    basis_every: Annotated[int, CONFIG]
    k: Annotated[int, CONFIG]
    max_basis: Annotated[int, CONFIG]
    order: Annotated[str, CONFIG]
    basis: Annotated[str | Callable, CONFIG]
    parameters: Annotated[Sequence[str] | None, CONFIG]
    mode: Annotated[str, Setting("w-", """
        ``"w-"`` refuses an existing store, ``"a"`` resumes one (with the loop's checkpoint), ``"w"``
        overwrites.""", _mode)]
    storage_options: Annotated[dict | None, Setting(None, """
        options of a URL store's filesystem, as ``xarray.open_zarr`` takes them (S3: ``key``,
        ``secret``, ``endpoint_url``, ...); used for every read and write of the store, the analysis
        after training included.""")]
    weights_compressors: Annotated[Any, Setting(WEIGHTS_COMPRESSORS, """
        zarr 3 compressors of the ``weights`` snapshots (``None``: raw); default
        :data:`polca_lightning.store.WEIGHTS_COMPRESSORS`.""", lambda name, value: check_weights_compressors(value))]
    engine: Annotated[str, CONFIG]
    memory_cap: Annotated[int, CONFIG]
    basis_on_device: Annotated[bool, CONFIG]
    compute_precision: Annotated[str, CONFIG]
    lanczos_tol: Annotated[float, CONFIG]
    seed: Annotated[int, CONFIG]
    analyze: Annotated[bool, Setting(True, """
        run the analysis and reports after training
        (:func:`polca_lightning.report.report_after_fit`).""", _truth)]
    analysis_kwargs: Annotated[dict | None, Setting(None, """
        settings for :func:`polca_lightning.analysis.analyze` (e.g. ``min_samples``).""", _dict_or_none)]
    decode: Annotated[Callable[[int, int], str] | None, Setting(None, """
        ``decode(sequence_index, position) -> str``, the text of a probe token's context, shown in
        the table of contexts nearest each cluster medoid.""", _callable("(sequence_index, position) -> str"))]
    decode_target: Annotated[Callable[[int], str] | None, Setting(None, """
        ``decode_target(token_id) -> str``, the text of a target token id (e.g. a tokenizer's
        ``decode``), shown beside the ids in the table and figures of each cluster's most common
        targets.""", _callable("token_id -> str"))]
    lca_directions: Annotated[int | None, Setting(None, """
        with ``analyze``, compute the LCA baseline after training along this many parameters, the
        largest in magnitude at the end (``None``: ``max_basis``; 0: none).""", _int_or_none(0))]
    ablate: Annotated[bool, Setting(True, """
        with ``analyze``, undo the final model's movement along each basis vector and store every
        probe token's loss change (:func:`polca_lightning.ablation.ablate_directions`; one pass
        over the probe data per vector).""", _strict_bool)]
    progress: Annotated[bool, Setting(True, """
        progress bars for eigensolves, backfills and snapshots that take long, and the
        report.""", _truth)]


def _table() -> dict[str, Setting]:
    fields = {f.name: f for f in dataclasses.fields(POLCAConfig)}
    table = {}
    for name, hint in get_type_hints(Settings, include_extras=True).items():
        (meta,) = hint.__metadata__
        if meta.in_config:
            field = fields.pop(name)
            meta = Setting(field.default, field.metadata["doc"], in_config=True)
        table[name] = dataclasses.replace(meta, name=name, annotation=hint.__origin__)
    if fields:  # a new POLCAConfig field must be named in Settings
        raise TypeError(f"Settings lacks the POLCAConfig fields {sorted(fields)}")
    return table


#: Every setting by name, in the order of :class:`Settings`: its default, documentation,
#: check and type.
SETTINGS: dict[str, Setting] = _table()

#: The documentation of the data arguments the entry points share, used where an entry
#: point's docstring does not document them itself.
ARGUMENTS = {
    "store": """path of the Zarr store (a directory), or a URL that fsspec opens (``s3://bucket/run.zarr``,
        ``gs://...``; see :func:`polca_lightning.open_store`).""",
    "probe_data": """the held-out tokens to decompose: a DataLoader or an iterable of batches, or examples
        (a dataset, or a list or tuple of examples: mappings such as ``{"input_ids": tensor[P], ...}``,
        tuples of tensors without a batch dimension), collated ``batch_size`` at a time by
        ``data_collator`` (:mod:`polca_lightning.data`).""",
    "hessian_data": """the training sample whose mean loss defines the Hessian (needed for
        ``basis="hessian"``), in the same forms as ``probe_data``.""",
}


def _unexpected(owner: str, name: str) -> TypeError:
    near = difflib.get_close_matches(name, SETTINGS, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else f"; help({owner}) lists the settings"
    return TypeError(f"{owner}() got an unexpected keyword argument {name!r}{hint}")


def check_settings(values: Mapping[str, Any], *, owner: str = "POLCA") -> tuple[POLCAConfig, dict[str, Any]]:
    """Check every setting: the :class:`~polca_lightning.POLCAConfig` of the decomposition, and
    the other settings as they are kept.

    Args:
        values: settings by name; those missing take their defaults.
        owner: the entry point, in the message for an unknown name.

    Returns:
        ``(config, others)``: the config, and the other settings by name, checked.

    Raises:
        TypeError: a name that is no setting (with the nearest one's name).
        ValueError, TypeError: a bad value, naming the setting, what was expected and what came.
    """
    for name in values:
        if name not in SETTINGS:
            raise _unexpected(owner, name)
    given = {name: values.get(name, s.default) for name, s in SETTINGS.items()}
    config = POLCAConfig(**{name: given[name] for name, s in SETTINGS.items() if s.in_config})
    others = {name: s.check(name, given[name]) if s.check else given[name]
              for name, s in SETTINGS.items() if not s.in_config}
    return config, others


_T = TypeVar("_T")


def takes_settings(entry: _T) -> _T:
    """Give an entry point that takes ``**settings`` the signature and documentation of every
    setting, and every setting when it is called (the module's docstring shows how).

    Args:
        entry: a function, or a class whose ``__init__`` takes the settings (its docstring is
            then the class's).

    Returns:
        ``entry``: the function wrapped, or the class with its ``__init__`` wrapped.

    Raises:
        TypeError: ``entry`` takes no ``**settings``, names a setting as a parameter of its own,
            or leaves a parameter of its own undocumented (neither in its ``Args:`` nor in
            :data:`ARGUMENTS`).
    """
    function = entry.__init__ if isinstance(entry, type) else entry
    owner = entry.__qualname__
    own = inspect.signature(function).parameters
    kept = [p for p in own.values() if p.kind is not p.VAR_KEYWORD]
    if len(kept) == len(own) or set(own) & set(SETTINGS):
        raise TypeError(f"takes_settings: {owner} must take **settings and no setting by name")
    doc = entry.__doc__
    mine = documented(doc)
    missing = [p.name for p in kept[1 if isinstance(entry, type) else 0:]
               if p.name not in mine and p.name not in ARGUMENTS and p.kind is not p.VAR_POSITIONAL]
    if missing:
        raise TypeError(f"takes_settings: the docstring of {owner} does not document {missing}")
    shared = {p.name: ARGUMENTS[p.name] for p in kept if p.name in ARGUMENTS and p.name not in mine}
    settings = {name: s.doc for name, s in SETTINGS.items() if name not in mine}
    names = {p.name for p in kept}

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        for name in kwargs:
            if name not in SETTINGS and name not in names:
                raise _unexpected(owner, name)
        settings = {name: kwargs.pop(name, s.default) for name, s in SETTINGS.items()}
        return function(*args, **kwargs, **settings)

    wrapper.__signature__ = inspect.Signature(kept + [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=s.default, annotation=s.annotation)
        for name, s in SETTINGS.items()
    ])
    # the shared data arguments after the entry point's own, then the settings
    text = with_entries(with_entries(doc, "Args", shared), "Args", settings)
    if isinstance(entry, type):
        entry.__init__ = wrapper
        entry.__doc__ = text
    else:
        wrapper.__doc__ = text
        entry = wrapper
    return entry
