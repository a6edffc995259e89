"""``polca analyze``: re-run the analysis of a store, from the settings it recorded, and report it.

See :mod:`polca_lightning.cli` for the command's usage.
"""

from __future__ import annotations

from pathlib import Path

from polca_lightning.cli.common import CLIError, open_store_or_fail, require_complete

__all__ = ["cmd_analyze", "analysis_changes", "run_analysis"]


def analysis_changes(args) -> dict:
    """The settings ``analyze``'s flags give, by name (checked here, on the defaults)."""
    from polca_lightning.analysis import AnalysisSettings

    values = {}
    for name in ("methods", "labels", "min_cluster_size", "min_samples", "tau", "delta", "restrict_fraction",
                 "group_by"):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    if getattr(args, "normalize", None) is not None:
        values["normalize"] = None if args.normalize == "none" else args.normalize
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


def run_analysis(args, write: bool, **kwargs):
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

    if args.no_report and (args.report or args.wandb_project):
        raise CLIError(f"--no-report writes no report: leave out {'--report' if args.report else '--wandb-project'}")
    changes = analysis_changes(args)  # bad settings fail before the store is read
    ds = open_store_or_fail(args.store)
    require_complete(ds, args.store, args.force)
    previous = _previous_settings(ds, args.defaults)
    ds = run_analysis(args, write=not args.no_write, defaults=args.defaults, **changes)
    if not args.no_write:
        print(f"analysis written into {args.store}")
    used = AnalysisSettings.from_store(ds)
    start = ("the defaults (--defaults)" if args.defaults else
             "the store's previous analysis" if previous is not None else "the defaults (the store held no analysis)")
    marks = "; * marks a change from the store's previous analysis" if previous is not None else ""
    print(f"analysis settings: {start}, with the flags given{marks}")
    print("\n".join(describe_settings(used, previous, resolved=analysis_attrs(ds))))
    _print_summary(ds)
    if args.no_report:
        return 0
    if args.wandb_project:
        _log_wandb(args, ds, used)
    if args.report or not args.wandb_project:
        out = write_report_folder(ds, args.report or default_report_dir(args.store), progress=not args.quiet)
        print(f"report folder: {out}")
    return 0


def _print_summary(ds) -> None:
    """The summary per vector, and the App. G best clusters with what each is conditioned on."""
    from polca_lightning.report.conditioning import chance_text, restriction_text
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
        print(f"{lab}: restriction {restriction_text(ds, lab)}; chance from {chance_text(ds, lab)}")
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
