"""The ``polca`` command: inspect, analyse and report a POLCA store.

Usage::

    polca info STORE [--storage-option KEY=VALUE ...]
    polca analyze STORE [--defaults] [--min-cluster-size F] [--min-samples F] [--tau STEP|plateau|paper]
                        [--delta STEPS|wide] [--restrict LABEL:COORD=V,V ... | --no-restrict]
                        [--restrict-fraction F] [--group-by COORD] [--methods M ...]
                        [--labels L ...] [--wandb-project NAME [--online]]
                        [--report DIR] [--no-write] [--force] [--quiet]
    polca report STORE [--out DIR] [--force] [--quiet]
    polca ablate STORE [--vectors N ...] [--method polca|polca_first] [--labels L ...] [--csv PATH]
    polca signal STORE --label L [--where COORD=V,V ...] [--method polca|polca_first]
                       [--folds N] [--seed N] [--csv PATH]

``analyze`` re-runs the analysis with other settings, writes the results into the store
(unless ``--no-write``), then reports. It starts from the settings of the analysis the
store holds (the run's, after fit: its App. G restriction, τ and Δ rules, HDBSCAN
settings) and changes only what its flags give; ``--defaults`` starts from the defaults
instead, as does a store without an analysis. It prints the settings it used, a ``*``
beside those that differ from the store's previous analysis, and the App. G best
clusters, each label with its restriction (or "none") and what its chance level comes
from, and a warning where another label or the target fixes the label within the
cluster. It reports to a new W&B run with ``--wandb-project``
(offline unless ``--online``), to a PNG folder with ``--report DIR``, and to the folder
``<store>.report`` when neither is given. ``report`` draws the folder from the results
already in the store (it runs the analysis with default settings first if there are none).
``ablate`` prints the causal check written after fit (``POLCACallback(ablate=True)``): each
cluster's loss change when the final model's movement along its vector is undone.
STORE is a directory or a URL that fsspec opens (``s3://bucket/run.zarr``, ``gs://...``):
``--storage-option KEY=VALUE`` (repeatable, every command) passes options to its
filesystem as ``xarray.open_zarr(storage_options=...)`` does, e.g. ``--storage-option
endpoint_url=http://localhost:9000``; a dotted key nests (``client_kwargs.region_name=eu-west-1``)
and a value that reads as JSON (``true``, ``3``) is taken as that. Without them the
filesystem reads its environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ...). The default report folder of a URL store is
``./<name>.report`` in the working directory.
``signal`` is the signal check of a binary token label (``polca_lightning.analysis.signal_check``):
per vector, the AUC of its final projected loss and the cross-validated accuracy of a linear
classifier on its trajectory, beside all vectors together, the exact loss and the majority rate.

Exit codes: 0 success; 2 a usage error, a missing path, a directory that is not a POLCA
store, a store still being written (``analyze``/``report`` without ``--force``), or an
analysis that cannot run; all with a one-line message on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from polca_lightning.store.schema import BASIS, BASIS_STEP, EIGENVALUE, SEQUENCE, SNAPSHOT, STEP, TOKEN

__all__ = ["main", "build_parser"]

PROG = "polca"


def _version() -> str:
    """The installed package's version (without importing torch, as the package would)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("polca_lightning")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown (not installed)"


