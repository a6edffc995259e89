"""Time the analysis of a paper-sized store: 5000 tokens x 500 intervals x 50 vectors.

Builds a synthetic store with planted breakthroughs (``make_synthetic_store``: 1250
sequences of 4 answer tokens, labels ``place`` and ``carry``, an LCA baseline with 50
directions), runs ``analyze`` on it with every trajectory type, and prints the seconds
spent in each stage, the total, and how well the planted carry group was recovered.
Target: under 2 minutes in total on a 2-core machine.

    PYTHONPATH=. python benchmarks/analysis.py [--sequences 1250] [--intervals 500] [--basis 50]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from polca_lightning.analysis import analyze, make_synthetic_store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=1250)
    p.add_argument("--intervals", type=int, default=500)
    p.add_argument("--basis", type=int, default=50)
    p.add_argument("--no-lca", action="store_true")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()

    t0 = time.perf_counter()
    ds = make_synthetic_store(args.sequences, args.intervals, args.basis, lca=not args.no_lca, seed=0)
    t_build = time.perf_counter() - t0
    print(f"store: {ds.sizes['token']} tokens x {ds.sizes['interval']} intervals x "
          f"{ds.sizes['basis']} vectors (built in {t_build:.1f} s, not counted)")

    t0 = time.perf_counter()
    res = analyze(ds, restrict={"carry": ("place", (1, 2))}, progress=args.progress)
    wall = time.perf_counter() - t0

    timings = json.loads(res.attrs["analysis_timings"])
    print("\n| stage | seconds | share |\n| --- | ---: | ---: |")
    for k, v in timings.items():
        if k != "total":
            print(f"| {k} | {v:.1f} | {v / wall:.0%} |")
    print(f"| **total (wall)** | **{wall:.1f}** | 100% |")
    n = res.sizes["clustering"]
    print(f"\n{n} clusterings, {res.sizes['entry']} clusters, "
          f"{wall / n * 1000:.0f} ms per clustering; tau = {float(res['tau']):.0f} steps")

    print("\n| trajectory | best carry homogeneity | recall | F1 | hidden fraction |\n| --- | ---: | ---: | ---: | ---: |")
    for i, m in enumerate(res["trajectory_type"].values):
        best = int(res["carry_best"].sel(trajectory_type=m, carry_value=1, rank=0))
        if best < 0:
            h = r = f = np.nan
        else:
            h, r, f = (float(res[f"carry_{k}"].sel(carry_value=1)[best]) for k in ("homogeneity", "recall", "f1"))
        print(f"| {m} | {h:.3f} | {r:.3f} | {f:.3f} | {float(res['hidden_fraction'][i]):.3f} |")
    print(f"\n{'PASS' if wall < 120 else 'FAIL'}: {wall:.1f} s against the 120 s target")


if __name__ == "__main__":
    main()
