"""Does the carry signal sharpen with model width? The carry figures of arithmetic runs by width.

For every store given (``examples/arithmetic.py --format digits --d-model D --seed S --out
runs/width/dD/seed_S``), measures what ``carry_regimes.py`` measures (the signal check on
the 10s/100s-place tokens, the best appendix G carry cluster of POLCA, first-order POLCA
and the exact loss beside its chance level, the carry purity of the neighbourhoods HDBSCAN
clusters in), groups the stores by parameter count, and writes

- a markdown table, mean ± sd over seeds per width (``--out``; the per-store figures beside
  it as JSON, reused on a second run);
- a figure (``--figure``): each measure against the parameter count (log scale), one point
  per seed, with a least-squares line in log(parameters) carried to the paper's 9,475,594
  parameters, printed as the extrapolation the trend allows, with its residual spread.

Usage:
    python studies/carry_width.py runs/width/d*/seed_*/polca.zarr --out runs/width/table.md \\
        --figure docs/figures/carry_width.png
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from carry_regimes import measure_stores, store_figures  # noqa: E402  (one measurement of a store, shared)

#: the paper's arithmetic model (appendix D)
PAPER_PARAMETERS = 9_475_594

#: (label, getter) of the measures tabled and drawn; each getter reads one store's figures
MEASURES = {
    "POLCA all-vector accuracy": lambda f: f["signal"]["polca"]["accuracy_all"],
    "exact-loss accuracy": lambda f: f["signal"]["polca"]["accuracy_loss"],
    "best vector AUC": lambda f: f["signal"]["polca"]["auc_best"],
    "POLCA neighbourhood purity": lambda f: f["purity"]["polca"]["purity"],
    "POLCA neighbourhood carry rate": lambda f: f["purity"]["polca"]["rate"],
    "POLCA purity above the rate": lambda f: f["purity"]["polca"]["purity"] - f["purity"]["polca"]["rate"],
    "exact-loss purity above the rate": lambda f: f["purity"]["loss"]["purity"] - f["purity"]["loss"]["rate"],
    "POLCA best carry homogeneity": lambda f: f["clusters"]["default"]["polca"].get("homogeneity"),
    "its chance level": lambda f: f["clusters"]["default"]["polca"].get("chance"),
    "first-order best carry homogeneity": lambda f: f["clusters"]["default"]["polca_first"].get("homogeneity"),
    "exact-loss best carry homogeneity": lambda f: f["clusters"]["default"]["loss"].get("homogeneity"),
}
#: measures drawn in the figure, each against its reference line (chance or majority)
DRAWN = (("POLCA neighbourhood purity", "POLCA neighbourhood carry rate"),
         ("POLCA best carry homogeneity", "its chance level"),
         ("POLCA all-vector accuracy", "exact-loss accuracy"))


def model_size(path: str) -> tuple[int, int | None]:
    """The decomposed parameter count of a store (its ``parameters`` attribute) and the model
    width (the second dimension of the token embedding ``net.tok.weight``, when there is one)."""
    from polca_lightning import open_store

    params = open_store(path, analysis=False).attrs["parameters"]
    if isinstance(params, str):
        params = json.loads(params)
    width = next((shape[1] for name, shape in params if name.endswith("tok.weight")), None)
    return int(sum(math.prod(shape) for _, shape in params)), width


def _value(getter, f) -> float:
    try:
        v = getter(f)
    except (KeyError, TypeError):
        return float("nan")
    return float("nan") if v is None else float(v)


def _cell(values: list[float]) -> str:
    v = np.array(values, dtype=float)
    ok = v[np.isfinite(v)]
    if not ok.size:
        return "-"
    text = f"{ok.mean():.2f} ± {ok.std(ddof=1):.2f}" if ok.size > 1 else f"{ok[0]:.2f}"
    return text + (f" ({ok.size} of {v.size})" if ok.size < v.size else "")


def by_width(figures: list[dict]) -> dict[int, list[dict]]:
    groups = defaultdict(list)
    for f in figures:
        groups[f["parameters"]].append(f)
    return dict(sorted(groups.items()))


def trend(figures: list[dict], measure: str) -> dict:
    """Least squares of ``measure`` on log10(parameters) over every seed, carried to the paper's size."""
    x = np.log10([f["parameters"] for f in figures])
    y = np.array([_value(MEASURES[measure], f) for f in figures])
    ok = np.isfinite(y)
    if ok.sum() < 3 or np.unique(x[ok]).size < 2:
        return {"slope": float("nan"), "at_paper": float("nan"), "residual_sd": float("nan"), "n": int(ok.sum())}
    slope, intercept = np.polyfit(x[ok], y[ok], 1)
    resid = y[ok] - (slope * x[ok] + intercept)
    return {"slope": float(slope), "at_paper": float(slope * math.log10(PAPER_PARAMETERS) + intercept),
            "residual_sd": float(resid.std(ddof=2)) if ok.sum() > 2 else float("nan"), "n": int(ok.sum())}


