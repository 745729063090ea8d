"""Progress a person can read: one line per stage (teachers, students) with done / running /
pending / failed and an ETA, instead of Tune's wide status tables (``kdray sweep --verbose``).

On a terminal the lines are rewritten in place; otherwise (a log file, ``ray job logs``)
they are printed every ``every_s`` seconds when something changed.  ``kdray status``
prints the same lines from storage and MLflow.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Iterable, Optional

from ray.tune import Callback

STAGES = ("teacher", "student")
REDRAW_S = 0.5          # a terminal's progress lines are recounted at most this often


@dataclass
class StageCounts:
    stage: str
    total: int
    done: int = 0
    running: int = 0
    failed: int = 0
    interrupted: int = 0      # kdray status: runs a stopped sweep left KILLED

    @property
    def pending(self) -> int:
        return max(0, self.total - self.done - self.running - self.failed - self.interrupted)

    def line(self, eta_s: Optional[float] = None) -> str:
        out = (f"{self.stage + 's':<9} {self.done}/{self.total} done, {self.running} running, "
               f"{self.pending} pending, {self.failed} failed")
        if self.interrupted:
            out += f", {self.interrupted} interrupted"
        if eta_s is not None:
            out += f"; ETA {_clock(eta_s)}"
        return out


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def eta(c: StageCounts, elapsed_s: float, slots: Optional[int] = None) -> Optional[float]:
    """Seconds left at the stage's pace so far (None before its first trial ends, and when done)."""
    left = c.pending + c.running
    if left == 0 or c.done == 0 or elapsed_s <= 0:
        return None
    return left * elapsed_s / c.done


class Progress(Callback):
    """Counts each stage from the MLflow callback's record of the run (kdray.mlflow_callback.MlflowCallback)."""

    def __init__(self, roles: dict[str, str], done_before: dict[str, int], callback, every_s: float = 30.0):
        self.roles, self.cb, self.every_s = roles, callback, every_s
        self.done_before = done_before
        self.totals = {st: sum(r == st for r in roles.values()) + done_before.get(st, 0) for st in STAGES}
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self.started: dict[str, float] = {}
        self.last_text, self.last_shown, self.drawn = "", 0.0, 0
        self.last_counted = float("-inf")

    def counts(self) -> list[StageCounts]:
        cb = self.cb
        out = []
        for st in STAGES:
            if not self.totals[st]:
                continue
            mine = lambda keys: sum(self.roles.get(k) == st for k in keys)  # noqa: E731
            ended = cb.ended_keys()
            running = sum(self.roles.get(k) == st and k not in ended for k in cb.started_keys())
            out.append(StageCounts(st, self.totals[st], self.done_before.get(st, 0) + mine(cb.finished),
                                   running, mine(cb.failed), mine(cb.interrupted)))
        return out

    def text(self) -> list[str]:
        now = time.monotonic()
        lines = []
        for c in self.counts():
            if c.running or c.done > self.done_before.get(c.stage, 0):
                self.started.setdefault(c.stage, now)
            elapsed = now - self.started.get(c.stage, now)
            lines.append(c.line(eta(StageCounts(c.stage, c.total - self.done_before.get(c.stage, 0),
                                                c.done - self.done_before.get(c.stage, 0), c.running, c.failed),
                                    elapsed)))
        return lines

    def show(self, force: bool = False) -> None:
        now = time.monotonic()
        # Tune calls this every loop step; counting is O(trials), so count at most twice a second
        # (a terminal) or once per ``every_s`` (a log), or the driver's cost grows with trials squared.
        if not force and now - self.last_counted < (REDRAW_S if self.tty else self.every_s):
            return
        self.last_counted = now
        lines = self.text()
        text = "\n".join(lines)
        if self.tty:
            if text != self.last_text or force:
                up = f"\x1b[{self.drawn}F" if self.drawn else ""
                sys.stderr.write(up + "".join(f"\x1b[2K{ln}\n" for ln in lines))
                self.drawn = len(lines)
        elif force or (text != self.last_text and now - self.last_shown >= self.every_s):
            sys.stderr.write("".join(f"kdray: {ln}\n" for ln in lines))
            self.last_shown = now
        else:
            return
        sys.stderr.flush()
        self.last_text = text

    def on_step_end(self, iteration, trials, **info):
        self.show()

    def on_experiment_end(self, trials, **info):
        self.show(force=True)


def status_counts(roles: dict[str, str], statuses: dict[str, str], stored: Iterable[str] = ()) -> list[StageCounts]:
    """``kdray status``: each planned trial's MLflow status (FINISHED, RUNNING, FAILED, KILLED; none
    when it never started); a teacher whose model is in storage counts as done."""
    stored = set(stored)
    out = []
    for st in STAGES:
        keys = [k for k, r in roles.items() if r == st]
        if not keys:
            continue
        s = ["FINISHED" if k in stored else statuses.get(k) for k in keys]   # a stored teacher is reused
        out.append(StageCounts(st, len(keys), s.count("FINISHED"), s.count("RUNNING"), s.count("FAILED"),
                               s.count("KILLED")))
    return out


def status_lines(target: str, tracking_uri: Optional[str] = None) -> list[str]:
    """``kdray status``: a sweep file's planned trials (or, given an experiment name, its runs)
    counted per stage from MLflow and storage.  Reads only: creates no database and no run."""
    from pathlib import Path

    from kdray.contracts import KIND_TRIAL, TAG_KIND, TAG_ROLE, TAG_TRIAL_KEY
    from kdray.tracking import check_sqlite_store, sqlite_path

    roles, stored, name = {}, set(), target
    if Path(target).suffix in (".yaml", ".yml") or Path(target).is_file():
        from kdray.plan import build_plan
        from kdray.storage import Store
        from kdray.sweep import load_sweep

        sweep = load_sweep(target)
        name, uri = sweep.name, tracking_uri or sweep.resolved_tracking_uri()
        plan = build_plan(sweep)
        roles = {s.trial_key: s.role for s in plan.all}
        store = Store(sweep.storage, sweep.name)
        stored = {s.trial_key for s in plan.teachers if store.exists(s.trial_key, "model.pt")}
    else:
        from kdray.sweep import default_tracking_uri
        import os
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    statuses: dict[str, str] = {}
    db = sqlite_path(uri)
    if db is None or db.exists():
        check_sqlite_store(uri)
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(name)
        runs = client.search_runs([exp.experiment_id], f"tags.`{TAG_KIND}` = '{KIND_TRIAL}'",
                                  max_results=50000) if exp else []
        planned = set(roles)
        rank = {"FINISHED": 0, "RUNNING": 1, "FAILED": 2, "KILLED": 3}
        for r in runs:
            key = r.data.tags.get(TAG_TRIAL_KEY)
            if planned and key not in planned:
                continue     # a trial this file no longer plans
            roles.setdefault(key, r.data.tags.get(TAG_ROLE, "student"))
            if rank.get(r.info.status, 9) < rank.get(statuses.get(key), 9):
                statuses[key] = r.info.status
    counts = status_counts(roles, statuses, stored)
    if not roles:
        return [f"sweep {name}: nothing planned or run (no trial runs in MLflow at {uri})"]
    done = sum(c.done for c in counts)
    head = f"sweep {name}: {done}/{len(roles)} trials done ({uri})"
    return [head] + [c.line() for c in counts]
