"""The ``polca`` command: inspect, analyse and report a POLCA store, or write one from checkpoints.

Usage::

    polca info STORE [--storage-option KEY=VALUE ...]
    polca analyze STORE [--defaults] [--min-cluster-size F] [--min-samples F] [--normalize none|token]
                        [--tau STEP|plateau|paper]
                        [--delta STEPS|wide] [--restrict LABEL:COORD=V,V ... | --no-restrict]
                        [--restrict-fraction F] [--group-by COORD] [--methods M ...]
                        [--labels L ...] [--wandb-project NAME [--online]]
                        [--report DIR | --no-report] [--no-write] [--force] [--quiet]
    polca report STORE [--out DIR] [--force] [--quiet]
    polca ablate STORE [--vectors N ...] [--method polca|polca_first] [--labels L ...] [--csv PATH]
    polca signal STORE --label L [--where COORD=V,V ...] [--method polca|polca_first]
                       [--folds N] [--seed N] [--csv PATH]
    polca checkpoints STORE CHECKPOINT [CHECKPOINT ...] --probe DATA [--hessian DATA] [--model FACTORY] ...

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
``<store>.report`` when neither is given; ``--no-report`` prints the tables only. ``report`` draws the folder from the results
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
``checkpoints`` writes a new store from an ordered series of saved weights
(:func:`polca_lightning.from_checkpoints`; its flags in ``polca_lightning.cli.checkpoints``).

Exit codes: 0 success; 2 a usage error, a missing path, a directory that is not a POLCA
store, a store still being written (``analyze``/``report`` without ``--force``), or an
analysis that cannot run; all with a one-line message on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

import numpy as np

from polca_lightning.cli.analyze import cmd_analyze, run_analysis
from polca_lightning.cli.checkpoints import add_parser as add_checkpoints_parser, cmd_checkpoints
from polca_lightning.cli.common import (
    CLIError, open_store_or_fail, require_complete, resolve_location, restriction_argument, steps_or, storage_option,
    storage_options_from, where_values,
)
from polca_lightning.store.schema import BASIS, BASIS_STEP, EIGENVALUE, SEQUENCE, STEP, TOKEN

__all__ = ["main", "build_parser"]

PROG = "polca"


def _version() -> str:
    """The installed package's version (without importing torch, as the package would)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("polca_lightning")
    except PackageNotFoundError:  # run from a source tree without installing
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Inspect, analyse and report POLCA stores, or write one from a series of checkpoints.")
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
    g.add_argument("--normalize", choices=("none", "token"),
                   help="'token': cluster each token's trajectory divided by its root mean square (its shape, "
                        "not its size); 'none' (default): as they are")
    g.add_argument("--tau", type=steps_or("paper", "plateau"), metavar="STEP|plateau|paper",
                   help="τ of the hidden-breakthrough rule: a step, 'plateau' (the default: where the mean loss "
                        "flattens) or 'paper' (10%% of the run, the paper's 1000 of 10,000 steps; its hidden "
                        "fractions are computed beside the plateau rule's in any case)")
    g.add_argument("--delta", type=steps_or("paper", "wide"), metavar="STEPS|wide",
                   help="Δ of the onset rule: steps, 'paper' (default: 1%% of the run, at least one snapshot "
                        "interval) or 'wide' (2%%, the earlier default)")
    g.add_argument("--restrict", type=restriction_argument, action="append", metavar="LABEL:COORD=V,V",
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
    o.add_argument("--no-report", action="store_true",
                   help="print the settings and tables only: no report folder, no W&B run")
    o.add_argument("--no-write", action="store_true",
                   help="leave the store as it is: report what writing the results would give")
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
    p.add_argument("--where", type=where_values, action="append", metavar="COORD=V,V",
                   help="use only tokens whose coordinate takes one of these values, e.g. place=1,2; "
                        "repeat for more conditions (all must hold)")
    p.add_argument("--method", default="polca", choices=["polca", "polca_first"],
                   help="whose POLCA values (default polca)")
    p.add_argument("--folds", type=int, default=5, metavar="N", help="cross-validation folds (default 5)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the folds (default 0)")
    p.add_argument("--csv", metavar="PATH", help="also write the table as CSV")

    add_checkpoints_parser(sub, _store_argument)
    return parser


def _store_argument(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("store", help=help + " (or a URL: s3://bucket/run.zarr, gs://..., memory://...)")
    p.add_argument("--storage-option", dest="storage_options", type=storage_option, action="append",
                   metavar="KEY=VALUE", help="an option of the URL's filesystem (repeatable), e.g. "
                                             "endpoint_url=http://localhost:9000, key=..., anon=true")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="work on a store that is still being written (or left by a crash): its complete part")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------- helpers
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
    ds = open_store_or_fail(args.store)
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


def cmd_report(args) -> int:
    from polca_lightning.report.folder import write_report_folder
    from polca_lightning.report.pipeline import default_report_dir, has_results

    ds = open_store_or_fail(args.store)
    require_complete(ds, args.store, args.force)
    if not has_results(ds):
        print(f"{args.store} holds no analysis: running it with default settings (written into the store)")
        ds = run_analysis(args, write=True, defaults=True)
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

    ds = open_store_or_fail(args.store)
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

    ds = open_store_or_fail(args.store)
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
            "signal": cmd_signal, "checkpoints": cmd_checkpoints}


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
        args.store = resolve_location(args.store, storage_options_from(args.storage_options))
        return COMMANDS[args.command](args)
    except CLIError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
