"""Which runs an answer is about.

A report of a sweep *file* analyses exactly the trial keys the file plans now: an experiment
also holds runs of earlier versions of the file (another checkpoint, recipe or grid), and those
must never stand in for the question asked.  A report of an *experiment* (no file) uses every
run, but never pools runs that answer different questions under one condition and seed: each
distinct teacher (its trial key) and each student variant (data, model, recipe) is analysed on
its own, under a setup label that names it.  Pure functions on the frame ``runs.load_runs`` gives.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pandas as pd

# Why a run of the experiment is not part of the file's plan, by what its key differs in.
OTHER_TEACHER = "teacher runs this file does not plan (another checkpoint, teacher recipe or seed)"
OTHER_TEACHERS_STUDENTS = "student runs of a teacher this file does not plan (another checkpoint, teacher recipe or seed)"
OTHER_STUDENTS = "student runs this file does not plan (another student recipe, model, data set, grid or seed)"


@dataclass
class Scope:
    """What a report was asked and which runs answer it (shown in its summary)."""
    source: str                                    # "FILE" or "experiment NAME"
    sweep_sha256: str = ""                         # the sweep file as it is now
    planned: int = 0                               # trials the file plans (0: no file)
    found: int = 0                                 # of those, trials with a run
    ignored: dict = field(default_factory=dict)    # reason -> runs left out
    split: list = field(default_factory=list)      # setups kept apart by teacher or variant, and why

    def lines(self) -> list[str]:
        if self.planned:
            sha = f" (sha256 {self.sweep_sha256[:12]})" if self.sweep_sha256 else ""
            out = [f"scope: the {self.planned} trials {self.source}{sha} plans now; {self.found} of them have a run"]
        else:
            out = [f"scope: every run of {self.source}"]
        out += [f"  ignored {n} {why}" for why, n in self.ignored.items()]
        out += [f"  {s}" for s in self.split]
        return out


def scope_to_plan(df: pd.DataFrame, plan, source: str, sweep_sha256: str = "") -> tuple[pd.DataFrame, Scope]:
    """The runs of the trial keys ``plan`` names, each teacher under the setup the plan gives it
    (a teacher's key leaves its setup out: one teacher serves every setup that plans it)."""
    keys = {s.trial_key: s for s in plan.all}
    teachers = {s.trial_key for s in plan.teachers}
    inside = df["trial_key"].isin(list(keys))
    why = Counter()
    for r in df[~inside].itertuples():
        why[OTHER_TEACHER if r.role == "teacher" else
            OTHER_TEACHERS_STUDENTS if r.teacher_key not in teachers else OTHER_STUDENTS] += 1
    kept = df[inside].copy()
    kept["setup"] = [keys[k].setup for k in kept["trial_key"]]
    scope = Scope(source, sweep_sha256, len(keys), int(kept["trial_key"].nunique()),
                  {w: why[w] for w in (OTHER_TEACHER, OTHER_TEACHERS_STUDENTS, OTHER_STUDENTS) if why[w]})
    return kept.reset_index(drop=True), scope


def split_cohorts(df: pd.DataFrame, source: str) -> tuple[pd.DataFrame, Scope]:
    """Every run, with a setup's students kept apart wherever one teacher seed has runs of more than
    one teacher (trial key) or student variant: each such cohort becomes its own setup, labelled
    ``setup [teacher KEY8]`` / ``[students VARIANT]``, and its teacher row follows it."""
    df = df.copy()
    scope = Scope(source)
    students = df[df["role"] != "teacher"]
    new_setup = dict(zip(df.index, df["setup"]))
    teacher_label: dict[str, set] = {}
    for setup, rows in students.groupby("setup", sort=True):
        variants = rows["variant"].nunique(dropna=False)
        per_seed = rows.groupby(["variant", "teacher_seed"], dropna=False)["teacher_key"].nunique(dropna=False)
        by_teacher = bool((per_seed > 1).any())
        if variants <= 1 and not by_teacher:
            continue
        for i, r in zip(rows.index, rows.itertuples()):
            parts = ([f"teacher {str(r.teacher_key)[:8]}"] if by_teacher else []) + \
                    ([f"students {r.variant}"] if variants > 1 else [])
            new_setup[i] = f"{setup} [{', '.join(parts)}]"
            teacher_label.setdefault(r.teacher_key, set()).add(new_setup[i])
        why = " and ".join(w for w, on in (("teacher", by_teacher), ("student variant", variants > 1)) if on)
        scope.split.append(f"setup {setup}: runs of more than one {why} for a teacher seed; each is reported "
                           f"on its own")
    for i, r in zip(df.index, df.itertuples()):
        labels = teacher_label.get(r.trial_key, set()) if r.role == "teacher" else set()
        if len(labels) == 1:
            new_setup[i] = next(iter(labels))
    df["setup"] = [new_setup[i] for i in df.index]
    return df.reset_index(drop=True), scope