class CLIError(Exception):
    """An error to report on one line with exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect, analyse and report POLCA stores written by POLCACallback.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="what a store holds: steps, basis, tokens, labels, analysis",
                       description="Print what a POLCA store holds. Works on stores still being written.")
    _store_argument(p, "path of the store (a Zarr directory)")

    p = sub.add_parser("analyze", help="re-run the analysis with other settings and report it",
                       description="Run the analysis (filter, HDBSCAN, onsets, scores) on a store, write the "
                                   "results into it and report them (W&B run and/or PNG folder).")
    _store_argument(p, "path of the store")
    g = p.add_argument_group("analysis settings (see polca_lightning.analysis.analyze); each flag changes one "
                                 "setting of the store's previous analysis, the others stay as it had them")
    g.add_argument("--defaults", action="store_true",
                   help="start from the default settings instead of the store's previous analysis")
    g.add_argument("--methods", nargs="+", metavar="M",
                   help="trajectory types: polca polca_first lca fisher loss loss_change (default: all available)")
    g.add_argument("--labels", nargs="+", metavar="L", help="token labels to score against (default: all)")
    g.add_argument("--min-cluster-size", type=float, metavar="F",
                   help="HDBSCAN minimum cluster size: a fraction of the tokens if < 1, else a count (default 0.03)")
    g.add_argument("--min-samples", type=float, metavar="F",
                   help="HDBSCAN min_samples: fraction if < 1, else a count (default 10)")
    g.add_argument("--tau", type=_steps_or("paper", "plateau"), metavar="STEP|plateau|paper",
                   help="τ of the hidden-breakthrough rule: a step, 'plateau' (the default: where the mean loss "
                        "flattens) or 'paper' (10%% of the run, the paper's 1000 of 10,000 steps; its hidden "
                        "fractions are computed beside the plateau rule's in any case)")
    g.add_argument("--delta", type=_steps_or("paper", "wide"), metavar="STEPS|wide",
                   help="Δ of the onset rule: steps, 'paper' (default: 1%% of the run, at least one snapshot "
                        "interval) or 'wide' (2%%, the earlier default)")
    g.add_argument("--restrict", type=_restriction, action="append", metavar="LABEL:COORD=V,V",
                   help="App. G restriction, e.g. carry:place=1,2 (carry clusters count when their carries "
                        "are at places 1 and 2); repeat for more labels")
    g.add_argument("--no-restrict", action="store_true",
                   help="drop the App. G restriction the store's previous analysis had (every label unrestricted)")
    g.add_argument("--restrict-fraction", type=float, metavar="F",
                   help="share of a cluster's labelled tokens that must be in the restriction "
                        "(default 0.85, App. G's 'over 85%%'; 0.5 is the earlier majority rule)")
    g.add_argument("--group-by", metavar="COORD", help="token coordinate to cluster within, e.g. target")
    o = p.add_argument_group("output")
    o.add_argument("--wandb-project", metavar="NAME", help="log the report to a new W&B run of this project")
    o.add_argument("--online", action="store_true", help="sync the W&B run (default: offline, no account needed)")
    o.add_argument("--wandb-dir", metavar="DIR", help="where W&B writes its run folder (default: beside the store)")
    o.add_argument("--report", metavar="DIR", help="write the PNG/CSV report folder here "
                                                   "(default without --wandb-project: STORE.report)")
    o.add_argument("--no-write", action="store_true", help="do not write the results into the store")
    _common(p)

    p = sub.add_parser("report", help="draw the report folder (PNG figures, CSV tables) of a store",
                       description="Write the PNG/CSV report of the analysis held in a store (analysing it "
                                   "with default settings first if it holds none).")
    _store_argument(p, "path of the store")
    p.add_argument("--out", metavar="DIR", help="report folder (default: STORE.report beside the store)")
    _common(p)

    p = sub.add_parser("ablate", help="each cluster's loss change when its vector's movement is undone",
                       description="Print the causal check of the kept vectors: the loss change of each cluster "
                                   "when the final model's movement along the vector is undone "
                                   "(theta_end - <theta_end - theta_0, b> b), beside the loss change POLCA "
                                   "allocated to the vector. The store needs the ablation "
                                   "(POLCACallback(ablate=True), the default) and an analysis.")
    _store_argument(p, "path of the store")
    p.add_argument("--vectors", nargs="+", type=int, metavar="N", help="basis vectors (default: the kept ones)")
    p.add_argument("--method", default="polca", choices=["polca", "polca_first"],
                   help="whose clusters and allocation (default polca)")
    p.add_argument("--labels", nargs="+", metavar="L", help="describe each cluster by these token labels (e.g. carry)")
    p.add_argument("--csv", metavar="PATH", help="also write the per-cluster table as CSV")

    p = sub.add_parser("signal", help="how well each vector's trajectories predict a binary token label",
                       description="The signal check: per basis vector, the ROC AUC of its final projected loss "
                                   "for label 1 against label 0 (0.5: no signal) and the cross-validated "
                                   "accuracy of a linear classifier on its whole projected-loss trajectory; "
                                   "beside them all vectors together, the exact loss and the majority rate. "
                                   "Tokens with a negative label are left out. Uses the store's complete part.")
    _store_argument(p, "path of the store")
    p.add_argument("--label", required=True, metavar="L", help="binary token label (a coordinate), e.g. carry")
    p.add_argument("--where", type=_where, action="append", metavar="COORD=V,V",
                   help="use only tokens whose coordinate takes one of these values, e.g. place=1,2; "
                        "repeat for more conditions (all must hold)")
    p.add_argument("--method", default="polca", choices=["polca", "polca_first"],
                   help="whose POLCA values (default polca)")
    p.add_argument("--folds", type=int, default=5, metavar="N", help="cross-validation folds (default 5)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the folds (default 0)")
    p.add_argument("--csv", metavar="PATH", help="also write the table as CSV")
    return parser


def _where(text: str) -> tuple[str, tuple[int | float | str, ...]]:
    """argparse type: ``COORD=V,V`` -> ``(coord, (v, v))``; values as ints where they are."""
    coord, sep, values = text.partition("=")
    if not sep or not coord or not values or "" in values.split(","):
        raise argparse.ArgumentTypeError(f"expected COORD=V,V (e.g. place=1,2), got {text!r}")

    def value(v: str):
        for kind in (int, float):
            try:
                return kind(v)
            except ValueError:
                continue
        return v

    return coord, tuple(value(v) for v in values.split(","))


def _steps_or(*rules: str):
    """argparse type: a number of steps, or one of the named ``rules``."""
    def parse(text: str):
        if text in rules:
            return text
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of steps or one of {', '.join(rules)}, "
                                             f"got {text!r}") from None
    parse.__name__ = "steps"
    return parse


def _restriction(text: str) -> tuple[str, tuple[str, tuple[int, ...]]]:
    """argparse type: ``LABEL:COORD=V,V`` -> ``(label, (coord, (v, v)))``."""
    try:
        label, rest = text.split(":", 1)
        coord, values = rest.split("=", 1)
        parsed = tuple(int(v) for v in values.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LABEL:COORD=V,V (e.g. carry:place=1,2), got {text!r}") from None
    if not label or not coord:
        raise argparse.ArgumentTypeError(f"expected LABEL:COORD=V,V (e.g. carry:place=1,2), got {text!r}")
    return label, (coord, parsed)


def _storage_option(text: str) -> tuple[list[str], object]:
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. endpoint_url=http://localhost:9000), got {text!r}")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return key.split("."), parsed


def storage_options_from(pairs: list[tuple[list[str], object]] | None) -> dict | None:
    """``--storage-option`` pairs as a (nested) dict: ``client_kwargs.endpoint_url=URL`` ->
    ``{"client_kwargs": {"endpoint_url": URL}}``; None without any."""
    if not pairs:
        return None
    options: dict = {}
    for keys, value in pairs:
        node = options
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise CLIError(f"--storage-option: {'.'.join(keys)} nests under a key that has a value")
        node[keys[-1]] = value
    return options


def _store_argument(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("store", help=help + " (or a URL: s3://bucket/run.zarr, gs://..., memory://...)")
    p.add_argument("--storage-option", dest="storage_options", type=_storage_option, action="append",
                   metavar="KEY=VALUE", help="an option of the URL's filesystem (repeatable), e.g. "
                                             "endpoint_url=http://localhost:9000, key=..., anon=true")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="work on a store that is still being written (or left by a crash): its complete part")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------- helpers
def _resolve(store: str, storage_options: dict | None):
    """STORE as a StoreLocation (a local path, or a URL with its storage options)."""
    from polca_lightning.store.location import resolve_store

    try:
        return resolve_store(store, storage_options, argument="STORE")
    except (TypeError, ValueError, ImportError) as error:
        raise CLIError(str(error)) from None


def _open(path: str):
    from polca_lightning.report.pipeline import open_analysed_store
    from polca_lightning.store import StoreError

    try:
        return open_analysed_store(path)
    except (OSError, StoreError) as error:  # FileNotFoundError, PermissionError (a URL's credentials)
        raise CLIError(str(error)) from None


def _require_complete(ds, path: str, force: bool) -> None:
    if not ds.attrs.get("complete", False) and not force:
        raise CLIError(f"the store {str(path)!r} is not complete (still being written, or its run stopped early) "
                       f"with {ds.sizes.get(SNAPSHOT, 0)} committed snapshots; pass --force to use that part")


def _analysis_changes(args) -> dict:
    """The settings ``analyze``'s flags give, by name (checked here, on the defaults)."""
    from polca_lightning.analysis import AnalysisSettings

    values = {}
    for name in ("methods", "labels", "min_cluster_size", "min_samples", "tau", "delta", "restrict_fraction",
                 "group_by"):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    if args.restrict:
        values["restrict"] = dict(args.restrict)
    if getattr(args, "no_restrict", False):
        if args.restrict:
            raise CLIError("--restrict and --no-restrict contradict each other; give one")
        values["restrict"] = None
    for name in ("min_cluster_size", "min_samples"):  # counts as ints, fractions as floats
        if name in values and values[name] >= 1 and float(values[name]).is_integer():
            values[name] = int(values[name])
    try:
        AnalysisSettings.from_dict(values)
    except (ValueError, TypeError) as error:
        raise CLIError(f"analysis settings: {error}") from None
    return values


