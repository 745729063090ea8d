"""The analysis pipeline: a sweep's runs -> tests -> decisions -> power and pooled statements, one
``Analysis`` (docs/protocol.md §5).

kdray/analysis is a one-way pipeline of pure modules; this module is where its steps are put
together, so no lower module imports a higher one:

    runs -> stats (tests, decisions; effects, corrections, sizing below it) -> power, pooled
         -> pipeline (this) -> tables, figures -> report, planning
"""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Optional

import pandas as pd

from kdray import plugins
from kdray.analysis import corrections, pooled, power, sizing
from kdray.analysis.stats import (DECISION_CORRECTIONS, LEVEL, SUPPORT_MIN, Analysis, _notes, against_controls,
                                  best_accuracy, condition_groups, correct_decisions, decisions, paired_tests, prepare,
                                  summarize)


def analyse(df: pd.DataFrame, threshold: float = 0.01, exclude_below: Optional[float] = None,
            correction: str = corrections.DEFAULT, power_draws: Optional[int] = None,
            level: float = LEVEL, map_=map, min_metrics: int = SUPPORT_MIN,
            sesoi: Optional[dict] = None, decision_correction: str = "none", each=None) -> Analysis:
    """Run the statistics of docs/protocol.md §5 on a sweep's runs.

    Every test, decision and summary is within one setup, so each setup is
    analysed on its own and the parts are concatenated in setup order.
    ``map_`` may be a process pool's ``map`` (kdray report's workers).
    ``correction`` is the multiple-comparison correction (corrections.py);
    ``power_draws`` the simulated studies per power estimate (power.py; 0: none); ``sesoi`` the
    smallest effect of interest per metric (sizing.SESOI, the default, with any replaced);
    ``decision_correction`` a correction over each setup's decisions (correct_decisions).
    ``each``: a picklable function of one setup's analysis, called where that setup was analysed
    (a worker), its results kept in ``Analysis.each`` in setup order (the report's per-setup tables).
    """
    if decision_correction not in DECISION_CORRECTIONS:
        raise ValueError(f"unknown decision correction {decision_correction!r}; valid: {', '.join(DECISION_CORRECTIONS)}")
    sesoi = dict(sizing.SESOI) | dict(sesoi or {})
    mods = tuple(df.attrs.get("plugins", ()))   # the sweep's plug-ins, imported by each worker (report.load_target)
    bare = df.copy(deep=False)
    bare.attrs = {}                              # else pandas deep-copies them into every frame a part makes
    setup = bare["setup"]
    groups = [bare[setup == s] for s in sorted(setup.dropna().unique())] + ([bare[setup.isna()]] if setup.isna().any() else [])
    job = (threshold, exclude_below, level, correction, power_draws, min_metrics, mods, sesoi, decision_correction, each)
    done = list(map_(_analyse_part, [(g, *job) for g in groups])) or [_analyse_part((bare, *job))]
    parts = [p for p, _ in done]
    frames = {f.name: _concat([getattr(p, f.name) for p in parts]) for f in fields(Analysis)
              if isinstance(getattr(parts[0], f.name), pd.DataFrame) and f.name != "runs"}
    return Analysis(runs=df, **frames, threshold=threshold, exclude_below=exclude_below, level=level,
                    notes=_notes(frames["tests"], level, correction), correction=correction, min_metrics=min_metrics,
                    plugins=mods, sesoi=sesoi, decision_correction=decision_correction,
                    each=[x for _, x in done] if each is not None else [])


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    full = [f for f in frames if len(f)]
    return pd.concat(full, ignore_index=True) if full else frames[0].reset_index(drop=True)




POWER_COLUMNS = ["power", "power_low", "power_high", "seeds_for_power", "seeds_for_power_low"]


def _with_power(dec: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """Decisions plus the power at the SESOI at their own seed count (with its range over the noise's
    95% interval) and the seeds needed for power.TARGET (also with the noise at its upper limit).
    No "under-powered" label: that would be power at the observed effect, a function of the p."""
    got = power.per_decision(curves) if len(curves) else {}
    pw = [got.get((r.setup, r.teacher_seed, r.condition), (math.nan,) * 5) for r in dec.itertuples()]
    dec = dec.copy()
    for i, col in enumerate(POWER_COLUMNS):
        dec[col] = [v[i] for v in pw]
    return dec


def _analyse_part(job: tuple) -> tuple[Analysis, object]:
    """One setup's runs (or the runs without a setup) -> its analysis (and ``each`` of it)."""
    df, threshold, exclude_below, level, correction, draws, min_metrics, mods, sesoi, family, each = job
    plugins.load(mods)
    students, teachers, excluded = prepare(df)
    groups = condition_groups(students)          # split once, walked by every step
    tests = paired_tests(students, level, correction, sesoi, groups=groups)
    against = against_controls(tests)
    curves = power.power_curves(students, correction, level, draws=power.DRAWS if draws is None else draws,
                                min_metrics=min_metrics, sesoi=sesoi, groups=groups) if draws != 0 else \
        power.power_curves(students.iloc[0:0])
    dec = decisions(students, against, threshold, exclude_below, min_metrics, level, sesoi, tests, groups=groups)
    dec = _with_power(correct_decisions(dec, family, level), curves)
    a = Analysis(df, students, teachers, excluded, summarize(students, groups), tests, against, dec,
                 best_accuracy(students, groups), threshold, exclude_below, level, min_metrics=min_metrics,
                 correction=correction, power=curves, plugins=mods, sesoi=sesoi)
    a.pooled, a.statements = pooled.pooled_tests(a, groups), pooled.statements(a, groups)
    extra = each(a) if each is not None else None
    a.runs = df.iloc[0:0]                        # analyse keeps the runs: not pickled back from a worker
    return a, extra
