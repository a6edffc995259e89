"""``analyze``: the whole analysis of one store Dataset, as a Dataset of results.

Steps, per method (``methods``) and per unit (basis vector, LCA direction, or the single
exact-loss clustering): build the trajectory, filter (§4.1), reduce + HDBSCAN, medoids,
cluster mean curves, onsets (Eq. 9), hidden flags against τ (Eq. 10). Then the cluster
scores against every label coordinate (App. G) and torchmetrics' entropy scores.
The result never contains the store's own variables; merge it with the store if you
want both (``xr.merge([ds, res])``: no names collide).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence

import numpy as np

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

__all__ = ["analyze", "complete_snapshots", "NON_LABEL_COORDS"]

log = logging.getLogger(__name__)

#: token coordinates that are not labels to score against
NON_LABEL_COORDS = ("token", "sequence", "position", "target")


def complete_snapshots(ds) -> int:
    """Number of leading snapshots with a finite ``step`` and some finite ``loss``.

    A store written during training holds NaN for what is not computed yet; the
    analysis uses only the complete prefix.
    """
    step = np.asarray(ds["step"].values, dtype=np.float64)
    ok = np.isfinite(step) & np.isfinite(np.asarray(ds["loss"].transpose("snapshot", "token").values)).any(axis=1)
    return int(ok.size if ok.all() else np.argmin(ok))


def _check_token_coord(ds, name: str, what: str) -> np.ndarray:
    if name not in ds.coords or ds[name].dims != ("token",):
        coords = [c for c in ds.coords if ds[c].dims == ("token",)]
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
        # mean over the members that have an onset (a member whose curve never bends has none)
        has = in_c & np.isfinite(token_onset)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean_tok = (np.bincount(labels[has], weights=token_onset[has], minlength=n_c)
                        / np.bincount(labels[has], minlength=n_c))
    else:
        onset = mean_tok = np.zeros(0)
    timings["medoids"] = timings.get("medoids", 0.0) + t1 - t0
    timings["onsets"] = timings.get("onsets", 0.0) + time.perf_counter() - t1
    return {
        "labels": labels, "medoid": medoid, "size": size, "curves": curves,
        "onset": onset, "mean_token_onset": mean_tok, "token_onset": token_onset,
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
        res = {k: [] for k in ("labels", "medoid", "size", "curves", "onset", "mean_token_onset",
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


def analyze(
    ds,
    *,
    methods: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    group_by: str | None = None,
    min_cluster_size: float = 0.03,
    min_samples: float | None = 10,
    n_components: int | None = 10,
    time_points: int | None = 64,
    cluster_selection_method: str = "eom",
    delta: float | str | None = "paper",
    tau: float | str | None = "paper",
    tau_fraction: float = 0.05,
    tau_smooth: int | None = None,
    hidden_rule: str = "token_mean",
    restrict: Mapping[str, tuple[str, Sequence[int]]] | None = None,
    restrict_fraction: float = APPENDIX_G_FRACTION,
    recall_over: str = "clustered",
    top_k: int = 3,
    entropy_scores: bool = True,
    progress: bool = False,
):
    """Filter, cluster, time and score the trajectories of a POLCA store.

    Args:
        ds: store ``xarray.Dataset`` (see DESIGN.md): ``step``, ``loss``, and the
            variables of the chosen methods.
        methods: subset of ``polca, polca_first, lca, fisher, loss, loss_change``
            (default: every one whose variables are present; see ``methods.py``).
        labels: token coordinates to score clusters against (default: every token
            coordinate except ``sequence``, ``position``, ``target``).
        group_by: token coordinate to cluster within (e.g. ``"target"``), or None.
        min_cluster_size, min_samples, n_components, time_points,
            cluster_selection_method: see ``ClusterSettings`` (defaults and reasons in
            ``clustering.py``).
        delta: Δ of Eq. 9: a number of steps, or a rule: ``"paper"`` (default, or None):
            1 % of the run (the paper's Δ = 100 of 10,000 steps), ``"wide"``: 2 % (the
            default of earlier versions); either at least the largest snapshot spacing,
            since ``a(t)`` needs the curves at ``t ± Δ`` and a shorter Δ would read them
            between snapshots (a given Δ below the spacing warns). See ``onsets.py``.
        tau: τ of Eq. 10: a step, or a rule: ``"paper"`` (default, or None):
            ``step[0] + 10 %`` of the run (the paper's τ = 1000 of 10,000 steps);
            ``"plateau"``: where the mean exact loss flattens (``plateau_step``).
        tau_fraction, tau_smooth: ``plateau_step`` settings (with ``tau="plateau"``).
        hidden_rule: ``"token_mean"`` (Eq. 10 as written: the mean of the member tokens'
            onsets > τ) or ``"mean_curve"`` (the onset of the cluster's mean curve > τ).
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
        progress: show a tqdm bar over clusterings.

    Returns:
        ``xarray.Dataset`` of results (variable list in the package docstring); settings,
        the method list and per-stage timings (JSON) in ``attrs``.

    Raises:
        ValueError: unknown or unavailable method, bad coordinate names, bad settings
            (an unknown τ or Δ rule among them), fewer than 3 complete snapshots.

    Example:
        >>> from polca_lightning.analysis import make_synthetic_store, analyze
        >>> res = analyze(make_synthetic_store(50, 40, 4), methods=["polca"])   # steps 0..800
        >>> res["cluster"].dims, float(res["tau"]), float(res["onset_delta"])
        (('basis', 'token'), 80.0, 20.0)
        >>> float(analyze(make_synthetic_store(50, 40, 4), methods=["loss"], tau="plateau")["tau"]) > 80
        True
    """
    import xarray as xr

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    for var in ("step", "loss"):
        if var not in ds.variables:
            raise ValueError(f"ds must have a {var!r} variable (store contract), it has {list(ds.data_vars)}")
    avail = available_methods(ds)
    if methods is None:
        methods = avail
    methods = list(methods)
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"unknown method {m!r}; expected some of {list(METHODS)}")
        if m not in avail:
            raise ValueError(f"method {m!r} needs variable {METHODS[m].variable!r} (and 'polca' for fisher), absent from ds")
    if hidden_rule not in ("token_mean", "mean_curve"):
        raise ValueError(f"hidden_rule must be 'token_mean' or 'mean_curve', got {hidden_rule!r}")
    if labels is None:
        labels = [c for c in ds.coords if ds[c].dims == ("token",) and c not in NON_LABEL_COORDS
                  and np.issubdtype(ds[c].dtype, np.integer)]
    label_arrays = {name: _check_token_coord(ds, name, "labels") for name in labels}
    groups = None if group_by is None else _check_token_coord(ds, group_by, "group_by")
    if not 0 <= restrict_fraction < 1:
        raise ValueError(f"restrict_fraction must be in [0, 1), got {restrict_fraction!r}")
    restrict_masks, restrict_groups = {}, {}
    for lab, spec in (restrict or {}).items():
        if lab not in label_arrays:
            raise ValueError(f"restrict names label {lab!r}, which is not among labels {list(labels)}")
        if not (isinstance(spec, (tuple, list)) and len(spec) == 2):
            raise ValueError(f"restrict[{lab!r}] must be (coordinate, allowed values), got {spec!r}")
        restrict_groups[lab] = _check_token_coord(ds, spec[0], "restrict coordinate")
        restrict_masks[lab] = np.isin(restrict_groups[lab], list(spec[1]))
    settings = ClusterSettings(min_cluster_size, min_samples, n_components, time_points,
                               cluster_selection_method)

    n_snap = complete_snapshots(ds)
    if n_snap < 3:
        raise ValueError(f"need at least 3 complete snapshots to analyze, the store has {n_snap}")
    step = np.asarray(ds["step"].values[:n_snap], dtype=np.float64)
    delta, delta_rule = resolve_delta(delta, step)
    loss = np.asarray(ds["loss"].isel(snapshot=slice(0, n_snap)).transpose("snapshot", "token").values)
    mean_loss = np.nanmean(loss.astype(np.float64), axis=1)
    tau, tau_rule = resolve_tau(tau, step, mean_loss, fraction=tau_fraction, smooth=tau_smooth)
    T = int(ds.sizes["token"])

    order = sorted(methods, key=lambda m: m != "polca")  # polca first: fisher reuses its masks
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(METHODS[m].n_units(ds) for m in order), desc="clustering", unit="clustering")
    per_method = {}
    try:
        with single_threaded_blas():
            _run_methods(ds, order, n_snap, step, settings, groups, delta, per_method, timings, bar)
    finally:
        if bar is not None:
            bar.close()

    # ---- assemble per-method variables
    n_cid = max([r.shape[0] for m in order for r in per_method[m]["size"]] + [0])
    data, coords = {}, {"snapshot": ds["snapshot"].values[:n_snap] if "snapshot" in ds.coords else np.arange(n_snap),
                        "token": ds["token"].values if "token" in ds.coords else np.arange(T),
                        "cluster_id": np.arange(n_cid)}
    entries = {"method": [], "unit": [], "cluster": [], "size": [], "onset": [], "mean_token_onset": []}
    clusterings = {"method": [], "unit": [], "n_clusters": [], "n_clustered": [], "n_outliers": [], "n_filtered": []}
    for m in methods:
        spec, r, p = METHODS[m], per_method[m], METHODS[m].prefix
        U = () if spec.unit_dim is None else (spec.unit_dim,)
        if spec.unit_dim is not None and spec.unit_dim not in coords:
            coords[spec.unit_dim] = (ds[spec.unit_dim].values if spec.unit_dim in ds.coords
                                     else np.arange(spec.n_units(ds)))
        sq = (lambda a: a[0]) if not U else (lambda a: a)
        size = _pad(r["size"], n_cid, 0, np.int64)
        onset = _pad(r["onset"], n_cid, np.nan, np.float64)
        mtok = _pad(r["mean_token_onset"], n_cid, np.nan, np.float64)
        rule_onset = mtok if hidden_rule == "token_mean" else onset
        curves = np.full((len(r["curves"]), n_cid, n_snap), np.nan)
        for i, c in enumerate(r["curves"]):
            curves[i, : c.shape[1]] = c.T
        data[p + "cluster"] = (U + ("token",), sq(np.stack(r["labels"])))
        data[p + "cluster_size"] = (U + ("cluster_id",), sq(size))
        data[p + "medoid"] = (U + ("cluster_id",), sq(_pad(r["medoid"], n_cid, -1, np.int64)))
        data[p + "cluster_onset"] = (U + ("cluster_id",), sq(onset))
        data[p + "cluster_mean_token_onset"] = (U + ("cluster_id",), sq(mtok))
        data[p + "hidden"] = (U + ("cluster_id",), sq(hidden_breakthrough(rule_onset, tau)))
        data[p + "token_onset"] = (U + ("token",), sq(np.stack(r["token_onset"])))
        data[p + "cluster_trajectory"] = (U + ("cluster_id", "snapshot"), sq(curves))
        if spec.filter == "own":
            data[p + "kept"] = (U, sq(np.array(r["kept"], dtype=bool)))
            data[p + "token_kept"] = (U + ("token",), sq(np.stack(r["token_kept"])))
            data[p + "final_projected_loss"] = (U + ("token",), sq(np.stack(r["final"])))
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
                entries["mean_token_onset"].append(mtok[u, c])

    # ---- tables: clusterings and cluster entries
    t_s = time.perf_counter()
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
    data["entry_mean_token_onset"] = (("entry",), np.array(entries["mean_token_onset"], dtype=np.float64).reshape(E))
    rule_col = data["entry_mean_token_onset" if hidden_rule == "token_mean" else "entry_onset"][1]
    entry_hidden = hidden_breakthrough(rule_col, tau)
    data["entry_hidden"] = (("entry",), entry_hidden)
    em = coords["entry_method"][1]
    coords["trajectory_type"] = np.array(methods, dtype=str)
    data["hidden_fraction"] = (("trajectory_type",), np.array(
        [entry_hidden[em == m].mean() if (em == m).any() else np.nan for m in methods]))

    # ---- label scores
    cm, cu = coords["clustering_method"][1], coords["clustering_unit"][1]
    for name, lab_arr in label_arrays.items():
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
            s = label_scores(lab, lab_arr, vals, restrict=restrict_masks.get(name),
                             restrict_fraction=restrict_fraction, group=restrict_groups.get(name),
                             recall_over=recall_over, n_clusters=n_c)
            for k in cols:
                cols[k][row: row + n_c] = s[k]
            elig[row: row + n_c] = s["eligible"]
            row += n_c
            if entropy_scores and n_c:
                for k, v in clustering_scores(lab, lab_arr).items():
                    ent[k][ci] = v
        for k, v in cols.items():
            data[f"{name}_{k}"] = (("entry", vdim), v)
        data[f"{name}_eligible"] = (("entry", vdim), elig)
        onehot = lab_arr[:, None] == vals[None, :]  # [token, V]
        inside = restrict_masks.get(name, np.ones(lab_arr.shape, dtype=bool))
        data[f"{name}_base_rate"] = ((vdim,), onehot.mean(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            data[f"{name}_restricted_base_rate"] = ((vdim,), onehot[inside].sum(axis=0) / inside.sum())
        if entropy_scores:
            for k, v in ent.items():
                data[f"{name}_{k}_score"] = (("clustering",), v)
        best = np.full((len(methods), vals.size, top_k), -1, dtype=np.int64)
        eu = coords["entry_unit"][1]
        for mi, m in enumerate(methods):
            idx = np.flatnonzero(em == m)
            for vi in range(vals.size):
                b = best_clusters(cols["homogeneity"][idx, vi], eu[idx], elig[idx, vi], top_k)
                best[mi, vi] = np.where(b >= 0, idx[np.maximum(b, 0)] if idx.size else -1, -1)
        data[f"{name}_best"] = (("trajectory_type", vdim, "rank"), best)
    timings["scores"] = time.perf_counter() - t_s

    data["tau"] = ((), tau)
    data["onset_delta"] = ((), delta)
    data["mean_loss"] = (("snapshot",), mean_loss)
    timings["total"] = time.perf_counter() - t_start
    settings_attrs = {
        "methods": list(methods), "labels": list(labels), "group_by": group_by or "",
        "min_cluster_size": min_cluster_size, "min_samples": -1 if min_samples is None else min_samples,
        "n_components": -1 if n_components is None else n_components,
        "time_points": -1 if time_points is None else time_points,
        "cluster_selection_method": cluster_selection_method, "onset_delta": delta,
        "delta_rule": delta_rule, "tau": tau, "tau_rule": tau_rule, "hidden_rule": hidden_rule,
        "restrict": json.dumps({k: [v[0], list(map(int, v[1]))] for k, v in (restrict or {}).items()}),
        "restrict_fraction": restrict_fraction, "recall_over": recall_over, "top_k": top_k,
        "n_snapshots_used": n_snap,
        "onset_convention": "falling curves: most negative a(t); fisher: most positive",
        "cluster_labels": "-1 outlier, -2 not clustered (filtered out)",
    }
    attrs = {f"analysis_{k}": v for k, v in settings_attrs.items()}
    attrs["analysis_timings"] = json.dumps({k: round(v, 4) for k, v in timings.items()})
    return xr.Dataset(data, coords=coords, attrs=attrs)