def _analysis_variables(ds) -> list[str]:
    from polca_lightning.report.pipeline import RESULT_MARK

    return sorted(n for n in ds.variables if RESULT_MARK in ds[n].attrs)


def _fmt_steps(steps: np.ndarray) -> str:
    if steps.size == 0:
        return "none"
    diffs = np.unique(np.diff(steps))
    every = f", every {int(diffs[0])}" if diffs.size == 1 else ""
    return f"{steps.size} ({int(steps[0])}..{int(steps[-1])}{every})"


# --------------------------------------------------------------------------- commands
def cmd_info(args) -> int:
    ds = _open(args.store)
    a = ds.attrs
    steps = np.asarray(ds[STEP].values)
    lines = [f"POLCA store {args.store}"]
    if a.get("complete", False):
        lines.append("complete:    yes (the run closed the store)")
    else:
        lines.append("complete:    NO: still being written, or the run stopped early; "
                     "what follows is its committed part")
    lines.append(f"order:       {a.get('order', '?')}")
    lines.append(f"snapshots:   {_fmt_steps(steps)}")
    n_basis = int(ds.sizes.get(BASIS, 0))
    lines.append(f"basis:       {n_basis} of max {a.get('max_basis', '?')} vectors")
    if n_basis:
        bsteps = np.asarray(ds[BASIS_STEP].values)
        joined = ", ".join(f"{int(s)}: {int((bsteps == s).sum())}" for s in np.unique(bsteps))
        lines.append(f"  joined at step (count): {joined}")
        eig = np.asarray(ds[EIGENVALUE].values, dtype=np.float64)
        lines.append("  eigenvalues: " + " ".join(f"{e:.4g}" for e in eig))
    n_tok = int(ds.sizes.get(TOKEN, 0))
    n_seq = np.unique(np.asarray(ds[SEQUENCE].values)).size if n_tok else 0
    lines.append(f"tokens:      {n_tok} in {n_seq} sequences")
    labels = list(a.get("token_labels", []))
    if labels:
        lines.append("labels:")
        for name in labels:
            vals, counts = np.unique(np.asarray(ds[name].values), return_counts=True)
            lines.append(f"  {name}: " + ", ".join(f"{int(v)} ({int(c)})" for v, c in zip(vals, counts)))
    else:
        lines.append("labels:      none")
    params = a.get("parameters", [])
    n_par = sum(int(np.prod(shape)) for _, shape in params)
    lines.append(f"parameters:  {n_par} in {len(params)} tensors")
    results = _analysis_variables(ds)
    if results:
        settings = ds["cluster"].attrs if "cluster" in ds.variables else ds[results[0]].attrs
        methods = ", ".join(settings.get("analysis_methods", []))
        lines.append(f"analysis:    {len(results)} variables (methods {methods}; "
                     f"tau {settings.get('analysis_tau', float('nan')):g})")
        lines.append("  " + " ".join(results))
    else:
        lines.append("analysis:    none (run `polca analyze STORE`)")
    print("\n".join(lines))
    return 0


