"""The driver's Tune callback: Tune's trial events become MLflow runs (the driver is MLflow's only
writer, so sqlite is never written by two processes and workers need no MLflow credentials).

A Tune trial is one trial spec, or a pack of several (``config["pack"]``): each spec gets its own
run, ended FINISHED when its final record arrives (its artefacts and provenance tags logged from
storage), FAILED with its reason, or KILLED when the sweep was interrupted.  When the tracking
server stays away longer than the patience, the callback stops the sweep as Ctrl-C does.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from ray.tune import Callback

from kdray import testhook
from kdray.contracts import (EPOCH, FAILURE, FINAL, RESULT_EPOCHS, RESULT_LAST, RESULT_PACK, TAG_RETRIES, TAG_REUSED,
                             TAG_SUSPECT, provenance_tags)
from kdray.sanity import suspicion
from kdray.spec import TrialSpec
from kdray.storage import Store
from kdray.tracking import Tracker, TrackingError


class Flag:
    """Set once, read anywhere; unlike threading.Event it pickles (Tune saves its callbacks)."""

    def __init__(self):
        self.value = False

    def set(self) -> None:
        self.value = True

    def is_set(self) -> bool:
        return self.value


def _tracked(hook):
    """A Tune hook that writes to MLflow.  When the tracking server stays away longer than the
    patience (``tracking.patience_s``), the sweep stops as on Ctrl-C and no later hook writes:
    what was running is counted interrupted, to be rerun on resume."""
    @functools.wraps(hook)
    def guarded(self, *args, **kwargs):
        if self.lost:
            return None
        try:
            return hook(self, *args, **kwargs)
        except TrackingError as e:
            self.lose(str(e))
            return None
    return guarded


class MlflowCallback(Callback):
    """Turns Tune's trial events into MLflow runs (the driver is the only writer).  A Tune trial
    is one trial spec, or a pack of several (``config["pack"]``): each spec gets its own run."""

    def __init__(self, tracker: Tracker, store: Store, stopping: Optional[Flag] = None):
        self.tracker, self.store = tracker, store
        self.stopping = stopping or Flag()   # set on Ctrl-C: what ends now was interrupted
        self.runs: dict[str, str] = {}       # trial key -> MLflow run id
        self.members: dict[str, list[TrialSpec]] = {}   # Tune trial id -> its specs (started on Tune)
        self.finished: list[str] = []
        self.failed: dict[str, str] = {}
        self.interrupted: list[str] = []
        self._ended: set[str] = set()                   # the three above, as one set
        self.suspect: list[tuple[str, str, str]] = []    # (role, label, reason) of nonsense results
        self.retries: dict[str, int] = {}                # Tune trial id -> restarts
        self.lost = ""                                   # why MLflow could no longer be written
        self.gpu_seconds = 0.0                           # GPU x seconds the trials finished now held
        self.first_start_at: Optional[float] = None      # time.time() Tune started the first trial

    def lose(self, reason: str) -> None:
        """The tracking server is gone: stop the Tune run through the same path as Ctrl-C."""
        self.lost = reason
        print(f"kdray: {reason}: stopping the running trials", file=sys.stderr, flush=True)
        if not self.stopping.is_set():
            self.stopping.set()
            os.kill(os.getpid(), signal.SIGUSR1)

    def started_keys(self) -> list[str]:
        return [s.trial_key for specs in self.members.values() for s in specs]

    def ended_keys(self) -> set[str]:
        """Trials that ended in this run: finished, failed or interrupted (kept as they end, not
        rebuilt: every result asks, and rebuilding made the driver's cost grow with trials squared)."""
        return self._ended

    def _ended_now(self, key: str, how: str, reason: str = "") -> None:
        """Record that trial ``key`` ended: "finished", "failed" (with its reason) or "interrupted"."""
        if how == "failed":
            self.failed[key] = reason
        elif how == "finished":
            self.finished.append(key)
        else:
            self.interrupted.append(key)
        self._ended.add(key)

    def _specs(self, trial) -> list[TrialSpec]:
        """The trial's specs this run logs: its one spec, or the pack members it has yet to finish
        (a pack trains whole, its members with a FINISHED run included)."""
        if trial.trial_id not in self.members:   # recorded first: started, even if MLflow fails to hear of it
            cfg = trial.config
            specs = [TrialSpec.from_dict(d) for d in cfg.get("pack") or [cfg["spec"]]]
            todo = set(cfg.get("pack_todo") or [s.trial_key for s in specs])
            self.members[trial.trial_id] = [s for s in specs if s.trial_key in todo]
        return self.members[trial.trial_id]

    def _run(self, spec: TrialSpec) -> str:
        if spec.trial_key not in self.runs:
            self.runs[spec.trial_key] = self.tracker.start_trial(spec)
        return self.runs[spec.trial_key]

    def _end_unfinished(self, spec: TrialSpec, reason: str) -> None:
        """A trial that ended without its final record: interrupted if Ctrl-C came first, else failed."""
        run_id = self._run(spec)
        if self.stopping.is_set():
            self._ended_now(spec.trial_key, "interrupted")
            self.tracker.end_trial(run_id, False, "interrupted", status="KILLED")
        else:
            self._ended_now(spec.trial_key, "failed", reason)
            self.tracker.end_trial(run_id, False, reason)

    def _finish(self, spec: TrialSpec, final: dict) -> None:
        """End the trial's run FINISHED: its artefacts; its provenance tags (and why its results look
        suspect, if they do) in one log_batch with what the tracker holds for it (its final epochs,
        its params); then its status (MLflow has no call that sets both)."""
        run_id = self._run(spec)
        with tempfile.TemporaryDirectory() as tmp:
            names = ["test_outputs.npz"] + (["model.pt"] if spec.role == "teacher" else [])
            self.tracker.log_artifacts(run_id, [self.store.fetch_to(spec.trial_key, name, tmp) for name in names])
        run = self.store.load_run(spec.trial_key)
        tags = provenance_tags(run)
        share = len(run.get("pack_keys") or ()) or 1     # a pack's seconds are its students' together
        self.gpu_seconds += float(spec.resources.get("gpu", 0) or 0) * float(final.get("train_seconds") or 0) / share
        reason = suspicion(final)
        if reason:
            self.suspect.append((spec.role, spec.label, reason))
            tags[TAG_SUSPECT] = reason
        self.tracker.end_trial(run_id, True, tags=tags)
        self._ended_now(spec.trial_key, "finished")
        testhook.maybe_exit("driver", spec.label, final.get(EPOCH))

    def end_in_flight(self) -> None:
        """After an interrupted run: every trial that started and did not end is interrupted."""
        for key in self.started_keys():
            if key not in self._ended:
                self._ended_now(key, "interrupted")
                if key in self.runs:
                    self._kill_run(self.runs[key])

    @_tracked
    def _kill_run(self, run_id: str) -> None:
        self.tracker.end_trial(run_id, False, "interrupted", status="KILLED")

    def on_trial_start(self, iteration, trials, trial, **info):
        self.first_start_at = self.first_start_at or time.time()
        self._start_runs(trial)

    @_tracked
    def _start_runs(self, trial):
        for spec in self._specs(trial):
            self._run(spec)

    @_tracked
    def on_trial_result(self, iteration, trials, trial, result, **info):
        specs = self._specs(trial)
        if RESULT_PACK not in result:
            records = result.get(RESULT_EPOCHS) or [result.get(RESULT_LAST) or {}]
            # the final record: the run ends next (on_trial_complete, or on_trial_error if the trial fails
            # after all), and its end's tags take these metrics along in one call (tracker.log_epochs)
            self.tracker.log_epochs(self._run(specs[0]), records, hold=any(m.get(FINAL) for m in records))
            return
        ended = self.ended_keys()
        for spec in specs:   # a packed student ends as soon as its final record (or its failure) arrives
            records = (result[RESULT_PACK].get(spec.trial_key) or {}).get(RESULT_EPOCHS) or []
            if not records or spec.trial_key in ended:
                continue
            failure = next((m[FAILURE] for m in records if FAILURE in m), None)
            final = next((m for m in records if m.get(FINAL)), None)
            # a run that ends now: its epochs go in one call with its end's tags (tracker.log_epochs)
            self.tracker.log_epochs(self._run(spec), [m for m in records if FAILURE not in m], hold=bool(failure or final))
            if failure:
                self._end_unfinished(spec, failure)
            elif final:
                self._finish(spec, final)

    @_tracked
    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        last = (result.get(RESULT_EPOCHS) or [result.get(RESULT_LAST) or {}])[-1]   # a pack's: its failure, if any
        ended = self.ended_keys()
        for spec in self._specs(trial):
            if spec.trial_key in ended:
                continue
            if last.get(FINAL) and not trial.config.get("pack"):
                self._finish(spec, last)
            else:
                self._end_unfinished(spec, last.get(FAILURE) or "trial ended without its final evaluation")

    @_tracked
    def on_trial_recover(self, iteration, trials, trial, **info):
        """Tune restarts the trial (max_failures): kept on its runs, so retries are visible."""
        self.retries[trial.trial_id] = self.retries.get(trial.trial_id, 0) + 1
        for spec in self._specs(trial):
            self.tracker.set_tag(self._run(spec), TAG_RETRIES, str(self.retries[trial.trial_id]))

    @_tracked
    def on_trial_error(self, iteration, trials, trial, **info):
        ended = self.ended_keys()
        for spec in self._specs(trial):
            if spec.trial_key not in ended:
                self._end_unfinished(spec, _error_line(trial))


def log_reused_teacher(tracker: Tracker, store: Store, spec: TrialSpec) -> None:
    """A teacher already trained (same key) by another sweep: log its stored results, do not retrain."""
    run_id = tracker.start_trial(spec)
    result = store.load_result(spec.trial_key)
    tracker.log_epochs(run_id, result["history"] + [result[FINAL]], hold=True)
    tracker.end_trial(run_id, True, tags={TAG_REUSED: "true", **provenance_tags(store.load_run(spec.trial_key))})


def _error_line(trial) -> str:
    """The last line of the trial's error (e.g. 'TrialDiverged: training loss is nan ...')."""
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text() if path and Path(path).exists() else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "trial failed (see the Ray Tune logs)"
