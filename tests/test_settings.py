"""The settings are defined once (polca_lightning.settings) and every entry point exposes them:
the signature, the documentation, the defaults and the checks, the same everywhere."""

import inspect
import pydoc
import re
from pathlib import Path

import pytest

from _tiny import batches, tiny_lm
from polca_lightning import POLCACallback, POLCAConfig, from_checkpoints, track
from polca_lightning.session import POLCASession
from polca_lightning.settings import ARGUMENTS, SETTINGS, Settings, check_settings, takes_settings
from polca_lightning.store import WEIGHTS_COMPRESSORS

ROOT = Path(__file__).resolve().parents[1]

#: The documented defaults (docs/callback.md), written out here as the contract.
DEFAULTS = {
    "token_loss": None, "token_labels": None, "batch_size": None, "data_collator": None, "snapshot_every": 25, "basis_every": 200, "k": 1,
    "max_basis": 15, "order": "trapezoid", "basis": "hessian", "parameters": None, "mode": "w-",
    "storage_options": None, "weights_compressors": WEIGHTS_COMPRESSORS, "engine": "auto",
    "memory_cap": 1 << 30, "basis_on_device": True, "compute_precision": "float32", "lanczos_tol": 1e-3,
    "seed": 0, "analyze": True, "analysis_kwargs": None, "decode": None, "decode_target": None,
    "lca_directions": None, "ablate": True, "progress": True,
}


def entry_points():
    """Every entry point that takes the settings and returns what holds them (``from_checkpoints``
    runs: see :func:`signatures`); the Hugging Face one where transformers is installed."""
    entries = [POLCACallback, POLCASession, track]
    try:
        from polca_lightning.hf import POLCATrainerCallback
    except ImportError:
        return entries
    return entries + [POLCATrainerCallback]


def signatures():
    """Every entry point that takes the settings."""
    return entry_points() + [from_checkpoints]


def make(entry, tmp_path, **settings):
    """``entry`` built with ``settings`` on a store in ``tmp_path`` and tiny data."""
    if entry is POLCASession:
        return entry(tmp_path / "polca.zarr", **settings)
    data = (tmp_path / "polca.zarr", batches(8, 8, seed=1), batches(8, 8, seed=2))
    return entry(tiny_lm(), *data, **settings) if entry is track else entry(*data, **settings)


def test_the_settings_are_the_documented_ones_and_the_config_fields_among_them():
    assert list(SETTINGS) == list(Settings.__annotations__)
    assert set(SETTINGS) == set(DEFAULTS)
    assert {name: s.default for name, s in SETTINGS.items()} == DEFAULTS
    fields = POLCAConfig.__dataclass_fields__
    assert {name for name, s in SETTINGS.items() if s.in_config} == set(fields)


@pytest.mark.parametrize("entry", signatures(), ids=lambda e: e.__name__)
def test_every_entry_point_shows_every_setting_with_its_default(entry):
    parameters = inspect.signature(entry).parameters
    for name, default in DEFAULTS.items():
        p = parameters[name]
        assert (p.kind, p.default) == (inspect.Parameter.KEYWORD_ONLY, default), name
        assert p.annotation is not inspect.Parameter.empty, name
    assert "settings" not in parameters  # the real parameters, not **settings
    assert list(parameters)[{track: 1, from_checkpoints: 2}.get(entry, 0)] == "store"


@pytest.mark.parametrize("entry", signatures(), ids=lambda e: e.__name__)
def test_help_documents_every_parameter(entry):
    # help()'s text, its margin of " | " and its line breaks taken out
    text = " ".join(word for word in pydoc.render_doc(entry, renderer=pydoc.plaintext).split() if word != "|")
    for name in inspect.signature(entry).parameters:
        assert re.search(rf"\b{name}(, \w+)*: ", text), name
    for name, s in SETTINGS.items():
        assert f"{name}: {' '.join(s.doc.split())}" in text, name


@pytest.mark.parametrize("entry", entry_points(), ids=lambda e: e.__name__)
def test_an_entry_point_built_without_settings_holds_the_defaults(entry, tmp_path):
    built = make(entry, tmp_path)
    session = getattr(built, "session", built)
    assert session.config == POLCAConfig()
    assert (session.mode, session.analysis_kwargs, session.lca_directions, session.ablate) == ("w-", {}, 15, True)
    given = make(entry, tmp_path, k=3, max_basis=6, mode="w", analysis_kwargs={"min_samples": 4})
    session = getattr(given, "session", given)
    assert (session.config.k, session.config.max_basis, session.mode) == (3, 6, "w")
    assert (session.analysis_kwargs, session.lca_directions) == ({"min_samples": 4}, 6)


