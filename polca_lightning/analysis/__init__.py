"""Analysis of a POLCA store: filtering, clustering, onsets, baselines, scores.

Plain numpy in, numpy out (hdbscan for clustering, torchmetrics only for its
entropy-based clustering scores, imported when used); ``analyze`` reads a store
``xarray.Dataset`` and returns a new Dataset of results.

Modules (one concept each):

- ``trajectories``: ``projected_loss`` (Eq. 8), ``loss_change``, ``cumulative_fisher``,
  ``filter_trajectories`` (§4.1: keep a vector iff its mean final projected loss < 0,
  keep a token along it iff its final projected loss < 0 and its trajectory is finite).
- ``clustering``: ``ClusterSettings``, ``reduce_trajectories`` (time block-averaging +
  PCA), ``cluster_trajectories`` (HDBSCAN, optional groups), ``cluster_medoids``;
  labels ``>= 0`` clusters (0 = largest), ``OUTLIER = -1``, ``FILTERED = -2``.
- ``onsets``: ``acceleration`` and ``breakthrough_onset`` (Eq. 9; onset of a drop = most
  negative a(t)), ``default_delta`` (Δ, 1 % of the run: the paper's Δ = 100 of 10,000
  steps), ``plateau_step`` (τ where the mean loss flattens, ``tau="plateau"``, the
  default), ``default_tau`` (the paper's τ, 10 % of the run: 1000 of 10,000 steps,
  ``tau="paper"``), ``hidden_breakthrough`` (Eq. 10).
- ``scores``: ``label_scores`` (homogeneity, recall, F1, chance level, App. G
  restriction: over 85 % of a cluster's carries in the 10s/100s places),
  ``chance_homogeneity``, ``best_clusters``, ``clustering_scores`` (torchmetrics).
- ``methods``: the six trajectory types of App. G (``METHODS``).
- ``signal``: ``signal_check`` (how well each vector's projected-loss trajectory predicts
  a binary token label: AUC of its final value, cross-validated linear accuracy of its
  trajectory, against all vectors, the exact loss and the majority rate),
  ``signal_check_table``, ``interpret_signal_check``.
- ``ablation``: the causal check's numbers from the store (``ablated_units``,
  ``ablation_table``, ``ablation_summary``); ``polca_lightning.ablate_directions``
  computes them with torch.
- ``pipeline``: ``analyze``, in stages, driven by ``AnalysisSettings``.
- ``tables``: reading results back; ``check_hidden_flags`` checks on any analysed store
  that every hidden flag is ``cluster_onset > tau``.
- ``synthetic``: ``make_synthetic_store`` (planted breakthroughs, for tests/benchmarks).

Result of ``analyze`` (``U`` = the method's unit dim: ``basis`` for polca, polca_first
and fisher, ``lca_basis`` for lca, none for loss and loss_change; POLCA's variables
have no prefix, the baselines' are prefixed ``polca_first_``, ``lca_``, ``fisher_``,
``loss_``, ``loss_change_``):

- ``cluster[U, token]`` int (``-1`` outlier, ``-2`` not clustered),
  ``cluster_size[U, cluster_id]``, ``medoid[U, cluster_id]`` (token index, -1 none),
  ``cluster_onset[U, cluster_id]`` (onset step of the cluster mean curve: *the* onset,
  the one the figures draw and ``hidden`` uses), ``hidden[U, cluster_id]`` (Eq. 10:
  ``cluster_onset > tau``), ``cluster_member_onset_mean[U, cluster_id]`` (a diagnostic:
  the mean of the members' own onsets, pulled late by members whose curves are noisy;
  never drawn as the onset),
  ``token_onset[U, token]``, ``cluster_trajectory[U, cluster_id, snapshot]``;
- with their own filter (polca, polca_first, lca): ``kept[U]``,
  ``token_kept[U, token]``, ``final_projected_loss[U, token]``;
- ``tau``, ``onset_delta`` (scalars, steps; the rules that gave them in the attrs
  ``analysis_tau_rule`` and ``analysis_delta_rule``), ``tau_paper`` (the paper's τ,
  10 % of the run, always computed: ``analysis_tau_paper``), ``mean_loss[snapshot]``;
- table of clusterings: dim ``clustering`` with coords ``clustering_method``,
  ``clustering_unit`` (-1 for loss methods) and ``clustering_n_clusters``,
  ``clustering_n_clustered``, ``clustering_n_outliers``, ``clustering_n_filtered``;
- table of clusters: dim ``entry`` with coords ``entry_method``, ``entry_unit``,
  ``entry_cluster`` and ``entry_size``, ``entry_onset``, ``entry_member_onset_mean``,
  ``entry_hidden`` (``entry_onset > tau``), ``entry_hidden_paper`` (``entry_onset >
  tau_paper``); ``hidden_fraction[trajectory_type]`` and
  ``hidden_fraction_paper[trajectory_type]``, the fraction of each type's clusters
  hidden under τ and under the paper's τ (the ``trajectory_type`` dim lists the
  methods; it is not called ``method``, which ``.sel`` reserves);
- per label coordinate ``L`` (e.g. ``carry``), dim ``L_value``: ``L_homogeneity``,
  ``L_chance``, ``L_recall``, ``L_f1``, ``L_eligible`` ``[entry, L_value]``.
  ``L_chance`` is the homogeneity expected from the cluster's composition alone: with a
  restriction ``{L: (G, ...)}``, ``Σ_g`` (the cluster's share of tokens in group ``g``
  of coordinate ``G``) × (the rate of the value among all the store's tokens of group
  ``g``), e.g. 0.4625 for 30 10s-place and 10 100s-place tokens at carry rates 0.45
  and 0.5; without one, the value's rate among all tokens. ``L_base_rate[L_value]``
  (the rate among all tokens) and ``L_restricted_base_rate[L_value]`` (among the tokens
  in the restriction's allowed values; all tokens without one).
  ``L_best[trajectory_type, L_value, rank]``: entry indices of the App. G top clusters,
  best homogeneity first, at most one per unit, among the eligible ones (-1 none);
  ``L_homogeneity_score``, ``L_completeness_score``, ``L_v_measure_score``
  ``[clustering]`` (torchmetrics, clustered tokens only).

Example:
    >>> from polca_lightning.analysis import analyze, make_synthetic_store
    >>> ds = make_synthetic_store(n_sequences=100, n_intervals=60, n_basis=4)
    >>> res = analyze(ds, restrict={"carry": ("place", (1, 2))})
    >>> best = int(res["carry_best"].sel(trajectory_type="polca", carry_value=1, rank=0))
    >>> round(float(res["carry_homogeneity"][best].sel(carry_value=1)), 1)
    1.0
"""