def _run_analysis(args, write: bool, **kwargs):
    from polca_lightning.report.pipeline import analyze_store

    try:
        return analyze_store(args.store, write=write, progress=not args.quiet, **kwargs)
    except (ValueError, TypeError) as error:  # bad settings or too little data, said by analyze
        raise CLIError(f"analysis failed: {error}") from None


def _previous_settings(ds, defaults: bool):
    """The settings of the analysis the store holds (None without one)."""
    from polca_lightning.analysis import AnalysisSettings

    try:
        return AnalysisSettings.from_store(ds)
    except (ValueError, TypeError) as error:
        if defaults:
            return None
        raise CLIError(f"the store's recorded analysis settings are not valid ({error}); "
                       "pass --defaults to start from the defaults") from None


def cmd_analyze(args) -> int:
    from polca_lightning.analysis import AnalysisSettings
    from polca_lightning.analysis.recorded import analysis_attrs, describe_settings
    from polca_lightning.report.folder import write_report_folder
    from polca_lightning.report.pipeline import default_report_dir

    changes = _analysis_changes(args)  # bad settings fail before the store is read
    ds = _open(args.store)
    _require_complete(ds, args.store, args.force)
    previous = _previous_settings(ds, args.defaults)
    ds = _run_analysis(args, write=not args.no_write, defaults=args.defaults, **changes)
    if not args.no_write:
        print(f"analysis written into {args.store}")
    used = AnalysisSettings.from_store(ds)
    start = ("the defaults (--defaults)" if args.defaults else
             "the store's previous analysis" if previous is not None else "the defaults (the store held no analysis)")
    marks = "; * marks a change from the store's previous analysis" if previous is not None else ""
    print(f"analysis settings: {start}, with the flags given{marks}")
    print("\n".join(describe_settings(used, previous, resolved=analysis_attrs(ds))))
    _print_summary(ds)
    if args.wandb_project:
        _log_wandb(args, ds, used)
    if args.report or not args.wandb_project:
        out = write_report_folder(ds, args.report or default_report_dir(args.store), progress=not args.quiet)
        print(f"report folder: {out}")
    return 0


