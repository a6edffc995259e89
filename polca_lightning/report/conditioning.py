"""What each score of the report is conditioned on, read from an analysed store.

A homogeneity means something only beside what it is conditioned on; the appendix G
table and figure, the summary and ``polca analyze`` say it with these:

- :func:`restriction_text`: the App. G restriction in force for a label
  (``"place in [1, 2], over 85%"``) or ``"none"``;
- :func:`chance_basis`: what the label's chance level comes from: the cluster's own
  mix of the restriction's coordinate (``"place"``), or, without a restriction, the
  label's ``"base rate"`` among all tokens;
- :func:`fixing_coordinates`: the coordinates that fix a label within a cluster
  (:func:`polca_lightning.analysis.scores.fixed_by`: the other token labels and the
  target, alone or in pairs), e.g. ``["place+target"]`` for a cluster of 1000s digits,
  where the carry is the digit;
- :func:`tau_text` and :func:`hidden_views`: τ and its rule (``analysis_tau_rule``),
  and the hidden-breakthrough flags and fractions under each τ the analysis has (its
  own, and the paper's 10 % of the run where the analysis records it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import combinations

import numpy as np

from polca_lightning.analysis.methods import METHODS
from polca_lightning.analysis.onsets import rule_name
from polca_lightning.analysis.recorded import analysis_attrs, analysis_scalar
from polca_lightning.analysis.scores import FIXED_FRACTION, FIXED_MIN_COUNT, fixing
from polca_lightning.store.schema import TARGET, TOKEN

__all__ = [
    "scored_labels",
    "restrictions",
    "restriction",
    "restriction_text",
    "chance_basis",
    "chance_text",
    "fixing_coordinates",
    "entry_members",
    "tau_rule_name",
    "tau_text",
    "HiddenView",
    "hidden_views",
]


def scored_labels(ds) -> list[str]:
    """The labels the analysis scored (``analysis_labels``, on a store's result variables or
    on the attributes of what ``analyze`` returned), else the store's token labels."""
    attrs = _attrs(ds)
    if "analysis_labels" in attrs:
        return [str(v) for v in attrs["analysis_labels"]]
    return [str(v) for v in ds.attrs.get("token_labels", [])]


def _attrs(ds) -> dict:
    return analysis_attrs(ds) or {}


def restrictions(ds) -> dict:
    """The App. G restrictions the analysis recorded, ``{label: [coordinate, [values]]}``."""
    text = _attrs(ds).get("analysis_restrict", "{}")
    try:
        spec = json.loads(text) if isinstance(text, str) else dict(text or {})
    except (TypeError, ValueError):
        return {}
    return spec if isinstance(spec, dict) else {}


def restriction(ds, label: str) -> tuple[str, tuple[int, ...]] | None:
    """``(coordinate, allowed values)`` of ``label``'s restriction, or None without one."""
    spec = restrictions(ds).get(label)
    if isinstance(spec, (list, tuple)) and len(spec) == 2:
        return str(spec[0]), tuple(int(v) for v in spec[1])
    return None


def restriction_text(ds, label: str) -> str:
    """``"place in [1, 2], over 85%"`` (the coordinate, its allowed values and the share
    of a cluster's tokens with the value that must be in them), or ``"none"``."""
    spec = restriction(ds, label)
    if spec is None:
        return "none"
    fraction = _attrs(ds).get("analysis_restrict_fraction")
    over = f", over {float(fraction):.0%}" if fraction is not None else ""
    return f"{spec[0]} in {list(spec[1])}{over}"


def chance_basis(ds, label: str) -> str:
    """What ``label``'s chance level comes from: the restriction's coordinate (the chance
    is the label's rate in the cluster's own mix of it), or ``"base rate"``."""
    spec = restriction(ds, label)
    return "base rate" if spec is None else spec[0]


def chance_text(ds, label: str) -> str:
    """``"the cluster's mix of place"`` or ``"the label's base rate"``: :func:`chance_basis` in words."""
    basis = chance_basis(ds, label)
    return "the label's base rate" if basis == "base rate" else f"the cluster's mix of {basis}"


def _token_coordinates(ds, label: str) -> list[str]:
    """The coordinates that may fix ``label``: the other token labels, and the target."""
    names = [str(n) for n in ds.attrs.get("token_labels", [])]
    names += [str(n) for n in _attrs(ds).get("analysis_labels", [])]
    if TARGET in ds.variables and (np.asarray(ds[TARGET].values) >= 0).any():
        names.append(TARGET)
    return [n for n in dict.fromkeys(names)
            if n != label and n in ds.variables and ds[n].dims == (TOKEN,)]


