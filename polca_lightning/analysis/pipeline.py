"""``analyze``: the whole analysis of one store Dataset, as a Dataset of results.

Driven by one :class:`AnalysisSettings`, in stages, each a function of its own:

1. **inputs** (``_inputs``): the methods, label and group coordinates, the App. G
   restrictions, the complete snapshots, Δ and τ;
2. **filter, cluster, onsets** (``_cluster_units``), per method (the POLCA trajectories
   and the baselines alike: ``methods``) and per unit (basis vector, LCA direction, or
   the single exact-loss clustering): build the trajectory, filter (§4.1), reduce +
   HDBSCAN, medoids, cluster mean curves, onsets (Eq. 9);
3. **per-method variables** (``_method_variables``), hidden flags against τ (Eq. 10)
   among them;
4. **tables** of clusterings and clusters (``_tables``), with the hidden-breakthrough
   fraction per trajectory type;
5. **scores** against every label coordinate (``_label_scores``: App. G homogeneity,
   chance level, recall, F1, the top clusters; torchmetrics' entropy scores).

The result never contains the store's own variables; merge it with the store if you
want both (``xr.merge([ds, res])``: no names collide).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from polca_lightning.store.schema import LOSS, POSITION, SEQUENCE, SNAPSHOT, STEP, TARGET, TOKEN

from .clustering import (
    FILTERED,
    OUTLIER,
    ClusterSettings,
    cluster_medoids,
    cluster_trajectories,
    single_threaded_blas,
)
from .methods import METHODS, available_methods
from .onsets import breakthrough_onset, hidden_breakthrough, resolve_delta, resolve_tau
from .scores import APPENDIX_G_FRACTION, best_clusters, clustering_scores, label_scores
from .trajectories import filter_trajectories

__all__ = ["analyze", "AnalysisSettings", "complete_snapshots", "NON_LABEL_COORDS"]

log = logging.getLogger(__name__)

#: token coordinates that are not labels to score against
NON_LABEL_COORDS = (TOKEN, SEQUENCE, POSITION, TARGET)


@dataclass(frozen=True)
class AnalysisSettings:
    """Every setting of :func:`analyze`, validated once.

    Attributes:
        methods: subset of ``polca, polca_first, lca, fisher, loss, loss_change``
            (None: every one whose variables the store has; see ``methods.py``).
        labels: token coordinates to score clusters against (None: every integer token
            coordinate except ``sequence``, ``position``, ``target``).
        group_by: token coordinate to cluster within (e.g. ``"target"``), or None.
        min_cluster_size, min_samples, n_components, time_points,
            cluster_selection_method, normalize: HDBSCAN and the reduction before it
            (:class:`~polca_lightning.analysis.clustering.ClusterSettings`; defaults and
            reasons in ``clustering.py``). Sizes below 1 are fractions of the tokens.
        delta: Δ of Eq. 9: a number of steps, or a rule: ``"paper"`` (default, or None):
            1 % of the run (the paper's Δ = 100 of 10,000 steps), ``"wide"``: 2 % (the
            default of earlier versions); either at least the largest snapshot spacing,
            since ``a(t)`` needs the curves at ``t ± Δ`` and a shorter Δ would read them
            between snapshots (a given Δ below the spacing warns). See ``onsets.py``.
        tau: τ of Eq. 10: a step, or a rule: ``"plateau"`` (default, or None): where
            the mean exact loss flattens (``plateau_step``), what a hidden breakthrough
            means (learning the mean loss does not show); ``"paper"``: ``step[0] + 10 %``
            of the run (the paper's τ = 1000 of 10,000 steps). A cluster is hidden when
            the onset of its mean curve (``cluster_onset``) is after τ. The paper's τ is
            always computed too (``tau_paper``, ``entry_hidden_paper``,
            ``hidden_fraction_paper``).
        tau_fraction, tau_smooth: ``plateau_step`` settings (with ``tau="plateau"``).
        restrict: App. G restriction per label, ``{label: (coordinate, allowed values)}``,
            e.g. ``{"carry": ("place", (1, 2))}`` for the paper's carry scores. The
            coordinate is also what the label's chance level conditions on.
        restrict_fraction: eligibility threshold of the restriction: strictly more than
            this fraction of a cluster's tokens with the label value must be in the
            allowed values (0.85, the camera-ready App. G's "over 85%"; 0.5 is the
            majority rule of earlier versions).
        recall_over: ``"clustered"`` or ``"all"`` (see ``scores.py``).
        top_k: best clusters kept per method and label value (App. G: 3).
        entropy_scores: compute torchmetrics' homogeneity/completeness/V-measure.

    Raises:
        ValueError: a setting out of its range (checked at construction, before any work).

    Example:
        >>> AnalysisSettings(min_samples=5, tau="plateau").cluster.min_samples
        5
        >>> AnalysisSettings.from_dict(AnalysisSettings(restrict={"carry": ("place", (1, 2))}).to_dict()).restrict
        {'carry': ('place', (1, 2))}
    """

    methods: Sequence[str] | None = None
    labels: Sequence[str] | None = None
    group_by: str | None = None
    min_cluster_size: float = 0.03
    min_samples: float | None = 10
    n_components: int | None = 10
    time_points: int | None = 64
    cluster_selection_method: str = "eom"
    normalize: str | None = None
    delta: float | str | None = "paper"
    tau: float | str | None = "plateau"
    tau_fraction: float = 0.05
    tau_smooth: int | None = None
    restrict: Mapping[str, tuple[str, Sequence[int]]] | None = None
    restrict_fraction: float = APPENDIX_G_FRACTION
    recall_over: str = "clustered"
    top_k: int = 3
    entropy_scores: bool = True

    def __post_init__(self):
        for name in ("methods", "labels"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{name} must be a list of names, got {value!r}")
                object.__setattr__(self, name, tuple(value))
        for m in self.methods or ():
            if m not in METHODS:
                raise ValueError(f"unknown method {m!r}; expected some of {list(METHODS)}")
        if self.recall_over not in ("clustered", "all"):
            raise ValueError(f"recall_over must be 'clustered' or 'all', got {self.recall_over!r}")
        if not 0 <= self.restrict_fraction < 1:
            raise ValueError(f"restrict_fraction must be in [0, 1), got {self.restrict_fraction!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be a positive int, got {self.top_k!r}")
        if self.restrict is not None:
            if not isinstance(self.restrict, Mapping):
                raise ValueError(f"restrict must be {{label: (coordinate, allowed values)}}, got {self.restrict!r}")
            spec = {}
            for lab, rule in self.restrict.items():
                if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
                    raise ValueError(f"restrict[{lab!r}] must be (coordinate, allowed values), got {rule!r}")
                spec[lab] = (rule[0], tuple(int(v) for v in rule[1]))
            object.__setattr__(self, "restrict", spec)
        self.cluster  # HDBSCAN's settings are checked by ClusterSettings

    @property
    def cluster(self) -> ClusterSettings:
        """The settings of each HDBSCAN clustering."""
        return ClusterSettings(self.min_cluster_size, self.min_samples, self.n_components, self.time_points,
                               self.cluster_selection_method, normalize=self.normalize)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able values (lists for tuples), e.g. for a W&B run's config."""
        out = dataclasses.asdict(self)
        for name in ("methods", "labels"):
            if out[name] is not None:
                out[name] = list(out[name])
        if out["restrict"] is not None:
            out["restrict"] = {k: [v[0], list(v[1])] for k, v in out["restrict"].items()}
        return out

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "AnalysisSettings":
        """The settings of :meth:`to_dict`'s output (or any subset of the fields).

        Raises:
            TypeError: a name that is not a setting, listing the settings.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise TypeError(f"analysis settings: unknown {unknown}; the settings are {sorted(fields)}")
        return cls(**dict(values))

    @classmethod
    def from_store(cls, ds) -> "AnalysisSettings | None":
        """The settings of the analysis a store (or an ``analyze`` result) holds, or None.

        Read from the attribute ``analysis_settings`` (this class's :meth:`to_dict`, as
        JSON); for an analysis written before it existed, rebuilt from the single
        ``analysis_*`` attributes (see ``recorded.py``). Settings an earlier version
        recorded that are no settings now are skipped.

        Raises:
            ValueError: the recorded settings are not valid settings.

        Example:
            >>> from polca_lightning.analysis import make_synthetic_store
            >>> res = analyze(make_synthetic_store(50, 40, 4), methods=["loss"], tau="plateau")
            >>> AnalysisSettings.from_store(res).tau
            'plateau'
        """
        from .recorded import recorded_settings

        return recorded_settings(ds, cls)



def complete_snapshots(ds) -> int:
    """Number of leading snapshots with a finite ``step`` and some finite ``loss``.

    A store written during training holds NaN for what is not computed yet; the
    analysis uses only the complete prefix.
    """
    step = np.asarray(ds[STEP].values, dtype=np.float64)
    ok = np.isfinite(step) & np.isfinite(np.asarray(ds[LOSS].transpose(SNAPSHOT, TOKEN).values)).any(axis=1)
    return int(ok.size if ok.all() else np.argmin(ok))


def _check_token_coord(ds, name: str, what: str) -> np.ndarray:
    if name not in ds.coords or ds[name].dims != (TOKEN,):
        coords = [c for c in ds.coords if ds[c].dims == (TOKEN,)]
        raise ValueError(f"{what} must name a token coordinate (one of {coords}), got {name!r}")
    return np.asarray(ds[name].values)


def _cluster_one(traj, mask, step, settings, groups, delta, direction, timings):
    """Cluster one unit's ``[snapshot, token]`` trajectory; returns a dict of arrays."""
    T = traj.shape[1]
    labels, reduced = cluster_trajectories(
        traj.T, settings, mask=mask, groups=groups, return_reduced=True, timings=timings
    )
    t0 = time.perf_counter()
    n_c = int(labels.max(initial=-1)) + 1
    medoid = cluster_medoids(reduced, labels) if n_c else np.zeros(0, np.int64)
    t1 = time.perf_counter()
    in_c = labels >= 0
    size = np.bincount(labels[in_c], minlength=n_c)
    onehot = np.zeros((T, n_c))
    onehot[np.flatnonzero(in_c), labels[in_c]] = 1.0
    curves = traj @ onehot / np.maximum(size, 1)  # [snapshot, cluster]
    token_onset = np.full(T, np.nan)
    if mask.any():
        token_onset[mask] = breakthrough_onset(traj[:, mask], step, delta, direction=direction)
    if n_c:
        onset = breakthrough_onset(curves, step, delta, direction=direction)
        # a diagnostic, not the onset: the mean over the members that have an onset of
        # their own (a member whose curve never bends has none)
        has = in_c & np.isfinite(token_onset)
        with np.errstate(invalid="ignore", divide="ignore"):
            member_mean = (np.bincount(labels[has], weights=token_onset[has], minlength=n_c)
                           / np.bincount(labels[has], minlength=n_c))
    else:
        onset = member_mean = np.zeros(0)
    timings["medoids"] = timings.get("medoids", 0.0) + t1 - t0
    timings["onsets"] = timings.get("onsets", 0.0) + time.perf_counter() - t1
    return {
        "labels": labels, "medoid": medoid, "size": size, "curves": curves,
        "onset": onset, "member_onset_mean": member_mean, "token_onset": token_onset,
    }


def _pad(rows: list[np.ndarray], width: int, fill, dtype) -> np.ndarray:
    out = np.full((len(rows), width), fill, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r
    return out


def _run_methods(ds, order, n_snap, step, settings, groups, delta, per_method, timings, bar):
    """Build, filter, cluster and time every unit of every method into ``per_method``."""
    polca_masks = None
    for m in order:
        spec = METHODS[m]
        t_m = time.perf_counter()
        res = {k: [] for k in ("labels", "medoid", "size", "curves", "onset", "member_onset_mean",
                               "token_onset", "kept", "token_kept", "final")}
        for u in range(spec.n_units(ds)):
            t0 = time.perf_counter()
            traj = spec.trajectory(ds, u, n_snap)  # [snapshot, token]
            t1 = time.perf_counter()
            if spec.filter == "own":
                kept, tok = filter_trajectories(traj)
                kept = bool(kept)
            elif spec.filter == "polca":
                if polca_masks is None:
                    polca_masks = [filter_trajectories(METHODS["polca"].trajectory(ds, v, n_snap))[1]
                                   for v in range(METHODS["polca"].n_units(ds))]
                tok = polca_masks[u]
                kept = bool(tok.any())
            else:
                tok = np.isfinite(traj).all(axis=0)
                kept = True
            timings["trajectories"] = timings.get("trajectories", 0.0) + t1 - t0
            timings["filter"] = timings.get("filter", 0.0) + time.perf_counter() - t1
            out = _cluster_one(traj, tok, step, settings, groups, delta, spec.direction, timings)
            out.update(kept=kept, token_kept=tok, final=traj[-1])
            for k, v in out.items():
                res[k].append(v)
            if m == "polca" and polca_masks is None:
                polca_masks = res["token_kept"]
            if bar is not None:
                bar.update(1)
        per_method[m] = res
        log.info("analysis: %s, %d clusterings in %.1f s", m, spec.n_units(ds), time.perf_counter() - t_m)


def analyze(ds, settings: AnalysisSettings | None = None, *, progress: bool = False, **overrides):
    """Filter, cluster, time and score the trajectories of a POLCA store.

    Args:
        ds: store ``xarray.Dataset`` (``polca_lightning.open_store``): ``step``, ``loss``,
            and the variables of the chosen methods.
        settings: every setting (:class:`AnalysisSettings`; default: its defaults).
        progress: show a tqdm bar over clusterings.
        **overrides: settings by name (``min_samples=5``), on top of ``settings``.

    Returns:
        ``xarray.Dataset`` of results (variable list in the package docstring); settings,
        the method list and per-stage timings (JSON) in ``attrs``.

    Raises:
        ValueError: unknown or unavailable method, bad coordinate names, bad settings
            (an unknown τ or Δ rule among them), fewer than 3 complete snapshots.
        TypeError: an override that is not a setting.

    Example:
        >>> from polca_lightning.analysis import make_synthetic_store, analyze
        >>> res = analyze(make_synthetic_store(50, 40, 4), methods=["polca"])   # steps 0..800
        >>> res["cluster"].dims, float(res["tau_paper"]), float(res["onset_delta"])
        (('basis', 'token'), 80.0, 20.0)
        >>> float(res["tau"]) > 80    # the plateau rule: where the mean loss flattens
        True
        >>> bool((res["hidden"] == (res["cluster_onset"] > res["tau"])).all())
        True
    """
    import xarray as xr

    if settings is None:
        settings = AnalysisSettings.from_dict(overrides)
    elif not isinstance(settings, AnalysisSettings):
        raise TypeError(f"settings: expected an AnalysisSettings, got {type(settings).__name__}")
    elif overrides:
        settings = AnalysisSettings.from_dict({**dataclasses.asdict(settings), **overrides})
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    inp = _inputs(ds, settings)
    per_method = _cluster_units(ds, inp, settings, timings, progress)
    data, coords, entries, clusterings = _method_variables(ds, inp, settings, per_method)
    t_s = time.perf_counter()
    _tables(data, coords, inp, settings, entries, clusterings)
    _label_scores(data, coords, inp, settings, per_method)
    timings["scores"] = time.perf_counter() - t_s

    data["tau"] = ((), inp.tau)
    data["tau_paper"] = ((), inp.tau_paper)
    data["onset_delta"] = ((), inp.delta)
    data["mean_loss"] = ((SNAPSHOT,), inp.mean_loss)
    timings["total"] = time.perf_counter() - t_start
    attrs = {f"analysis_{k}": v for k, v in _settings_attrs(settings, inp).items()}
    attrs["analysis_timings"] = json.dumps({k: round(v, 4) for k, v in timings.items()})
    return xr.Dataset(data, coords=coords, attrs=attrs)


@dataclass
class _Inputs:
    """What the stages read: resolved from the store and the settings by ``_inputs``."""

    methods: list[str]
    labels: list[str]
    label_arrays: dict[str, np.ndarray]
    groups: np.ndarray | None
    restrict_masks: dict[str, np.ndarray]
    restrict_groups: dict[str, np.ndarray]
    n_snap: int
    step: np.ndarray
    delta: float
    delta_rule: str
    tau: float
    tau_rule: str
    tau_paper: float
    mean_loss: np.ndarray
    n_tokens: int


def _inputs(ds, settings: AnalysisSettings) -> _Inputs:
    """Stage 1: the store's side of the settings, checked against what the store holds."""
    for var in (STEP, LOSS):
        if var not in ds.variables:
            raise ValueError(f"ds must have a {var!r} variable (store contract), it has {list(ds.data_vars)}")
    avail = available_methods(ds)
    methods = list(avail if settings.methods is None else settings.methods)
    for m in methods:
        if m not in avail:
            raise ValueError(f"method {m!r} needs variable {METHODS[m].variable!r} (and 'polca' for fisher), absent from ds")
    labels = settings.labels
    if labels is None:
        labels = [c for c in ds.coords if ds[c].dims == (TOKEN,) and c not in NON_LABEL_COORDS
                  and np.issubdtype(ds[c].dtype, np.integer)]
    label_arrays = {name: _check_token_coord(ds, name, "labels") for name in labels}
    groups = None if settings.group_by is None else _check_token_coord(ds, settings.group_by, "group_by")
    restrict_masks, restrict_groups = {}, {}
    for lab, (coord, allowed) in (settings.restrict or {}).items():
        if lab not in label_arrays:
            raise ValueError(f"restrict names label {lab!r}, which is not among labels {list(labels)}")
        restrict_groups[lab] = _check_token_coord(ds, coord, "restrict coordinate")
        restrict_masks[lab] = np.isin(restrict_groups[lab], list(allowed))

    n_snap = complete_snapshots(ds)
    if n_snap < 3:
        raise ValueError(f"need at least 3 complete snapshots to analyze, the store has {n_snap}")
    step = np.asarray(ds[STEP].values[:n_snap], dtype=np.float64)
    delta, delta_rule = resolve_delta(settings.delta, step)
    loss = np.asarray(ds[LOSS].isel(snapshot=slice(0, n_snap)).transpose(SNAPSHOT, TOKEN).values)
    mean_loss = np.nanmean(loss.astype(np.float64), axis=1)
    tau, tau_rule = resolve_tau(settings.tau, step, mean_loss, fraction=settings.tau_fraction,
                                smooth=settings.tau_smooth)
    tau_paper, _ = resolve_tau("paper", step, mean_loss)  # appendix G compares under the paper's τ too
    return _Inputs(methods, list(labels), label_arrays, groups, restrict_masks, restrict_groups, n_snap, step,
                   delta, delta_rule, tau, tau_rule, tau_paper, mean_loss, int(ds.sizes[TOKEN]))


def _cluster_units(ds, inp: _Inputs, settings: AnalysisSettings, timings: dict, progress: bool) -> dict:
    """Stage 2: filter, cluster and time every unit of every method (POLCA first: fisher reuses its masks)."""
    order = sorted(inp.methods, key=lambda m: m != "polca")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(METHODS[m].n_units(ds) for m in order), desc="clustering", unit="clustering")
    per_method: dict = {}
    try:
        with single_threaded_blas():
            _run_methods(ds, order, inp.n_snap, inp.step, settings.cluster, inp.groups, inp.delta, per_method,
                         timings, bar)
    finally:
        if bar is not None:
            bar.close()
    return per_method


def _method_variables(ds, inp: _Inputs, settings: AnalysisSettings, per_method: dict):
    """Stage 3: each method's clusters, medoids, curves, onsets and hidden flags as variables;
    returns ``(data, coords, entries, clusterings)``, the last two as columns for ``_tables``.

    ``hidden`` is decided by ``cluster_onset``, the onset of the cluster's mean curve: the
    curve the figures draw. ``cluster_member_onset_mean`` (the mean of the members' own
    onsets) is a diagnostic beside it, never the onset."""
    n_snap, T, tau = inp.n_snap, inp.n_tokens, inp.tau
    n_cid = max([r.shape[0] for m in inp.methods for r in per_method[m]["size"]] + [0])
    data, coords = {}, {SNAPSHOT: ds[SNAPSHOT].values[:n_snap] if SNAPSHOT in ds.coords else np.arange(n_snap),
                        TOKEN: ds[TOKEN].values if TOKEN in ds.coords else np.arange(T),
                        "cluster_id": np.arange(n_cid)}
    entries = {"method": [], "unit": [], "cluster": [], "size": [], "onset": [], "member_onset_mean": []}
    clusterings = {"method": [], "unit": [], "n_clusters": [], "n_clustered": [], "n_outliers": [], "n_filtered": []}
    for m in inp.methods:
        spec, r, p = METHODS[m], per_method[m], METHODS[m].prefix
        U = () if spec.unit_dim is None else (spec.unit_dim,)
        if spec.unit_dim is not None and spec.unit_dim not in coords:
            coords[spec.unit_dim] = (ds[spec.unit_dim].values if spec.unit_dim in ds.coords
                                     else np.arange(spec.n_units(ds)))
        sq = (lambda a: a[0]) if not U else (lambda a: a)
        size = _pad(r["size"], n_cid, 0, np.int64)
        onset = _pad(r["onset"], n_cid, np.nan, np.float64)
        member_mean = _pad(r["member_onset_mean"], n_cid, np.nan, np.float64)
        curves = np.full((len(r["curves"]), n_cid, n_snap), np.nan)
        for i, c in enumerate(r["curves"]):
            curves[i, : c.shape[1]] = c.T
        data[p + "cluster"] = (U + (TOKEN,), sq(np.stack(r["labels"])))
        data[p + "cluster_size"] = (U + ("cluster_id",), sq(size))
        data[p + "medoid"] = (U + ("cluster_id",), sq(_pad(r["medoid"], n_cid, -1, np.int64)))
        data[p + "cluster_onset"] = (U + ("cluster_id",), sq(onset))
        data[p + "cluster_member_onset_mean"] = (U + ("cluster_id",), sq(member_mean))
        data[p + "hidden"] = (U + ("cluster_id",), sq(hidden_breakthrough(onset, tau)))
        data[p + "token_onset"] = (U + (TOKEN,), sq(np.stack(r["token_onset"])))
        data[p + "cluster_trajectory"] = (U + ("cluster_id", SNAPSHOT), sq(curves))
        if spec.filter == "own":
            data[p + "kept"] = (U, sq(np.array(r["kept"], dtype=bool)))
            data[p + "token_kept"] = (U + (TOKEN,), sq(np.stack(r["token_kept"])))
            data[p + "final_projected_loss"] = (U + (TOKEN,), sq(np.stack(r["final"])))
        for u, lab in enumerate(r["labels"]):
            n_c = r["size"][u].shape[0]
            clusterings["method"].append(m)
            clusterings["unit"].append(u if U else -1)
            clusterings["n_clusters"].append(n_c)
            clusterings["n_clustered"].append(int((lab >= 0).sum()))
            clusterings["n_outliers"].append(int((lab == OUTLIER).sum()))
            clusterings["n_filtered"].append(int((lab == FILTERED).sum()))
            for c in range(n_c):
                entries["method"].append(m)
                entries["unit"].append(u if U else -1)
                entries["cluster"].append(c)
                entries["size"].append(int(size[u, c]))
                entries["onset"].append(onset[u, c])
                entries["member_onset_mean"].append(member_mean[u, c])
    return data, coords, entries, clusterings


def _tables(data: dict, coords: dict, inp: _Inputs, settings: AnalysisSettings, entries: dict,
            clusterings: dict) -> None:
    """Stage 4: the tables of clusterings and of clusters (``entry``), hidden fractions under the
    τ in force (``entry_hidden``, ``hidden_fraction``) and under the paper's (``*_paper``)."""
    E = len(entries["method"])
    coords["clustering_method"] = ("clustering", np.array(clusterings["method"], dtype=str))
    coords["clustering_unit"] = ("clustering", np.array(clusterings["unit"], dtype=np.int64))
    for k in ("n_clusters", "n_clustered", "n_outliers", "n_filtered"):
        data[f"clustering_{k}"] = (("clustering",), np.array(clusterings[k], dtype=np.int64))
    coords["entry_method"] = ("entry", np.array(entries["method"], dtype=str).reshape(E))
    coords["entry_unit"] = ("entry", np.array(entries["unit"], dtype=np.int64).reshape(E))
    coords["entry_cluster"] = ("entry", np.array(entries["cluster"], dtype=np.int64).reshape(E))
    data["entry_size"] = (("entry",), np.array(entries["size"], dtype=np.int64).reshape(E))
    data["entry_onset"] = (("entry",), np.array(entries["onset"], dtype=np.float64).reshape(E))
    data["entry_member_onset_mean"] = (("entry",), np.array(entries["member_onset_mean"],
                                                            dtype=np.float64).reshape(E))
    em = coords["entry_method"][1]
    coords["trajectory_type"] = np.array(inp.methods, dtype=str)
    for suffix, tau in (("", inp.tau), ("_paper", inp.tau_paper)):
        entry_hidden = hidden_breakthrough(data["entry_onset"][1], tau)
        data["entry_hidden" + suffix] = (("entry",), entry_hidden)
        data["hidden_fraction" + suffix] = (("trajectory_type",), np.array(
            [entry_hidden[em == m].mean() if (em == m).any() else np.nan for m in inp.methods]))


def _label_scores(data: dict, coords: dict, inp: _Inputs, settings: AnalysisSettings, per_method: dict) -> None:
    """Stage 5: per label, each cluster's homogeneity, chance level, recall, F1 and eligibility;
    base rates; the App. G top clusters; torchmetrics' entropy scores."""
    cm, cu = coords["clustering_method"][1], coords["clustering_unit"][1]
    em, eu = coords["entry_method"][1], coords["entry_unit"][1]
    E, top_k = em.size, settings.top_k
    for name, lab_arr in inp.label_arrays.items():
        vals = np.unique(lab_arr)
        vdim = f"{name}_value"
        coords[vdim] = vals
        cols = {k: np.full((E, vals.size), np.nan) for k in ("homogeneity", "chance", "recall", "f1")}
        elig = np.zeros((E, vals.size), dtype=bool)
        ent = {k: np.full(cm.size, np.nan) for k in ("homogeneity", "completeness", "v_measure")}
        row = 0
        for ci, (m, u) in enumerate(zip(cm, cu)):
            lab = per_method[m]["labels"][max(u, 0)]
            n_c = per_method[m]["size"][max(u, 0)].shape[0]
            s = label_scores(lab, lab_arr, vals, restrict=inp.restrict_masks.get(name),
                             restrict_fraction=settings.restrict_fraction, group=inp.restrict_groups.get(name),
                             recall_over=settings.recall_over, n_clusters=n_c)
            for k in cols:
                cols[k][row: row + n_c] = s[k]
            elig[row: row + n_c] = s["eligible"]
            row += n_c
            if settings.entropy_scores and n_c:
                for k, v in clustering_scores(lab, lab_arr).items():
                    ent[k][ci] = v
        for k, v in cols.items():
            data[f"{name}_{k}"] = (("entry", vdim), v)
        data[f"{name}_eligible"] = (("entry", vdim), elig)
        onehot = lab_arr[:, None] == vals[None, :]  # [token, V]
        inside = inp.restrict_masks.get(name, np.ones(lab_arr.shape, dtype=bool))
        data[f"{name}_base_rate"] = ((vdim,), onehot.mean(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            data[f"{name}_restricted_base_rate"] = ((vdim,), onehot[inside].sum(axis=0) / inside.sum())
        if settings.entropy_scores:
            for k, v in ent.items():
                data[f"{name}_{k}_score"] = (("clustering",), v)
        best = np.full((len(inp.methods), vals.size, top_k), -1, dtype=np.int64)
        for mi, m in enumerate(inp.methods):
            idx = np.flatnonzero(em == m)
            for vi in range(vals.size):
                b = best_clusters(cols["homogeneity"][idx, vi], eu[idx], elig[idx, vi], top_k)
                best[mi, vi] = np.where(b >= 0, idx[np.maximum(b, 0)] if idx.size else -1, -1)
        data[f"{name}_best"] = (("trajectory_type", vdim, "rank"), best)


def _settings_attrs(settings: AnalysisSettings, inp: _Inputs) -> dict:
    """The settings as the result's attributes (without the ``analysis_`` prefix)."""
    return {
        "methods": list(inp.methods), "labels": list(inp.labels), "group_by": settings.group_by or "",
        "min_cluster_size": settings.min_cluster_size,
        "min_samples": -1 if settings.min_samples is None else settings.min_samples,
        "n_components": -1 if settings.n_components is None else settings.n_components,
        "time_points": -1 if settings.time_points is None else settings.time_points,
        "cluster_selection_method": settings.cluster_selection_method, "normalize": settings.normalize or "",
        "onset_delta": inp.delta,
        "delta_rule": inp.delta_rule, "tau": inp.tau, "tau_rule": inp.tau_rule, "tau_paper": inp.tau_paper,
        "restrict": json.dumps({k: [v[0], list(map(int, v[1]))] for k, v in (settings.restrict or {}).items()}),
        "restrict_fraction": settings.restrict_fraction, "recall_over": settings.recall_over,
        "top_k": settings.top_k, "n_snapshots_used": inp.n_snap,
        "onset_convention": "falling curves: most negative a(t); fisher: most positive",
        "cluster_labels": "-1 outlier, -2 not clustered (filtered out)",
        "settings": json.dumps(settings.to_dict()),  # what AnalysisSettings.from_store rebuilds them from
    }
