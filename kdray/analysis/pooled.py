"""One statement per setup and treated condition, pooled over teacher seeds.

The per-teacher-seed decisions answer "did this teacher's knowledge
transfer"; a reader also wants one number with its uncertainty.  Here every
comparison's paired differences are pooled over teacher seeds: the estimate
is the mean over teacher seeds of each seed's mean difference (teacher seeds
weigh equally), its 95% CI a Welch t interval for the teacher seeds drawn
(effects.pooled_interval), and with 3 teacher seeds or more a random-effects
interval "for teachers like these" (effects.random_effects_interval).
"""
from __future__ import annotations

from typing import Optional

import pandas as pd

from kdray.analysis.effects import pooled_interval, random_effects_interval
from kdray.analysis.stats import Analysis, condition_groups, paired

RE_COLUMNS = ["re_low", "re_high"]   # random-effects interval, teachers like these (nan below 3 teacher seeds)
COLUMNS = ["setup", "condition", "control", "metric", "teacher_seeds", "n", "estimate", "ci_low", "ci_high",
           *RE_COLUMNS]
STATEMENT_COLUMNS = ["setup", "condition", "teacher_seeds", "supported_seeds", "pa_gain", "ci_low", "ci_high",
                     *RE_COLUMNS]


def _groups(a: Analysis, groups: Optional[list] = None) -> dict[str, dict]:
    """setup -> teacher seed -> {condition: runs} (from stats.condition_groups' split, when given)."""
    out: dict[str, dict] = {}
    for setup, ts, conds in condition_groups(a.students) if groups is None else groups:
        out.setdefault(setup, {})[ts] = conds
    return out


def pooled_tests(a: Analysis, groups: Optional[list] = None) -> pd.DataFrame:
    """Per (setup, condition, control, metric) of the paired tests: the difference pooled over teacher seeds."""
    conds = _groups(a, groups)
    keys = dict.fromkeys((r.setup, r.condition, r.control, r.metric) for r in a.tests.itertuples())
    rows = []
    for setup, cond, ctrl, metric in keys:
        per_seed = [paired(c[cond], c[ctrl], metric).d for c in conds[setup].values() if cond in c and ctrl in c]
        est, lo, hi = pooled_interval(per_seed)
        _, re_lo, re_hi = random_effects_interval(per_seed)
        rows.append(dict(setup=setup, condition=cond, control=ctrl, metric=metric,
                         teacher_seeds=sum(len(d) >= 2 for d in per_seed), n=sum(len(d) for d in per_seed),
                         estimate=est, ci_low=lo, ci_high=hi, re_low=re_lo, re_high=re_hi))
    return pd.DataFrame(rows, columns=COLUMNS)


def statements(a: Analysis, groups: Optional[list] = None) -> pd.DataFrame:
    """Per (setup, treated condition): on how many teacher seeds transfer is supported, and the
    prediction-agreement gain over each seed's best control pooled over teacher seeds, with its CI."""
    conds = _groups(a, groups)
    rows = []
    for (setup, cond), d in a.decisions.groupby(["setup", a.decisions["condition"].map(repr)], sort=False):
        cond = d["condition"].iloc[0]
        gains = [paired(conds[setup][r.teacher_seed][cond], conds[setup][r.teacher_seed][r.best_control],
                        "prediction_agreement").d for r in d.itertuples() if r.best_control is not None]
        est, lo, hi = pooled_interval(gains)
        _, re_lo, re_hi = random_effects_interval(gains)
        rows.append(dict(setup=setup, condition=cond, teacher_seeds=len(d), supported_seeds=int(d["supported"].sum()),
                         pa_gain=est, ci_low=lo, ci_high=hi, re_low=re_lo, re_high=re_hi))
    return pd.DataFrame(rows, columns=STATEMENT_COLUMNS)