def entry_members(ds, entry: int) -> np.ndarray:
    """``[token]`` bool: the member tokens of cluster-table row ``entry``."""
    method = str(np.asarray(ds["entry_method"].values)[entry])
    unit = int(np.asarray(ds["entry_unit"].values)[entry])
    cluster = int(np.asarray(ds["entry_cluster"].values)[entry])
    spec = METHODS[method]
    sel = {} if spec.unit_dim is None else {spec.unit_dim: unit}
    return np.asarray(ds[spec.prefix + "cluster"].isel(sel).values) == cluster


def fixing_coordinates(ds, label: str, entries, *, fraction: float = FIXED_FRACTION,
                       min_count: int = FIXED_MIN_COUNT) -> list[list[str]]:
    """What fixes ``label`` within the cluster of each of ``entries``.

    The candidates are the other token labels and ``target``, one at a time, then in
    pairs where no single one fixes the label (the carry of a 1000s digit is fixed by
    place and target together): :func:`polca_lightning.analysis.scores.fixed_by`.

    Args:
        ds: an analysed store.
        label: a token label of the analysis.
        entries: cluster-table rows (``entry`` indices; negative ones get ``[]``).
        fraction, min_count: see :func:`polca_lightning.analysis.scores.fixed_by`.

    Returns:
        One list per entry of what fixes the label there: coordinate names, a pair joined
        by ``+`` (``"place+target"``); empty where nothing does.
    """
    values = np.asarray(ds[label].values)
    names = _token_coordinates(ds, label)
    arrays = {name: np.asarray(ds[name].values) for name in names}
    candidates = [(name,) for name in names] + list(combinations(names, 2))
    # fixed_by, with each candidate's [token] mask computed once for all the entries
    masks = {cand: fixing(values, [arrays[n] for n in cand], fraction=fraction, min_count=min_count)
             for cand in candidates}
    masks = {cand: mask for cand, mask in masks.items() if mask is not None}
    out = []
    for e in entries:
        if e is None or int(e) < 0:
            out.append([])
            continue
        members = entry_members(ds, int(e))
        fixed = [cand for cand, mask in masks.items() if members.any() and mask[members].mean() >= fraction]
        singles = [c for c in fixed if len(c) == 1]
        out.append(["+".join(c) for c in (singles or fixed)])
    return out


def tau_rule_name(ds) -> str:
    """The name of the rule that gave τ: ``paper``, ``plateau``, ``given`` (or ``?``)."""
    return rule_name(_attrs(ds).get("analysis_tau_rule")) or "?"


def tau_text(ds) -> str:
    """``"τ = 330 (plateau: plateau_step(fraction=0.05, smooth=None))"``: τ and the rule
    that gave it (``analysis_tau_rule``)."""
    return f"τ = {analysis_scalar(ds, 'tau'):g} ({_attrs(ds).get('analysis_tau_rule', 'rule not recorded')})"


@dataclass(frozen=True)
class HiddenView:
    """The hidden-breakthrough flags and fractions under one τ.

    Attributes:
        key: ``"hidden"`` (the analysis' τ) or ``"hidden_paper"`` (the paper's τ).
        tau: τ in steps.
        rule: the name of its rule (``paper``, ``plateau``, ``given``).
        entry: ``[entry]`` bool, each cluster's flag (None where the store lacks it).
        fraction: ``{trajectory type: fraction of its clusters hidden}``.
    """

    key: str
    tau: float
    rule: str
    entry: np.ndarray | None
    fraction: dict

    @property
    def flag_column(self) -> str:
        """Column name of the per-cluster flag: ``"hidden (τ=330, plateau)"``."""
        return f"{self.key} (τ={self.tau:g}, {self.rule})"

    @property
    def fraction_column(self) -> str:
        """Column name of the per-type fraction: ``"hidden_fraction (τ=330, plateau)"``."""
        return f"{self.key.replace('hidden', 'hidden_fraction')} (τ={self.tau:g}, {self.rule})"


def hidden_views(ds) -> list[HiddenView]:
    """The analysis' own τ, and the paper's τ (10 % of the run) where the analysis
    records ``hidden_fraction_paper``; an analysis without it gets its own only."""
    types = [str(t) for t in np.asarray(ds["trajectory_type"].values)]

    def view(key, tau, rule, entry_name, fraction_name):
        entry = np.asarray(ds[entry_name].values, dtype=bool) if entry_name in ds.variables else None
        fraction = dict(zip(types, np.asarray(ds[fraction_name].values, dtype=np.float64).tolist()))
        return HiddenView(key, tau, rule, entry, fraction)

    views = [view("hidden", analysis_scalar(ds, "tau"), tau_rule_name(ds), "entry_hidden", "hidden_fraction")]
    if "hidden_fraction_paper" in ds.variables:
        views.append(view("hidden_paper", analysis_scalar(ds, "tau_paper"), "paper", "entry_hidden_paper",
                          "hidden_fraction_paper"))
    return views
