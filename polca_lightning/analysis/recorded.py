"""The settings an analysis was run with, read back from what it recorded.

``analyze`` records its settings in the result's attributes (each prefixed
``analysis_``; ``result_variables`` copies them onto every variable it writes into the
store): one attribute per setting as resolved (``analysis_tau`` the step, with
``analysis_tau_rule`` the rule that gave it; ``analysis_restrict`` as JSON; ...), and
``analysis_settings``, the JSON of :meth:`AnalysisSettings.to_dict`, which rebuilds the
settings exactly (``tau="plateau"`` stays the rule, not the step it gave).

:func:`recorded_settings` reads them back: from ``analysis_settings`` when the analysis
wrote it, else (an analysis written before that attribute existed) from the single
attributes, each turned back into the setting that gives the same result on the same
store. Keys that are no setting of this version (settings since removed) are skipped.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any, Mapping

__all__ = ["SETTINGS_ATTR", "analysis_attrs", "analysis_scalar", "recorded_settings", "describe_settings"]

log = logging.getLogger(__name__)

#: the attribute holding ``AnalysisSettings.to_dict()`` as JSON
SETTINGS_ATTR = "analysis_settings"

#: attributes that mark a recorded analysis (the first is written by every version)
_MARKS = ("analysis_methods", SETTINGS_ATTR, "analysis_timings")


def analysis_attrs(ds) -> dict[str, Any] | None:
    """The ``analysis_*`` attributes of the analysis ``ds`` holds, or None without one.

    Args:
        ds: a store Dataset holding an analysis (the attributes are on its result
            variables: ``cluster``, or another method's where POLCA was not analysed) or
            the Dataset ``analyze`` returned (on its ``attrs``).

    Returns:
        A dict of the attributes, or None when ``ds`` holds no analysis.
    """
    names = ["cluster"] + [n for n in ds.variables if n != "cluster"]  # POLCA's first; any result variable
    sources = [ds[n].attrs for n in names if n in ds.variables]
    for attrs in [*sources, ds.attrs]:
        if any(mark in attrs for mark in _MARKS):
            return dict(attrs)
    return None


def analysis_scalar(ds, name: str) -> float:
    """A scalar result of the analysis ``ds`` holds (``tau``, ``tau_paper``, ``onset_delta``):
    the variable where ``ds`` has it (an ``analyze`` result, ``open_analysed_store``), else
    the attribute ``analysis_<name>`` the analysis recorded (a store as ``open_store``
    gives it); NaN where neither is."""
    if name in ds.variables:
        return float(ds[name].values)
    value = (analysis_attrs(ds) or {}).get(f"analysis_{name}")
    return float("nan") if value is None else float(value)


def recorded_settings(ds, cls):
    """The ``cls`` (``AnalysisSettings``) the analysis held in ``ds`` ran with, or None.

    Args:
        ds: see :func:`analysis_attrs`.
        cls: the settings class (``AnalysisSettings``; passed in so that this module
            does not import the pipeline).

    Returns:
        The settings, or None when ``ds`` holds no analysis.

    Raises:
        ValueError: the recorded settings do not make valid settings, or
            ``analysis_settings`` is not a JSON object.
    """
    attrs = analysis_attrs(ds)
    if attrs is None:
        return None
    fields = {f.name for f in dataclasses.fields(cls)}
    if SETTINGS_ATTR in attrs:
        text = attrs[SETTINGS_ATTR]
        try:
            values = json.loads(text) if isinstance(text, str) else dict(text)
        except (TypeError, ValueError) as error:
            raise ValueError(f"the store's {SETTINGS_ATTR} attribute is not a JSON object: {text!r}") from error
        if not isinstance(values, Mapping):
            raise ValueError(f"the store's {SETTINGS_ATTR} attribute is not a JSON object: {text!r}")
    else:
        values = _from_single_attrs(ds, attrs)
    skipped = sorted(set(values) - fields)
    if skipped:
        log.info("analysis settings: skipping %s, recorded by an earlier version and no setting now", skipped)
    return cls.from_dict({k: v for k, v in values.items() if k in fields})


def _count(value):
    """-1 (how the attributes write None) as None; integral floats >= 1 as ints (counts)."""
    if value is None or value == -1:
        return None
    if isinstance(value, float) and value >= 1 and value.is_integer():
        return int(value)
    return value


def _rule(rule: str | None, resolved, names: tuple[str, ...]):
    """A recorded ``analysis_*_rule`` back to the setting: the rule's name where it is one
    of ``names``, else the step it resolved to (``"given"``, or an unknown rule)."""
    from .onsets import rule_name

    name = rule_name(rule)
    return name if name in names else (None if resolved is None else float(resolved))


def _from_single_attrs(ds, attrs: dict) -> dict[str, Any]:
    """Settings from the single ``analysis_*`` attributes (analyses without ``analysis_settings``)."""
    a = {k[len("analysis_"):]: v for k, v in attrs.items() if k.startswith("analysis_")}
    out: dict[str, Any] = {}
    for name in ("methods", "labels"):
        if name in a:
            out[name] = [str(v) for v in a[name]]
    if "group_by" in a:
        out["group_by"] = a["group_by"] or None
    for name in ("min_cluster_size", "min_samples", "n_components", "time_points"):
        if name in a:
            out[name] = _count(a[name])
    for name in ("cluster_selection_method", "restrict_fraction", "recall_over", "top_k"):
        if name in a:
            out[name] = a[name]
    if a.get("normalize"):
        out["normalize"] = a["normalize"]
    if "tau" in a or "tau_rule" in a:
        out["tau"] = _rule(a.get("tau_rule"), a.get("tau"), ("paper", "plateau"))
        match = re.search(r"fraction=([0-9.eE+-]+), smooth=(\w+)", str(a.get("tau_rule", "")))
        if out["tau"] == "plateau" and match:
            out["tau_fraction"] = float(match.group(1))
            out["tau_smooth"] = None if match.group(2) == "None" else int(match.group(2))
    if "delta_rule" in a or "onset_delta" in a:
        out["delta"] = _rule(a.get("delta_rule"), a.get("onset_delta"), ("paper", "wide"))
    if "restrict" in a:
        spec = json.loads(a["restrict"]) if isinstance(a["restrict"], str) else dict(a["restrict"] or {})
        out["restrict"] = spec or None
    labels = out.get("labels") or []
    if labels and "entry_method" in ds.variables:  # torchmetrics' scores are written only when computed
        out["entropy_scores"] = any(f"{lab}_homogeneity_score" in ds.variables for lab in labels)
    return out


def _show(value) -> str:
    """A setting's value as ``polca analyze`` prints it."""
    if value is None:
        return "none"
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {v[0]} in {list(v[1])}" for k, v in value.items()) or "none"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


#: how ``describe_settings`` names a setting left at None where None has a meaning
_NONE_MEANS = {"methods": "all the store has", "labels": "every integer token label", "restrict": "none"}


def describe_settings(used, previous=None, *, resolved: Mapping[str, Any] | None = None) -> list[str]:
    """Lines naming every setting of ``used``, a ``*`` and the earlier value where it
    differs from ``previous`` (the settings of the analysis it replaces, if any).

    Args:
        used: the ``AnalysisSettings`` of the analysis.
        previous: the settings of the store's earlier analysis, or None.
        resolved: the analysis' attributes (``analysis_tau``, ``analysis_tau_rule``, ...),
            to print the step τ and Δ resolved to beside their rules.

    Returns:
        One line per setting: ``"* tau                    plateau (= 330) (was paper)"``.
    """
    now, was = used.to_dict(), (previous.to_dict() if previous is not None else None)
    resolved = dict(resolved or {})
    steps = {"tau": resolved.get("analysis_tau"), "delta": resolved.get("analysis_onset_delta")}
    lines = []
    for name, value in now.items():
        text = _NONE_MEANS.get(name, "none") if value is None else _show(value)
        if name in steps and steps[name] is not None and isinstance(value, str):
            text += f" (= {float(steps[name]):g})"
        changed = was is not None and was.get(name) != value
        if changed:
            before = was.get(name)
            text += f" (was {_NONE_MEANS.get(name, 'none') if before is None else _show(before)})"
        lines.append(f"{'*' if changed else ' '} {name:<24} {text}")
    return lines
