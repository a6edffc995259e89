"""The ``paper_run`` step of ``benchmarks/device_check.py``: ``examples/arithmetic.py --paper``,
trimmed to the time left, through the example's own ``parse_args``, ``run`` and ``print_results``.

The trims are the example's flags (``--steps``, ``--snapshot-every``, ``--probe``,
``--lca-directions``, ``--no-ablate``), chosen by :func:`_device_costs.choose_run` from the unit
costs the ``engine_passes`` step measured on the same model. If training falls behind the
prediction, it is stopped in time for the analysis to run on what was recorded (the JSON
says at which step): the run's callback is the example's with one hook added for that.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from pathlib import Path

from _device_costs import Schedule, choose_run, trim_reasons

ROOT = Path(__file__).resolve().parents[1]

#: the real run: the paper's preset, and the trims in order of preference (see choose_run)
DEVICE_PLAN = dict(
    steps=(10_000, 8_000, 6_000, 5_000, 4_000, 3_000, 2_000),
    trims=((20, 1250), (40, 1250), (50, 1250), (100, 1250), (100, 1000), (100, 750), (100, 500)),
    lca_max=10, min_intervals=40, stop_min_snapshots=21, schedule=Schedule(basis_every=200, max_basis=50), reserve_s=40.0, extra=[],
    label="the paper's settings")
#: the dry run: the same preset at the toy sizes of _device_steps.DRY (its paper_* fields)
DRY_PLAN = dict(
    steps=(16, 8), trims=((2, 16), (4, 16), (4, 8)), lca_max=2, min_intervals=2, stop_min_snapshots=3,
    schedule=Schedule(basis_every=4, max_basis=2, report_per_vector_s=1.0, post_fixed_s=10.0, start_s=3.0),
    reserve_s=15.0,
    extra=["--basis-every", "4", "--max-basis", "2", "--hessian", "16", "--d-model", "16", "--n-layers", "1",
           "--n-heads", "2", "--min-cluster-size", "0.1", "--min-samples", "3"],
    label="the largest toy run")
#: the share of the time left that the prediction may fill (the rest absorbs its errors)
SAFETY = 0.7
PAPER_MIN_CLUSTER_SIZE, PAPER_PROBE = 150, 1250  # appendix E: 3% of the 5,000 probe tokens


def load_example():
    spec = importlib.util.spec_from_file_location("arithmetic_example", ROOT / "examples" / "arithmetic.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def training_deadline(example, stop_at: float, min_snapshots: int):
    """The example's ``POLCACallback``, with training stopped at the first snapshot after
    ``time.perf_counter()`` passes ``stop_at`` (once ``min_snapshots`` are recorded)."""
    base = example.POLCACallback
    state = {"stopped_at_step": None}

    class WithDeadline(base):
        def on_train_batch_end(self, trainer, pl_module, *args):
            super().on_train_batch_end(trainer, pl_module, *args)
            if (not trainer.should_stop and time.perf_counter() > stop_at and self.tracker.n_snapshots >= min_snapshots
                    and trainer.global_step % self.config.snapshot_every == 0):
                trainer.should_stop = True
                state["stopped_at_step"] = int(trainer.global_step)
                print(f"\ndevice_check: training stopped at step {trainer.global_step}: behind the prediction, "
                      "the time left is kept for the analysis", flush=True)

    example.POLCACallback = WithDeadline
    try:
        yield state
    finally:
        example.POLCACallback = base


def hidden_fractions(store) -> dict:
    """``hidden_fraction`` and, where the analysis has them, ``hidden_fraction_paper``, ``tau`` and
    ``tau_paper``, per trajectory type, from the analysed store (``None`` where absent)."""
    from polca_lightning.report import open_analysed_store

    ds = open_analysed_store(store)
    types = [str(t) for t in ds["trajectory_type"].values] if "trajectory_type" in ds.variables else []
    out = {"trajectory_types": types}
    for name in ("hidden_fraction", "hidden_fraction_paper"):
        if name not in ds.variables:
            out[name] = None
            continue
        values = [float(v) for v in ds[name].values.reshape(-1)]
        out[name] = dict(zip(types, values)) if len(values) == len(types) else values
    for name in ("tau", "tau_paper"):  # open_analysed_store restores them from the recorded attributes
        out[name] = float(ds[name].values) if name in ds.variables else None
    return out


def paper_run(setting, costs: dict | None, record, dry_run: bool, end_at: float) -> dict:
    """Plan the trims, run the example with them, print its table, and return the figures.

    Args:
        costs: the ``costs`` of the ``engine_passes`` step (``None``: the smallest run).
        record: the JSON record (the plan is written before the run starts).
        end_at: ``time.perf_counter()`` at which the script's budget ends.
    """
    plan = DRY_PLAN if dry_run else DEVICE_PLAN
    schedule = plan["schedule"]
    left = end_at - time.perf_counter()
    budget = (left - plan["reserve_s"]) * SAFETY
    figures = {"cuda_check": setting.cuda, "time_left_s": left, "planning_budget_s": budget}
    if costs is not None:
        run, tried = choose_run(costs, budget, schedule, plan["steps"], plan["trims"], plan["lca_max"],
                                 plan["min_intervals"])
        reasons = trim_reasons(run, tried[0], budget, plan["label"])
        figures["considered"] = [{k: r[k] for k in ("steps", "snapshot_every", "probe", "lca_directions")}
                                 | {"predicted_s": r["seconds"]["total"]} for r in tried]
    else:  # no measured costs: the smallest run, and nothing predicted
        every, probe = plan["trims"][-1]
        run = {"steps": plan["steps"][-1], "snapshot_every": every, "probe": probe, "lca_directions": 5,
               "ablate": False, "seconds": {"total": None, "after_fit": 60.0}}
        reasons = ["the engine_passes step measured no costs: the smallest run, unpredicted"]
    figures |= {"plan": run, "trims": reasons}
    flags = ["--paper", "--no-wandb", "--overwrite", "--out", str(setting.workdir / "paper"),
             "--steps", str(run["steps"]), "--snapshot-every", str(run["snapshot_every"]), "--probe", str(run["probe"]),
             "--lca-directions", str(run["lca_directions"])] + ([] if run["ablate"] else ["--no-ablate"])
    if not dry_run and run["probe"] != PAPER_PROBE:  # the paper's minimum cluster size, as a share of tokens
        flags += ["--min-cluster-size", str(round(PAPER_MIN_CLUSTER_SIZE * run["probe"] / PAPER_PROBE))]
    flags += plan["extra"]
    print("device_check: the --paper run, trimmed to the time left:\n  " + "\n  ".join(reasons), flush=True)
    print(f"device_check: examples/arithmetic.py {' '.join(flags)}", flush=True)
    example = load_example()
    example_args = example.parse_args(flags)
    figures |= {"flags": flags, "settings": {k: v for k, v in vars(example_args).items()
                                             if isinstance(v, (int, float, str, bool)) or v is None}}
    record.data["steps"]["paper_run"]["figures"] = figures  # kept if the run is cut short
    record.write()
    after_fit = run["seconds"]["after_fit"]
    stop_at = end_at - plan["reserve_s"] / 2 - 1.5 * after_fit  # training ends here at the latest
    start = time.perf_counter()
    with training_deadline(example, stop_at, plan["stop_min_snapshots"]) as state:
        try:
            results = example.run(example_args, Path(example_args.out))
        finally:
            figures["wall_s"] = time.perf_counter() - start
            figures["stopped_at_step"] = state["stopped_at_step"]
    example.print_results(results)
    figures["results"] = {k: results.get(k) for k in ("store", "snapshots", "basis", "tokens", "order", "timings",
                                                       "coverage", "carry", "finding")}
    figures["results"]["signal"] = {name: {k: v for k, v in s.items() if not isinstance(v, list)}
                                    for name, s in (results.get("signal") or {}).items()}
    figures["hidden"] = hidden_fractions(results["store"])
    if run["seconds"]["total"] is not None:
        figures["predicted_over_actual"] = run["seconds"]["total"] / figures["wall_s"]
        figures["predicted_after_fit_s"] = after_fit
    h = figures["hidden"]
    print(f"\nhidden-breakthrough fractions from the store: hidden_fraction (tau {_num(h['tau'])}), "
          f"hidden_fraction_paper (tau {_num(h['tau_paper'])}):")
    for t in h["trajectory_types"]:
        print(f"  {t:<12} {_num((h['hidden_fraction'] or {}).get(t)):>8} {_num((h['hidden_fraction_paper'] or {}).get(t)):>8}")
    return figures


def _num(value) -> str:
    return "-" if value is None or value != value else f"{value:.3f}" if isinstance(value, float) else str(value)
