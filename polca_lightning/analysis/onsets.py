"""Breakthrough onsets (paper Eq. 9), the plateau step τ, and hidden flags (Eq. 10).

Conventions (the paper's text leaves them open; these are ours):

- **Acceleration.** ``a(t) = [f(t+Δ) - f(t)] - [f(t) - f(t-Δ)]`` with Δ in optimizer
  *steps*. ``f`` is evaluated at ``step ± Δ`` by linear interpolation along the step
  coordinate, so snapshots need not be evenly spaced; ``a`` is defined only at snapshots
  with ``step - Δ >= step[0]`` and ``step + Δ <= step[-1]``.
- **Onset of a drop = most NEGATIVE a(t).** The paper writes ``argmax`` ("maximum point
  of acceleration"), but its curves are losses: a drop starts where a falling curve bends
  *downward*, which is the most negative second difference. On a sigmoid drop
  ``f = -A σ((t - c)/w)`` this lands at ``c - 1.32 w`` (where ``σ'''`` vanishes), the
  start of the drop, not its middle; on a hinge (flat, then linear descent from ``t0``)
  exactly at ``t0``. Curves that only rise (cumulated Fisher) use ``direction="rising"``:
  most positive ``a(t)``, where the rise starts.
- **Δ by default: the paper's.** App. G used Δ = 100 on a 10,000-step run: 1 % of it.
  With ``span = step[-1] - step[0]``, ``default_delta`` is ``max(0.01 × span, largest
  snapshot spacing)``. Δ is never shorter than one snapshot interval: ``a(t)`` needs
  ``f`` at ``t ± Δ``, and below the spacing that would be interpolation between two
  snapshots, not data.
- **τ by default: where the mean loss flattens** (``plateau_step``,
  ``analyze(tau="plateau")``, the default): the mean exact loss is smoothed by a centred
  moving average over ``smooth`` snapshots; the total decrease is ``D = smoothed[0] -
  min(smoothed)``; τ is the first snapshot step after which the remaining decrease
  ``smoothed(t) - min_{u >= t} smoothed(u)`` stays at or below ``fraction * D`` (default
  5 %) for every later snapshot. A hidden breakthrough is learning the mean loss does
  not show, i.e. after it has flattened; the paper fixed that step by hand (τ = 1000 of
  10,000 steps, where its loss was flat), this rule finds it wherever it is in the run.
  ``default_tau`` (``tau="paper"``) is the paper's proportion, ``step[0] + 0.10 × span``,
  which on a shorter or slower run can fall in the middle of the main drop.
- **Hidden breakthrough** (Eq. 10): onset ``> τ`` (strictly).
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = [
    "default_delta",
    "default_tau",
    "acceleration",
    "breakthrough_onset",
    "smooth_curve",
    "plateau_step",
    "hidden_breakthrough",
    "resolve_tau",
    "resolve_delta",
    "rule_name",
    "tau_rule_label",
    "TAU_RULES",
    "DELTA_RULES",
]


def _check_steps(step: np.ndarray, n: int) -> np.ndarray:
    step = np.asarray(step, dtype=np.float64)
    if step.ndim != 1 or step.shape[0] != n:
        raise ValueError(f"step must be 1-d with one entry per snapshot ({n}), got shape {step.shape}")
    if not np.all(np.isfinite(step)):
        raise ValueError("step contains non-finite values; trim unfinished snapshots first")
    if n > 1 and not np.all(np.diff(step) > 0):
        raise ValueError("step must be strictly increasing")
    return step


def _span(step: np.ndarray, what: str) -> tuple[np.ndarray, float]:
    step = np.asarray(step, dtype=np.float64)
    if step.ndim != 1 or step.size < 2:
        raise ValueError(f"need at least two snapshot steps to define {what}, got shape {step.shape}")
    return step, float(step[-1] - step[0])


def default_delta(step: np.ndarray, fraction: float = 0.01) -> float:
    """Default Δ: ``fraction`` of the step span (1 %, the paper's), at least the largest
    snapshot spacing (a shorter Δ would read ``f`` between snapshots).

    The paper used Δ = 100 on 10,000 steps with snapshots every 5-20 steps: 5-20
    snapshots. ``fraction=0.02`` is the rule of earlier versions (``analyze(delta="wide")``),
    which averages interval noise over twice as many snapshots.

    Example:
        >>> default_delta(np.arange(0, 10001.0, 20)), default_delta(np.arange(0, 1001.0, 25))
        (100.0, 25.0)
    """
    step, span = _span(step, "Δ")
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    return float(max(fraction * span, np.max(np.diff(step))))


def default_tau(step: np.ndarray, fraction: float = 0.10) -> float:
    """Default τ: ``step[0] + fraction × (step[-1] - step[0])`` (10 %, the paper's τ = 1000
    of 10,000 steps).

    Example:
        >>> default_tau(np.arange(0, 10001.0, 20)), default_tau(np.arange(100, 1101.0, 50))
        (1000.0, 200.0)
    """
    step, span = _span(step, "τ")
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return float(step[0] + fraction * span)


def _interp_weights(step: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices ``lo`` and weights ``w`` with ``f(target) ≈ (1-w) f[lo] + w f[lo+1]``."""
    lo = np.clip(np.searchsorted(step, target, side="right") - 1, 0, step.size - 2)
    w = (target - step[lo]) / (step[lo + 1] - step[lo])
    return lo, np.clip(w, 0.0, 1.0)


def acceleration(
    f: np.ndarray, step: np.ndarray, delta: float | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Second difference ``a(t)`` of Eq. 9 at every snapshot where it is defined.

    Args:
        f: ``[snapshot, ...]`` curves (time first).
        step: ``[snapshot]`` optimizer step of each snapshot, strictly increasing.
        delta: Δ in steps (default ``default_delta(step)``).

    Returns:
        ``(a [valid, ...], valid_steps [valid])``.

    Raises:
        ValueError: Δ not positive, or no snapshot has both ``step ± Δ`` inside the run.
    """
    f = np.asarray(f, dtype=np.float64)
    step = _check_steps(step, f.shape[0])
    if delta is None:
        delta = default_delta(step)
    if not delta > 0:
        raise ValueError(f"delta must be a positive number of steps, got {delta}")
    tol = 1e-9 * max(1.0, abs(step[-1]))
    valid = (step - delta >= step[0] - tol) & (step + delta <= step[-1] + tol)
    if not valid.any():
        raise ValueError(
            f"delta={delta} steps is too long for a run spanning {step[-1] - step[0]} steps: "
            "no snapshot has both step-delta and step+delta inside it"
        )
    i0, i1 = np.flatnonzero(valid)[[0, -1]]  # valid snapshots form one run (steps increase)
    t = step[i0 : i1 + 1]
    fc = f[i0 : i1 + 1]  # f(t), exact at snapshots (a view)
    a = np.add(_interp_rows(f, step, t + delta), _interp_rows(f, step, t - delta))
    a -= fc  # a = f(t+Δ) + f(t-Δ) - 2 f(t), in place to spare temporaries
    a -= fc
    return a, t


def _interp_rows(f: np.ndarray, step: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rows of ``f`` linearly interpolated at steps ``target``; slices when they hit
    a contiguous run of snapshots exactly (the usual case: even steps, Δ a multiple of
    the spacing), gathers otherwise."""
    lo, w = _interp_weights(step, target)
    if np.all((w < 1e-9) | (w > 1 - 1e-9)):  # every target is a snapshot
        idx = lo + (w > 0.5)
        if np.all(np.diff(idx) == 1):
            return f[idx[0] : idx[-1] + 1]  # a view: no copy
        return f[idx]
    w = w.reshape((-1,) + (1,) * (f.ndim - 1))  # broadcast over trailing dims
    return (1 - w) * f[lo] + w * f[lo + 1]


def breakthrough_onset(
    f: np.ndarray,
    step: np.ndarray,
    delta: float | None = None,
    *,
    direction: str = "falling",
) -> np.ndarray:
    """Onset step of the strongest breakthrough of each curve (Eq. 9).

    Args:
        f: ``[snapshot, ...]`` curves, time first.
        step: ``[snapshot]`` steps.
        delta: Δ in steps (default ``default_delta``).
        direction: ``"falling"`` (losses, projected losses: most negative ``a``) or
            ``"rising"`` (curves that grow, e.g. cumulated Fisher: most positive ``a``).

    Returns:
        ``[...]`` float64 onset steps; NaN for curves with a NaN in the valid window, and
        for curves that never bend the way of a breakthrough there (``a(t) >= 0``
        everywhere for ``"falling"``, ``<= 0`` for ``"rising"``): a curve that only
        decelerates, e.g. a drop already under way at the first valid snapshot, has no
        onset inside the window, and the edge of the window would be an arbitrary one.

    Example:
        >>> s = np.arange(0, 101.0)
        >>> f = -np.clip(s - 40, 0, 20)          # flat, then a linear drop from step 40
        >>> float(breakthrough_onset(f, s, delta=5))
        40.0
    """
    if direction not in ("falling", "rising"):
        raise ValueError(f"direction must be 'falling' or 'rising', got {direction!r}")
    a, t = acceleration(f, step, delta)
    # argmin of a (falling) or of -a (rising); NaN curves -> NaN onset
    idx = np.argmax(a, axis=0) if direction == "rising" else np.argmin(a, axis=0)
    onset = t[idx].astype(np.float64)
    extreme = np.take_along_axis(a, idx[None], axis=0)[0] if a.ndim > 1 else a[idx]
    bad = np.isnan(a.sum(axis=0)) | (extreme <= 0 if direction == "rising" else extreme >= 0)
    return np.where(bad, np.nan, onset)


def smooth_curve(f: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average over ``window`` snapshots (edges average what exists)."""
    f = np.asarray(f, dtype=np.float64)
    if window <= 1:
        return f.copy()
    half = window // 2
    c = np.concatenate([[0.0], np.cumsum(f)])
    idx = np.arange(f.size)
    lo = np.clip(idx - half, 0, f.size)
    hi = np.clip(idx + half + 1, 0, f.size)
    return (c[hi] - c[lo]) / (hi - lo)


def plateau_step(
    mean_loss: np.ndarray,
    step: np.ndarray,
    *,
    fraction: float = 0.05,
    smooth: int | None = None,
) -> float:
    """τ: the step after which the mean exact loss is flat (rule in the module docstring).

    Args:
        mean_loss: ``[snapshot]`` mean exact loss over tokens.
        step: ``[snapshot]`` steps.
        fraction: remaining decrease allowed after τ, as a fraction of the total (0.05).
        smooth: moving-average window in snapshots (default: 2 % of the snapshots, at
            least 1, made odd).

    Returns:
        τ in steps. ``step[0]`` if the loss never decreases.

    Example:
        >>> s = np.arange(0, 1000.0, 10)
        >>> tau = plateau_step(np.exp(-s / 100), s, smooth=1)
        >>> 290 <= tau <= 310      # exp(-t/100) has 5 % left at t = 100 ln 20 ≈ 300
        True
    """
    mean_loss = np.asarray(mean_loss, dtype=np.float64)
    step = _check_steps(step, mean_loss.shape[0])
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    if not np.all(np.isfinite(mean_loss)):
        raise ValueError("mean_loss contains non-finite values")
    if smooth is None:
        smooth = max(1, int(round(0.02 * mean_loss.size)))
        smooth += 1 - smooth % 2
    sm = smooth_curve(mean_loss, smooth)
    future_min = np.minimum.accumulate(sm[::-1])[::-1]  # min_{u >= t} sm(u)
    remaining = sm - future_min
    total = sm[0] - future_min[0]
    if total <= 0:
        warnings.warn("mean loss never decreases; tau set to the first step", stacklevel=2)
        return float(step[0])
    above = remaining > fraction * total
    if not above.any():
        return float(step[0])
    last_above = np.flatnonzero(above)[-1]
    return float(step[min(last_above + 1, step.size - 1)])


#: named rules for τ and Δ in ``analyze`` (numbers are steps); the first is the default
TAU_RULES = ("plateau", "paper")
DELTA_RULES = ("paper", "wide")


def _rule_or_steps(value, rules: tuple[str, ...], name: str):
    """``value`` as one of ``rules`` (None: the first) or as a finite number of steps."""
    if value is None:
        return rules[0]
    if isinstance(value, str):
        if value not in rules:
            raise ValueError(f"{name} must be a number of steps or one of {list(rules)}, got {value!r}")
        return value
    try:
        steps = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number of steps or one of {list(rules)}, got {value!r}") from None
    if not np.isfinite(steps):
        raise ValueError(f"{name} must be a finite number of steps, got {value!r}")
    return steps


def resolve_delta(delta, step: np.ndarray) -> tuple[float, str]:
    """Δ in steps from ``analyze``'s ``delta`` (a rule of ``DELTA_RULES``, None, or steps),
    and a description of the rule that gave it (``analysis_delta_rule``).

    ``"paper"`` (None): ``default_delta(step, 0.01)``; ``"wide"``: ``default_delta(step,
    0.02)``; a number: itself, with a warning when it is shorter than the largest
    snapshot spacing.

    Example:
        >>> resolve_delta("paper", np.arange(0, 10001.0, 20))
        (100.0, 'paper: max(1% of the run = 100, largest snapshot spacing = 20) = 100')
    """
    delta = _rule_or_steps(delta, DELTA_RULES, "delta")
    step = np.asarray(step, dtype=np.float64)
    spacing = float(np.max(np.diff(step)))
    if isinstance(delta, float):
        if not delta > 0:
            raise ValueError(f"delta must be a positive number of steps, got {delta:g}")
        if delta < spacing:
            warnings.warn(f"delta={delta:g} steps is shorter than the largest snapshot spacing ({spacing:g}): "
                          "a(t) reads the curves between snapshots (linear interpolation)", stacklevel=3)
        return delta, "given"
    fraction = 0.01 if delta == "paper" else 0.02
    value = default_delta(step, fraction)
    return value, (f"{delta}: max({fraction:.0%} of the run = {fraction * (step[-1] - step[0]):g}, "
                   f"largest snapshot spacing = {spacing:g}) = {value:g}")


def resolve_tau(tau, step: np.ndarray, mean_loss: np.ndarray, *, fraction: float = 0.05,
                smooth: int | None = None) -> tuple[float, str]:
    """τ in steps from ``analyze``'s ``tau`` (a rule of ``TAU_RULES``, None, or a step),
    and a description of the rule that gave it (``analysis_tau_rule``).

    ``"plateau"`` (None): ``plateau_step(mean_loss, step, fraction=fraction,
    smooth=smooth)``; ``"paper"``: ``default_tau(step)``; a number: itself.

    Example:
        >>> s = np.arange(0, 1000.0, 10)
        >>> resolve_tau(None, s, np.exp(-s / 100))[0] == plateau_step(np.exp(-s / 100), s)
        True
        >>> resolve_tau("paper", s, np.exp(-s / 100))
        (99.0, 'paper: step[0] + 10% of the run')
    """
    tau = _rule_or_steps(tau, TAU_RULES, "tau")
    if isinstance(tau, float):
        return tau, "given"
    if tau == "plateau":
        return (plateau_step(mean_loss, step, fraction=fraction, smooth=smooth),
                f"plateau: plateau_step(fraction={fraction}, smooth={smooth})")
    return default_tau(step, 0.10), "paper: step[0] + 10% of the run"


def rule_name(rule) -> str:
    """The name of a recorded rule (``analysis_tau_rule``, ``analysis_delta_rule``: what
    :func:`resolve_tau` and :func:`resolve_delta` returned): one of :data:`TAU_RULES` or
    :data:`DELTA_RULES`, ``"given"`` for a step given by hand, else the text before its
    ``:`` (``""`` for no rule). The earliest plateau rule, ``"plateau_step(...)"``, is
    ``"plateau"``.

    Example:
        >>> rule_name("plateau: plateau_step(fraction=0.05, smooth=None)"), rule_name("plateau_step(fraction=0.1)")
        ('plateau', 'plateau')
    """
    head = str(rule or "").split(":", 1)[0].split("(", 1)[0].strip()
    for name in TAU_RULES + DELTA_RULES:
        if head == name or head.startswith(name + "_"):
            return name
    return head


def tau_rule_label(rule: str) -> str:
    """A few words for ``analysis_tau_rule`` (what :func:`resolve_tau` returned), as figure
    legends show it: ``"plateau: mean loss flat"``, ``"paper: 10% of the run"``, ``"given"``.

    Example:
        >>> tau_rule_label("plateau: plateau_step(fraction=0.05, smooth=None)")
        'plateau: mean loss flat'
    """
    name = rule_name(rule)
    return {"plateau": "plateau: mean loss flat", "paper": "paper: 10% of the run"}.get(name, name or "rule not recorded")


def hidden_breakthrough(onset: np.ndarray, tau: float) -> np.ndarray:
    """Eq. 10: True where ``onset > tau`` (NaN onsets are not hidden)."""
    onset = np.asarray(onset, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return np.isfinite(onset) & (onset > tau)