BAD = [
    ({"k": 0}, ValueError, "k: expected a positive int, got 0"),
    ({"basis_every": 30}, ValueError, r"basis_every: expected a multiple of snapshot_every \(25\), got 30"),
    ({"mode": "r"}, ValueError, "mode: expected 'w-' (new store), 'a' (resume) or 'w' (overwrite), got 'r'"),
    ({"lca_directions": -1}, ValueError, "lca_directions: expected a non-negative int or None, got -1"),
    ({"ablate": "yes"}, TypeError, "ablate: expected True or False, got 'yes'"),
    ({"analysis_kwargs": 3}, TypeError, "analysis_kwargs: expected a dict of analyze() settings, got int"),
    ({"token_loss": "causal"}, TypeError, "token_loss: expected a callable (module, batch) -> (loss, mask)"),
    ({"batch_size": 0}, ValueError, "batch_size: expected a positive int or None, got 0"),
    ({"data_collator": "pad"}, TypeError, "data_collator: expected a callable list of examples -> batch"),
    ({"weights_compressors": "zstd"}, TypeError, "weights_compressors: expected zarr 3 compressors"),
]


@pytest.mark.parametrize("settings, error, message", BAD, ids=lambda x: str(x)[:24])
def test_every_entry_point_refuses_a_bad_setting_with_the_same_message(tmp_path, settings, error, message):
    for entry in entry_points():
        with pytest.raises(error, match=re.escape(message) if "\\" not in message else message):
            make(entry, tmp_path, **settings)


def test_an_unknown_keyword_is_refused_with_the_nearest_setting(tmp_path):
    for entry in entry_points():
        with pytest.raises(TypeError, match=rf"^{entry.__name__}\(\) got an unexpected keyword argument "
                                            r"'snapshot_evry'; did you mean 'snapshot_every'\?$"):
            make(entry, tmp_path, snapshot_evry=5)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'zzz'; help\(POLCACallback\) lists"):
        make(POLCACallback, tmp_path, zzz=1)
    with pytest.raises(TypeError, match="unexpected keyword argument 'kk'"):
        check_settings({"kk": 2})


def test_a_new_entry_point_takes_the_settings_with_one_decorator():
    @takes_settings
    def track(model, store, probe_data, hessian_data=None, **settings):
        """POLCA of a plain loop.

        Args:
            model: the module being trained.

        Returns:
            The settings it was given.
        """
        return model, store, probe_data, hessian_data, settings

    signature = inspect.signature(track)
    assert list(signature.parameters) == ["model", "store", "probe_data", "hessian_data", *SETTINGS]
    doc = " ".join(inspect.getdoc(track).split())
    assert "model: the module being trained." in doc
    for name in ("store", "probe_data", "hessian_data"):
        assert f"{name}: {' '.join(ARGUMENTS[name].split())}" in doc
    assert doc.index("seed: ") < doc.index("Returns: The settings")  # the Args section, before Returns

    model, store, probe, hessian, settings = track("m", "s.zarr", [1], k=2, mode="a")
    assert (model, store, probe, hessian) == ("m", "s.zarr", [1], None)
    assert settings == {**DEFAULTS, "k": 2, "mode": "a"}
    with pytest.raises(TypeError, match=r"track\(\) got an unexpected keyword argument 'max_bases'; did you mean"):
        track("m", "s.zarr", [1], max_bases=3)


def test_the_decorator_refuses_an_entry_point_it_cannot_serve():
    def no_settings(store):
        """Args:
            store: the store.
        """

    def undocumented(model, store, **settings):
        """Nothing about the model."""

    def shadows(store, k=1, **settings):
        """Args:
            k: its own k.
        """

    for entry, message in [(no_settings, "must take \\*\\*settings"), (shadows, "no setting by name"),
                           (undocumented, r"does not document \['model'\]")]:
        with pytest.raises(TypeError, match=message):
            takes_settings(entry)


def test_the_config_documents_each_field_where_it_is_defined():
    doc = " ".join(inspect.getdoc(POLCAConfig).split())
    attributes = doc[doc.index("Attributes:"):doc.index("Raises:")]
    for name, field in POLCAConfig.__dataclass_fields__.items():
        assert f"{name}: {' '.join(field.metadata['doc'].split())}" in attributes, name


def test_the_arguments_table_of_the_docs_names_every_setting():
    table = (ROOT / "docs" / "callback.md").read_text()
    table = table[table.index("| argument | meaning |"):]
    for name in SETTINGS:
        assert f"`{name}`" in table, name