def table(figures: list[dict]) -> str:
    groups = by_width(figures)
    lines = ["| parameters | d_model | seeds | " + " | ".join(MEASURES) + " |",
             "|---|---|---|" + "---|" * len(MEASURES)]
    for n, fs in groups.items():
        d = sorted({f.get("d_model") for f in fs} - {None})
        lines.append(f"| {n:,} | {', '.join(map(str, d)) or '?'} | {len(fs)} | "
                     + " | ".join(_cell([_value(g, f) for f in fs]) for g in MEASURES.values()) + " |")
    lines += ["", f"Trend per decade of parameters (least squares over every seed) and where it puts the paper's "
                  f"{PAPER_PARAMETERS:,} parameters (± the residual sd):", "",
              "| measure | change per 10x parameters | at the paper's size |", "|---|---|---|"]
    for measure in MEASURES:
        t = trend(figures, measure)
        if not np.isfinite(t["slope"]):
            lines.append(f"| {measure} | - | - (a trend needs 3 measured runs at 2 widths or more; {t['n']} here) |")
            continue
        lines.append(f"| {measure} | {t['slope']:+.3f} | {t['at_paper']:.2f} ± {t['residual_sd']:.2f} |")
    return "\n".join(lines) + "\n"


def figure(figures: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DRAWN), figsize=(4.2 * len(DRAWN), 3.6), constrained_layout=True)
    params = np.array([f["parameters"] for f in figures], dtype=float)
    xs = np.logspace(np.log10(params.min()) - 0.05, np.log10(PAPER_PARAMETERS) + 0.05, 50)
    for ax, (measure, reference) in zip(axes, DRAWN):
        for name, style in ((measure, dict(color="C0", marker="o")), (reference, dict(color="0.5", marker="x"))):
            y = np.array([_value(MEASURES[name], f) for f in figures])
            ax.scatter(params, y, label=name, **style)
            t = trend(figures, name)
            if np.isfinite(t["slope"]):
                ax.plot(xs, t["slope"] * np.log10(xs) + (t["at_paper"] - t["slope"] * np.log10(PAPER_PARAMETERS)),
                        color=style["color"], linestyle=":", linewidth=1)
        ax.axvline(PAPER_PARAMETERS, color="k", linestyle="--", linewidth=0.8, label="the paper's model")
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.set_title(measure, fontsize=9)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Carry signal by model width (digits format, 10s/100s-place tokens; dotted: trend)", fontsize=10)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stores", nargs="+")
    p.add_argument("--out", help="the markdown table; the per-store figures go beside it as JSON (and are reused)")
    p.add_argument("--figure", help="PNG of the measures against the parameter count")
    args = p.parse_args(argv)

    def measure(path: str) -> dict:
        f = store_figures(path)
        f["parameters"], f["d_model"] = model_size(path)
        return f

    figures = measure_stores(args.stores, args.out, measure)
    text = table(figures)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    if args.figure:
        figure(figures, args.figure)
        print(f"figure written to {args.figure}")


if __name__ == "__main__":
    main()
