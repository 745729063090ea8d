"""Power and seed planning: how likely a study of n student seeds is to support transfer.

From a pilot sweep's per-seed paired differences of one treated condition
(against each of its controls, on the four functional metrics), studies of n
seeds are simulated by a smoothed bootstrap: n of the pilot's seeds drawn
with replacement (all metrics and controls of a seed together, so their
correlation is kept), plus Gaussian kernel noise of Silverman's bandwidth
per metric and control (so simulated differences are continuous and the
exact no-ties signed-rank null applies, as in ``stats._exact_signed_rank``).
Each simulated study is then decided as the report decides: one-sided exact
test per metric and control, the chosen correction over each comparison's
metrics, significant against every control, at least ``min_metrics`` metrics (3, the paper's rule).
The power is the fraction of simulated studies that support transfer.

This is a planning estimate from the pilot's own effect (it treats the
observed effect as the true one), vectorised over draws with a fixed seed,
so it is reproducible.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import pandas as pd

from kdray.analysis import corrections
from kdray.analysis.sizing import exact_greater_p  # noqa: F401 - power.exact_greater_p stays importable
from kdray import conditions
from kdray.analysis.stats import (LEVEL, SUPPORT_MIN, TRANSFER_METRICS, by_condition, direction, find_controls,
                                  paired)

TARGET = 0.8
SEED_RANGE = tuple(range(5, 31))
DRAWS = 1000                          # simulated studies per power estimate (Monte Carlo error <= 1.6%)
SEED = 0


def bandwidth(d: np.ndarray) -> np.ndarray:
    """Silverman's rule along the last axis: 0.9 min(sd, IQR/1.34) n^-1/5 (sd alone where the IQR is 0)."""
    n = d.shape[-1]
    sd = np.std(d, axis=-1, ddof=1) if n > 1 else np.zeros(d.shape[:-1])
    q75, q25 = np.percentile(d, [75, 25], axis=-1)
    iqr = (q75 - q25) / 1.34
    spread = np.where(iqr > 0, np.minimum(sd, iqr), sd)
    return 0.9 * spread * n ** -0.2


def power_at(pilot: np.ndarray, n: int, correction: str = corrections.DEFAULT, level: float = LEVEL,
             draws: int = DRAWS, seed: int = SEED, min_metrics: int = SUPPORT_MIN) -> float:
    """The probability that a study of n seeds supports transfer, pilot shaped (controls, metrics, seeds)
    with differences oriented so that positive favours the treated condition."""
    rng = np.random.default_rng([seed, n])
    c, m, n0 = pilot.shape
    idx = rng.integers(0, n0, (draws, n))
    x = pilot[:, :, idx] + rng.standard_normal((c, m, draws, n)) * bandwidth(pilot)[:, :, None, None]
    p = np.moveaxis(exact_greater_p(x), 1, -1)                 # (controls, draws, metrics)
    sig = (corrections.adjust(p, correction) <= level).all(axis=0)
    return float(np.mean(sig.sum(axis=-1) >= min_metrics))


def pilot_differences(runs: pd.DataFrame, controls: dict) -> Optional[np.ndarray]:
    """(controls, metrics, seeds) differences, oriented to favour the treated condition, on the seeds
    every control and metric share; metrics no control has are left out.  None without pairs."""
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
    return out


def power_curves(students: pd.DataFrame, correction: str = corrections.DEFAULT, level: float = LEVEL,
                 seeds=SEED_RANGE, draws: int = DRAWS, min_metrics: int = SUPPORT_MIN) -> pd.DataFrame:
    """Per (setup, teacher seed, treated condition): the power at each student-seed count in ``seeds``
    and at the pilot's own count (``pilot`` True on that row)."""
    rows = []
    for (setup, ts), grp in students.groupby(["setup", "teacher_seed"], sort=True):
        conds = by_condition(grp)
        for cond, runs in conds.items():
            controls = {ctrl: conds[ctrl] for rule in conditions.controls_of(cond.method)
                        for ctrl in find_controls(rule, cond, conds)}
            d = pilot_differences(runs, controls)
            if d is None:
                continue
            n0 = d.shape[-1]
            for n in sorted(set(seeds) | {n0}):
                rows.append(dict(setup=setup, teacher_seed=int(ts), condition=cond, n_seeds=n, pilot=n == n0,
                                 pilot_seeds=n0, power=power_at(d, n, correction, level, draws,
                                                                min_metrics=min_metrics)))
    return pd.DataFrame(rows, columns=["setup", "teacher_seed", "condition", "n_seeds", "pilot", "pilot_seeds", "power"])


def seeds_for(curve: pd.DataFrame, target: float = TARGET) -> float:
    """The fewest seeds of a curve (one decision's rows) whose power reaches target; nan if none does."""
    ok = curve[curve["power"] >= target]
    return float(ok["n_seeds"].min()) if len(ok) else math.nan


def per_decision(curves: pd.DataFrame) -> dict[tuple, tuple[float, float]]:
    """(setup, teacher seed, condition) -> (power at the pilot's seed count, seeds needed for TARGET)."""
    out = {}
    for key, g in curves.groupby(["setup", "teacher_seed", curves["condition"].map(repr)], sort=False):
        cond = g["condition"].iloc[0]
        out[(key[0], key[1], cond)] = (float(g.loc[g["pilot"], "power"].iloc[0]), seeds_for(g))
    return out


def needs_text(a) -> list[str]:
    """Per setup, one line: the student seeds each treated condition needs on its hardest teacher seed."""
    lines = []
    for setup, d in a.decisions.groupby("setup", sort=True):
        parts = []
        for cond in sorted(set(d["condition"]), key=lambda c: c.sort_key):
            n = d.loc[[c == cond for c in d["condition"]], "seeds_for_power"]
            parts.append(f"{cond.label} {'more than ' + str(max(SEED_RANGE)) if n.isna().any() else int(n.max())}")
        lines.append(f"{setup}: student seeds for {TARGET:.0%} power on every teacher seed: {', '.join(parts)}")
    return lines


def run_power(target: str, tracking_uri: Optional[str], correction: str = corrections.DEFAULT,
              draws: int = 2 * DRAWS, level: float = LEVEL) -> int:
    """What ``kdray power`` does: the power table and the seeds each condition needs; exit code 2 on a user error."""
    import sys

    from kdray.analysis.report import load_target
    from kdray.analysis.runs import ReportError
    from kdray.analysis.stats import analyse
    from kdray.analysis.tables import power_table

    try:
        df, _, name, _, _ = load_target(target, tracking_uri)
    except ReportError as e:
        print(f"kdray: error: {e}", file=sys.stderr)
        return 2
    a = analyse(df, level=level, correction=correction, power_draws=draws)
    print(f"kdray power: {name}: {len(a.students)} student runs as the pilot, {draws} simulated studies per "
          f"estimate; {corrections.family_text(correction)}; level {level:g}")
    print(power_table(a).markdown())
    print("\n".join(needs_text(a)))
    return 0
