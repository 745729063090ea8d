"""Power and seed planning at a smallest effect of interest: how likely a study of n student seeds
is to support transfer if the effect is the one the user cares about.

Power is never computed at the pilot's observed effect (that is a function of
the p-value and says nothing a p-value does not; Hoenig & Heisey 2001).  The
effect is stated: every functional metric better than every control by its
SESOI (sizing.SESOI, ``--sesoi``).  A pilot sweep supplies only the noise: the
covariance of its per-seed paired differences over controls and metrics
(centred, so its own effect drops out).  Studies of n seeds are simulated as
normal differences with that covariance and the SESOI as mean, and each is
decided as the report decides: one-sided exact test per metric and control,
the chosen correction over each comparison's metrics, significant against
every control, at least ``min_metrics`` metrics (3, the paper's rule).

A pilot of n0 seeds estimates the noise only roughly, so every power is also
given with the noise scaled to the ends of the chi-square 95% interval of a
standard deviation on n0 - 1 degrees of freedom (sizing.sd_interval):
``power_low`` (noise at its upper limit) and ``power_high``.  Vectorised over
draws with a fixed seed, so the numbers are reproducible.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

from kdray.analysis import corrections, sizing
from kdray.analysis.sizing import exact_greater_p  # noqa: F401 - power.exact_greater_p stays importable
from kdray import conditions
from kdray.analysis.stats import (LEVEL, SUPPORT_MIN, TRANSFER_METRICS, condition_groups, direction, find_controls,
                                  paired)

TARGET = 0.8
SEED_RANGE = tuple(range(5, 31))
DRAWS = 1000                          # simulated studies per power estimate (Monte Carlo error <= 1.6%)
SEED = 0


def power_at(pilot: np.ndarray, n: int, shift, correction: str = corrections.DEFAULT, level: float = LEVEL,
             draws: int = DRAWS, seed: int = SEED, min_metrics: int = SUPPORT_MIN, scale: float = 1.0) -> float:
    """The probability that a study of n seeds supports transfer when every metric is better than every
    control by ``shift`` (one value per metric, or one for all; positive favours the treated condition).

    ``pilot`` (controls, metrics, seeds) is used only for its covariance over (control, metric), its
    mean removed; ``scale`` multiplies the noise's standard deviation."""
    c, m, n0 = pilot.shape
    cov = np.atleast_2d(np.cov(pilot.reshape(c * m, n0))) if n0 > 1 else np.zeros((c * m, c * m))
    return sizing.support_rate(cov, shift, n, c, m, correction, level, draws, seed, min_metrics, scale)


def pilot_differences(runs: pd.DataFrame, controls: dict, with_metrics: bool = False):
    """(controls, metrics, seeds) differences, oriented to favour the treated condition, on the seeds
    every control and metric share; metrics no control has are left out.  None without pairs.
    ``with_metrics``: (differences, the metrics' names)."""
    pairs = {(c, m): paired(runs, ref, m) for c, ref in controls.items() for m in TRANSFER_METRICS}
    metrics = [m for m in TRANSFER_METRICS if all(len(pairs[(c, m)].seeds) for c in controls)]
    if not metrics or not controls:
        return None
    seeds = pairs[(next(iter(controls)), metrics[0])].seeds
    for pr in pairs.values():
        if len(pr.seeds):
            seeds = np.intersect1d(seeds, pr.seeds)
    if seeds.size < 2:
        return None
    out = np.empty((len(controls), len(metrics), seeds.size))
    for i, c in enumerate(controls):
        for j, m in enumerate(metrics):
            pr = pairs[(c, m)]
            d = pr.d[np.searchsorted(pr.seeds, seeds)]
            out[i, j] = -d if direction(m) == "lower" else d
    return (out, metrics) if with_metrics else out