from .ablation import ablated_units, ablation_summary, ablation_table
from .clustering import (
    FILTERED,
    OUTLIER,
    ClusterSettings,
    cluster_medoids,
    cluster_points,
    cluster_trajectories,
    reduce_trajectories,
)
from .methods import METHODS, MethodSpec, available_methods
from .onsets import (
    acceleration,
    breakthrough_onset,
    default_delta,
    default_tau,
    hidden_breakthrough,
    plateau_step,
    smooth_curve,
)
from .pipeline import AnalysisSettings, analyze, complete_snapshots
from .scores import best_clusters, chance_homogeneity, clustering_scores, label_scores
from .signal import interpret_signal_check, signal_check, signal_check_table
from .synthetic import make_synthetic_store, planted_groups
from .tables import check_hidden_flags
from .trajectories import cumulative_fisher, filter_trajectories, loss_change, projected_loss

__all__ = [
    "analyze",
    "AnalysisSettings",
    "complete_snapshots",
    "projected_loss",
    "loss_change",
    "cumulative_fisher",
    "filter_trajectories",
    "ClusterSettings",
    "OUTLIER",
    "FILTERED",
    "reduce_trajectories",
    "cluster_points",
    "cluster_trajectories",
    "cluster_medoids",
    "acceleration",
    "breakthrough_onset",
    "default_delta",
    "default_tau",
    "smooth_curve",
    "plateau_step",
    "hidden_breakthrough",
    "check_hidden_flags",
    "label_scores",
    "chance_homogeneity",
    "best_clusters",
    "clustering_scores",
    "signal_check",
    "signal_check_table",
    "interpret_signal_check",
    "METHODS",
    "MethodSpec",
    "available_methods",
    "make_synthetic_store",
    "planted_groups",
    "ablated_units",
    "ablation_table",
    "ablation_summary",
]
