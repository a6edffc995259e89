"""Why a run's carry clusters are small: when carries are learned, and along which vectors.

For each analysed arithmetic store (``examples/arithmetic.py``) prints:

1. **timing**: per token group (1000s place; 10s/100s place with and without a carry;
   1s place), the step at which the group's mean loss has made 50 % and 90 % of its
   total decrease, against τ (where the mean loss is flat). Carries can only form a
   cluster of their own if their loss moves at a different time or along other
   directions than the rest.
2. **selectivity per vector**: the mean loss change POLCA allocates to the vector
   (Σ over intervals) for 10s/100s carry tokens and for the other 10s/100s tokens, and
   the same two means of the ablation (loss change when the final movement along the
   vector is undone), with the vector's best carry cluster (homogeneity, size).

Usage:
    python studies/carry_diagnostics.py runs/arithmetic/seed_*/polca.zarr
"""

from __future__ import annotations

import argparse

import numpy as np

from polca_lightning.report import open_analysed_store, summary_table


def progress_steps(curve: np.ndarray, step: np.ndarray, fractions=(0.5, 0.9)) -> list[float]:
    """Steps at which a decreasing curve has made each fraction of its total decrease."""
    drop = curve[0] - np.minimum.accumulate(curve)
    total = drop[-1]
    if total <= 0:
        return [float("nan")] * len(fractions)
    return [float(step[np.argmax(drop >= f * total)]) for f in fractions]


def groups(ds) -> dict[str, np.ndarray]:
    place, carry = ds["place"].values, ds["carry"].values
    mid = np.isin(place, (1, 2))
    return {"1000s": place == 0, "10s/100s carry": mid & (carry == 1),
            "10s/100s no carry": mid & (carry == 0), "1s": place == 3}


def report(path: str) -> None:
    ds = open_analysed_store(path)
    step = ds["step"].values.astype(float)
    loss = ds["loss"].transpose("snapshot", "token").values.astype(float)
    tau = float(ds["tau"].values) if "tau" in ds else float("nan")
    print(f"\n{path}: {ds.sizes['snapshot']} snapshots to step {int(step[-1])}, "
          f"{ds.sizes['basis']} vectors, tau = {tau:g}")
    print(f"  {'tokens':<18} {'n':>5} {'loss start':>10} {'loss end':>9} {'50% by step':>12} {'90% by step':>12}")
    g = groups(ds)
    for name, sel in g.items():
        curve = loss[:, sel].mean(1)
        half, most = progress_steps(curve, step)
        print(f"  {name:<18} {sel.sum():>5} {curve[0]:>10.3f} {curve[-1]:>9.3f} {half:>12g} {most:>12g}")

    carry, other = g["10s/100s carry"], g["10s/100s no carry"]
    total = ds["polca"].sum("interval").transpose("basis", "token").values.astype(float)
    ablation = ds["ablation_loss_change"].values if "ablation_loss_change" in ds else None
    summary = summary_table(ds)
    col = {name: i for i, name in enumerate(summary.columns)}
    print(f"  {'vector':>6} {'step':>5} {'kept':>4} {'POLCA carry':>11} {'POLCA other':>11} "
          f"{'ablate carry':>12} {'ablate other':>12} {'best carry homogeneity':>22}")
    for row in summary.rows:
        u, best = row[col["vector"]], row[col["best carry=1"]]
        best = "-" if best is None else f"{best:.2f}"
        abl = ("{:>+12.4f} {:>+12.4f}".format(ablation[u, carry].mean(), ablation[u, other].mean())
               if ablation is not None else f"{'-':>12} {'-':>12}")
        print(f"  {u:>6} {row[col['basis_step']]:>5} {'yes' if row[col['kept']] else '':>4} "
              f"{total[u, carry].mean():>+11.4f} {total[u, other].mean():>+11.4f} {abl} {best:>22}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stores", nargs="+")
    for path in p.parse_args(argv).stores:
        report(path)


if __name__ == "__main__":
    main()