def power_curves(students: pd.DataFrame, correction: str = corrections.DEFAULT, level: float = LEVEL,
                 seeds=SEED_RANGE, draws: int = DRAWS, min_metrics: int = SUPPORT_MIN,
                 sesoi: Optional[dict] = None, groups: Optional[list] = None) -> pd.DataFrame:
    """Per (setup, teacher seed, treated condition): the power at the SESOI at each student-seed count in
    ``seeds`` and at the pilot's own count (``pilot`` True on that row), with the noise as estimated
    (``power``); at the pilot's count also with the noise at the ends of its 95% interval
    (``power_low``: noisier, ``power_high``), and on every row ``seeds_low``: the fewest of ``seeds``
    reaching TARGET with the noise at its upper limit.  Every n and noise level is decided on the
    same simulated studies (the first n seeds of each; sizing.support_curve), so a curve costs
    about three sorts, not one per n, and its points do not wobble against each other.  ``groups``:
    stats.condition_groups' split of students, when the caller has it."""
    sesoi = sizing.SESOI if sesoi is None else sesoi
    rows = []
    for setup, ts, conds in condition_groups(students) if groups is None else groups:
        for cond, runs in conds.items():
            controls = {ctrl: conds[ctrl] for rule in conditions.controls_of(cond.method)
                        for ctrl in find_controls(rule, cond, conds)}
            got = pilot_differences(runs, controls, with_metrics=True)
            if got is None:
                continue
            d, metrics = got
            shift = np.array([sesoi[m] for m in metrics])
            n0 = d.shape[-1]
            quiet, noisy = sizing.sd_interval(1.0, n0)

            ns = sorted(set(seeds) | {n0})
            c, m, _ = d.shape
            cov = np.atleast_2d(np.cov(d.reshape(c * m, n0))) if n0 > 1 else np.zeros((c * m, c * m))
            # every n and noise level decided on the same simulated studies (``top``: the same draws however
            # far a curve goes); the noisy curve first only up to the pilot's count, the rest only if it needs
            # more seeds than that to reach TARGET
            top = ns[-1]
            got = sizing.support_curves(cov, shift, {1.0: ns, noisy: [n for n in ns if n <= n0], quiet: [n0]}, c, m,
                                        correction, level, draws, min_metrics=min_metrics, top=top)
            est, low_curve, high = got[1.0], got[noisy], got[quiet]
            low = next((float(n) for n in sorted(seeds) if n <= n0 and low_curve[n] >= TARGET), None)
            if low is None:
                low_curve = sizing.support_curves(cov, shift, {noisy: ns}, c, m, correction, level, draws,
                                                  min_metrics=min_metrics, top=top)[noisy]
                low = next((float(n) for n in sorted(seeds) if low_curve[n] >= TARGET), math.nan)
            for n in ns:
                rows.append(dict(setup=setup, teacher_seed=ts, condition=cond, n_seeds=n, pilot=n == n0,
                                 pilot_seeds=n0, power=est[n], power_low=low_curve[n] if n == n0 else math.nan,
                                 power_high=high[n] if n == n0 else math.nan, seeds_low=low))
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


CURVE_COLUMNS = ["setup", "teacher_seed", "condition", "n_seeds", "pilot", "pilot_seeds", "power", "power_low",
                 "power_high", "seeds_low"]


def seeds_for(curve: pd.DataFrame, target: float = TARGET, column: str = "power") -> float:
    """The fewest seeds of a curve (one decision's rows) whose power reaches target; nan if none does."""
    ok = curve[curve[column] >= target]
    return float(ok["n_seeds"].min()) if len(ok) else math.nan


def decision_curves(curves: pd.DataFrame) -> list[tuple]:
    """(setup, teacher seed, condition, {column: its values}, pilot row) per decision's curve, in order of
    first appearance (a groupby's order, sort=False), read in one pass as lists: a 42,000-run report has
    thousands of curves, and a pandas group per curve cost more than everything done with it."""
    cols = {c: curves[c].tolist() for c in CURVE_COLUMNS}
    index: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(cols["setup"], cols["teacher_seed"], map(repr, cols["condition"]))):
        if not (pd.isna(key[0]) or pd.isna(key[1])):                  # groupby drops missing keys
            index.setdefault(key, []).append(i)
    out = []
    for (setup, ts, _), ix in index.items():
        curve = {c: [v[i] for i in ix] for c, v in cols.items()}
        out.append((setup, ts, curve["condition"][0], curve, curve["pilot"].index(True)))
    return out


def seeds_reaching(ns: list, powers: list, target: float = TARGET) -> float:
    """seeds_for on a curve's lists."""
    ok = [n for n, p in zip(ns, powers) if p >= target]
    return float(min(ok)) if ok else math.nan


def per_decision(curves: pd.DataFrame) -> dict[tuple, tuple[float, float, float, float, float]]:
    """(setup, teacher seed, condition) -> (power at the pilot's seed count, its low and high ends, seeds
    needed for TARGET, seeds needed with the noise at its upper limit)."""
    out = {}
    for setup, ts, cond, c, i in decision_curves(curves):
        out[(setup, ts, cond)] = (float(c["power"][i]), float(c["power_low"][i]), float(c["power_high"][i]),
                                  seeds_reaching(c["n_seeds"], c["power"]), float(c["seeds_low"][0]))
    return out


def needs_text(a) -> list[str]:
    """Per setup, one line: the student seeds each treated condition needs on its hardest teacher seed,
    at the SESOI, with the noise as estimated (and at its upper 95% limit)."""
    lines = []
    for setup, d in a.decisions.groupby("setup", sort=True):
        parts = []
        for cond in sorted(set(d["condition"]), key=lambda c: c.sort_key):
            rows = d[[c == cond for c in d["condition"]]]
            parts.append(f"{cond.label} {_most(rows['seeds_for_power'])} ({_most(rows['seeds_for_power_low'])})")
        lines.append(f"{setup}: student seeds for {TARGET:.0%} power at the SESOI on every teacher seed "
                     f"(noise at its upper 95% limit): {', '.join(parts)}")
    return lines


def _most(n: pd.Series) -> str:
    return f"more than {max(SEED_RANGE)}" if n.isna().any() or not len(n) else str(int(n.max()))