def _print_summary(ds) -> None:
    """The summary per vector, and the App. G best clusters with what each is conditioned on."""
    from polca_lightning.report.conditioning import chance_basis, restriction_text
    from polca_lightning.report.pipeline import appendix_g_table, kept_units, summary_table

    summary = summary_table(ds)
    attrs = ds["cluster"].attrs if "cluster" in ds.variables else {}
    print(f"kept vectors: {kept_units(ds)}; tau = {float(ds['tau'].values):g} ({attrs.get('analysis_tau_rule', '?')}); "
          f"delta = {float(ds['onset_delta'].values):g} ({attrs.get('analysis_delta_rule', '?')})")
    print("  ".join(summary.columns[:9]))
    for row in summary.rows:
        print("  ".join("" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v)) for v in row[:9]))
    table = appendix_g_table(ds)
    if table is None:
        return
    col = {c: i for i, c in enumerate(table.columns)}
    hidden = [c for c in table.columns if c.startswith("hidden_fraction")]
    num = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    print("\nappendix G: the best cluster per label value and trajectory type (rank 0)")
    for lab in dict.fromkeys(row[col["label"]] for row in table.rows):
        print(f"{lab}: restriction {restriction_text(ds, lab)}; chance from the "
              + ("label's base rate" if chance_basis(ds, lab) == "base rate"
                 else f"cluster's mix of {chance_basis(ds, lab)}"))
        print(f"  {'value':>5} {'trajectory':<12} {'vector':>6} {'size':>5} {'homogeneity':>11} {'chance':>6} "
              f"{'recall':>6} {'F1':>6}  " + "  ".join(hidden))
        for row in table.rows:
            if row[col["label"]] != lab or row[col["rank"]] != 0:
                continue
            unit = row[col["unit"]]
            print(f"  {row[col['value']]!s:>5} {row[col['trajectory_type']]:<12} {unit if unit >= 0 else '-':>6} "
                  f"{row[col['size']]:>5} {num(row[col['homogeneity']]):>11} {num(row[col['chance']]):>6} "
                  f"{num(row[col['recall']]):>6} {num(row[col['f1']]):>6}  "
                  + "  ".join(f"{num(row[col[h]]):>{len(h)}}" for h in hidden)
                  + (f"  warning: {lab} is fixed by {row[col['fixed_by']]} in this cluster"
                     if row[col["fixed_by"]] else ""))


def _log_wandb(args, ds, settings) -> None:
    from lightning.pytorch.loggers import WandbLogger

    from polca_lightning.report.wandb_report import log_report

    location = args.store
    store = str(location) if location.remote else str(location.target.resolve())
    save_dir = args.wandb_dir or ("." if location.remote else str(location.target.resolve().parent))
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    logger = WandbLogger(project=args.wandb_project, offline=not args.online, save_dir=save_dir,
                         name=f"polca analyze {location.name}", job_type="polca-analysis",
                         config={"store": store, **settings.to_dict()})
    try:
        keys = log_report(logger, ds, progress=not args.quiet)
        run_dir = logger.experiment.dir
    finally:
        import wandb

        wandb.finish()
    print(f"W&B run ({'online' if args.online else 'offline'}): {len(keys)} keys; files in {Path(run_dir).parent}")


