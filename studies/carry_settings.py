"""How the clustering settings change the best carry cluster, on one arithmetic store.

Re-runs the analysis (training variables only; nothing is written) with several
clustering settings and prints, for POLCA, first-order POLCA and the exact loss, the
best cluster of carry tokens under appendix G's restriction (carry clusters of the 10s
and 100s places): homogeneity, recall, F1 and size.

Usage:
    python examples/arithmetic.py --out runs/arithmetic
    python studies/carry_settings.py runs/arithmetic/polca.zarr
"""

from __future__ import annotations

import argparse
import time

import xarray as xr

from polca_lightning import open_store
from polca_lightning.analysis import analyze
from polca_lightning.report import appendix_g_table

TRAINING = ("loss", "directional_grad", "delta", "polca", "polca_first", "eigenvalue", "basis_vectors", "weights")

SETTINGS = {
    "defaults (min_cluster_size 3%, min_samples 10)": {},
    "min_cluster_size 1%": {"min_cluster_size": 0.01},
    "min_samples 5": {"min_samples": 5},
    "paper's min_samples = tokens/15": {"min_samples": 1 / 15},
    "within each place (group_by='place')": {"group_by": "place"},
    "no PCA (64 time blocks)": {"n_components": None},
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("store")
    args = p.parse_args()
    store = open_store(args.store)
    ds = store[[v for v in TRAINING if v in store]]
    print("| settings | trajectories | homogeneity | recall | F1 | size | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, kwargs in SETTINGS.items():
        start = time.perf_counter()
        res = analyze(ds, methods=["polca", "polca_first", "loss"], labels=["carry", "place"],
                      restrict={"carry": ("place", (1, 2))}, **kwargs)
        seconds = time.perf_counter() - start
        merged = xr.merge([ds, res], compat="override")
        merged.attrs.update(store.attrs)
        table = appendix_g_table(merged)
        col = {c: i for i, c in enumerate(table.columns)}
        for row in table.rows:
            if row[col["label"]] == "carry" and row[col["value"]] == 1 and row[col["rank"]] == 0:
                print(f"| {name} | {row[col['trajectory_type']]} | {row[col['homogeneity']]:.3f} | "
                      f"{row[col['recall']]:.3f} | {row[col['f1']]:.3f} | {row[col['size']]} | {seconds:.0f} |")


if __name__ == "__main__":
    main()