def cmd_report(args) -> int:
    from polca_lightning.report.folder import write_report_folder
    from polca_lightning.report.pipeline import default_report_dir, has_results

    ds = _open(args.store)
    _require_complete(ds, args.store, args.force)
    if not has_results(ds):
        print(f"{args.store} holds no analysis: running it with default settings (written into the store)")
        ds = _run_analysis(args, write=True, defaults=True)
    out = write_report_folder(ds, args.out or default_report_dir(args.store), progress=not args.quiet)
    print(f"report folder: {out}")
    return 0


def _fmt(value, signed: bool = True) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:+.4f}" if signed else f"{value:.3f}"
    return str(value)


def cmd_ablate(args) -> int:
    from polca_lightning.analysis.ablation import ablation_summary, ablation_table

    ds = _open(args.store)
    try:
        table = ablation_table(ds, args.vectors, args.method, labels=args.labels)
        summary = ablation_summary(ds, args.vectors, args.method)
    except ValueError as error:
        raise CLIError(str(error)) from None
    print("loss change when the final model's movement along a vector is undone "
          "(positive: the loss rises); polca_total: the loss change POLCA allocated to the vector")
    print("  ".join(f"{c:>22}" if i else c for i, c in enumerate(summary.columns)))
    for row in summary.rows:
        print("  ".join(f"{_fmt(v):>22}" if i else f"{v:>6}" for i, v in enumerate(row)))
    col = {c: i for i, c in enumerate(table.columns)}
    shown = ["tokens", "size", "loss_change", "rest", "polca_total"] + table.columns[col["most_affected"] + 1:]
    for u in dict.fromkeys(row[col["vector"]] for row in table.rows):
        rows = [row for row in table.rows if row[col["vector"]] == u]
        print(f"\nvector {u} (moved {rows[0][col['coefficient']]:+.4g} along it):")
        print("  " + "  ".join(f"{c:>12}" for c in shown + ["most affected"]))
        for row in rows:
            print("  " + "  ".join(f"{_fmt(row[col[c]], not c.endswith('_share')):>12}" for c in shown)
                  + f"  {'<-' if row[col['most_affected']] else '':>12}")
    if args.csv:
        table.to_csv(args.csv)
        print(f"\ntable written to {args.csv}")
    return 0


def cmd_signal(args) -> int:
    import math
    import textwrap

    from polca_lightning.analysis.signal import interpret_signal_check, signal_check, signal_check_table

    ds = _open(args.store)
    where: dict = {}
    for coord, values in args.where or []:  # a coordinate given twice: both conditions hold
        where[coord] = [v for v in where[coord] if v in values] if coord in where else list(values)
    try:
        res = signal_check(ds, args.label, where=where or None, folds=args.folds, seed=args.seed,
                           method=args.method)
    except ValueError as error:
        raise CLIError(str(error)) from None
    a = res.attrs
    dropped = f"; {a['n_dropped_nonfinite']} dropped for non-finite values" if a["n_dropped_nonfinite"] else ""
    print(f"signal check of label {a['label']!r} where {a['where']}: method {a['method']}, "
          f"{a['folds']}-fold cross-validation (seed {a['seed']})")
    print(f"{int(res['n_tokens'])} tokens, {int(res['n_positive'])} with label 1; {a['n_snapshots']} snapshots "
          f"as {a['time_points']} time points{dropped}")
    table = signal_check_table(res)
    num = lambda v: "-" if not math.isfinite(v) else f"{v:.3f}"  # noqa: E731
    print(f"\n{'basis':>12}  {'auc':>7}  {'accuracy':>8}")
    for basis, auc, acc in table.itertuples(index=False):
        print(f"{basis!s:>12}  {num(auc):>7}  {num(acc):>8}")
    print("\n" + textwrap.fill(interpret_signal_check(res), width=100))
    if args.csv:
        table.to_csv(args.csv, index=False)
        print(f"\ntable written to {args.csv}")
    return 0


COMMANDS = {"info": cmd_info, "analyze": cmd_analyze, "report": cmd_report, "ablate": cmd_ablate,
            "signal": cmd_signal}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``polca`` console script; returns the exit code.

    Example:
        >>> main(["info", "runs/polca.zarr"])
        0
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed
        return int(exit_.code or 0)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        args.store = _resolve(args.store, storage_options_from(args.storage_options))
        return COMMANDS[args.command](args)
    except CLIError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
