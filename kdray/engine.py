"""Run a plan on Ray Tune: stage 1 trains teachers, stage 2 their students.

kdray expands the grid itself (kdray.plan) and hands Tune the expanded list
as one ``grid_search`` over specs.  The driver's ``MlflowCallback`` logs every
result; trials only compute and write artefacts to storage.  A re-submitted
sweep skips every trial whose key already has a FINISHED MLflow run.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from kdray.plan import Plan, build_plan
from kdray.recipe import TrialDiverged, run_trial
from kdray.spec import TrialSpec
from kdray.storage import Store
from kdray.sweep import Sweep
from kdray.tracking import Tracker

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ the Tune trainable

def _device(spec: TrialSpec) -> str:
    return "cuda" if spec.resources.get("gpu", 0) > 0 and torch.cuda.is_available() else "cpu"


def trainable(config: dict) -> None:
    """Tune's function trainable: rebuild the spec, train, report every epoch."""
    from ray import tune

    spec = TrialSpec.from_dict(config["spec"])
    store = Store(config["storage"], spec.sweep)
    torch.set_num_threads(max(1, int(spec.resources.get("cpu", 1))))

    def report(metrics: dict, state: Optional[dict] = None) -> None:
        if state is None:
            tune.report({"kdray": metrics})
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / "state.pt")
            tune.report({"kdray": metrics}, checkpoint=tune.Checkpoint.from_directory(d))

    def restore() -> Optional[dict]:
        ckpt = tune.get_checkpoint()
        if ckpt is None:
            return None
        with ckpt.as_directory() as d:
            return torch.load(Path(d) / "state.pt", weights_only=True)

    try:
        if spec.distributed:  # DDP: this trial drives a Ray Train TorchTrainer (kdray.distributed)
            from kdray.distributed import run_distributed_trial
            run_distributed_trial(config["spec"], config["storage"], report, restore)  # re-raises TrialDiverged
        else:
            run_trial(spec, store, report, restore, device=_device(spec))
    except TrialDiverged as e:
        # Not a crash to retry: the same spec would diverge again. End the trial
        # normally with the reason; the callback marks its run FAILED.
        tune.report({"kdray": {"failure": f"TrialDiverged: {e}"}})


def _resources(config: dict):
    from ray import tune

    spec = config["spec"]
    if spec.get("distributed"):  # the driver's bundle; the Train run reserves its workers itself
        from kdray.distributed import placement_group_factory
        return placement_group_factory(spec)
    r = spec.get("resources") or {}
    return tune.PlacementGroupFactory([{"CPU": r.get("cpu", 1), "GPU": r.get("gpu", 0)}])


# ------------------------------------------------------------------ driver-side logging

def _make_callback(tracker: Tracker, store: Store):
    from ray.tune import Callback

    class MlflowCallback(Callback):
        """Turns Tune's trial events into MLflow runs (the driver is the only writer)."""

        def __init__(self):
            self.runs: dict[str, str] = {}
            self.finished: list[str] = []
            self.failed: dict[str, str] = {}

        def _run(self, trial) -> str:
            if trial.trial_id not in self.runs:
                self.runs[trial.trial_id] = tracker.start_trial(TrialSpec.from_dict(trial.config["spec"]))
            return self.runs[trial.trial_id]

        def on_trial_start(self, iteration, trials, trial, **info):
            self._run(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            m = result.get("kdray") or {}
            tracker.log_metrics(self._run(trial), m, int(m.get("epoch", 0)))

        def on_trial_complete(self, iteration, trials, trial, **info):
            spec = TrialSpec.from_dict(trial.config["spec"])
            run_id = self._run(trial)
            final = (trial.last_result or {}).get("kdray") or {}
            if not final.get("final"):
                self.failed[spec.trial_key] = final.get("failure") or "trial ended without its final evaluation"
                tracker.end_trial(run_id, False, self.failed[spec.trial_key])
                return
            with tempfile.TemporaryDirectory() as tmp:
                names = ["test_outputs.npz"] + (["model.pt"] if spec.role == "teacher" else [])
                for name in names:
                    tracker.log_artifact(run_id, store.fetch_to(spec.trial_key, name, tmp))
            tracker.end_trial(run_id, True)
            self.finished.append(spec.trial_key)

        def on_trial_error(self, iteration, trials, trial, **info):
            spec = TrialSpec.from_dict(trial.config["spec"])
            reason = _error_line(trial)
            self.failed[spec.trial_key] = reason
            tracker.end_trial(self._run(trial), False, reason)

    return MlflowCallback()


def log_reused_teacher(tracker: Tracker, store: Store, spec: TrialSpec) -> None:
    """A teacher already trained (same key) by another sweep: log its stored results, do not retrain."""
    run_id = tracker.start_trial(spec)
    result = store.load_json(spec.trial_key, "result.json")
    for m in result["history"]:
        tracker.log_metrics(run_id, m, int(m["epoch"]))
    tracker.log_metrics(run_id, result["final"], int(result["final"]["epoch"]))
    tracker.client.set_tag(run_id, "kdray.reused", "true")
    tracker.end_trial(run_id, True)


def _error_line(trial) -> str:
    """The last line of the trial's error (e.g. 'TrialDiverged: training loss is nan ...')."""
    path = getattr(trial, "error_file", None) or ""
    try:
        text = Path(path).read_text() if path and Path(path).exists() else ""
    except OSError:
        text = ""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else "trial failed (see the Ray Tune logs)"


# ------------------------------------------------------------------ the sweep

@dataclass
class SweepSummary:
    name: str
    planned: int
    skipped: int = 0           # already FINISHED in MLflow before this run
    reused: int = 0            # teachers whose artefacts another sweep (or run) left in storage
    finished: int = 0
    failed: dict = field(default_factory=dict)
    blocked: int = 0           # students whose teacher failed
    seconds: float = 0.0
    tracking_uri: str = ""
    storage: str = ""

    def lines(self) -> list[str]:
        out = [f"sweep {self.name}: {self.finished} trials finished now, {self.skipped} already done, "
               f"{self.reused} teachers reused from storage, "
               f"{len(self.failed)} failed, {self.blocked} not run (teacher missing); {self.planned} planned; "
               f"{self.seconds:.0f} s"]
        for key, reason in list(self.failed.items())[:10]:
            out.append(f"  failed {key}: {reason}")
        out.append(f"runs:      MLflow experiment '{self.name}' at {self.tracking_uri}")
        out.append(f"artefacts: {self.storage}")
        out.append(f"browse:    kdray ui --tracking-uri '{self.tracking_uri}'   (or: mlflow ui --backend-store-uri '{self.tracking_uri}')")
        out.append(f"report:    kdray report {self.name} --tracking-uri '{self.tracking_uri}'")
        return out

    @property
    def ok(self) -> bool:
        return not self.failed and not self.blocked


def connect_ray(num_cpus: Optional[int] = None) -> None:
    """Join the cluster named by RAY_ADDRESS (or `ray job submit`), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)


def _concurrency(sweep: Sweep, specs: list[TrialSpec]) -> Optional[int]:
    """The sweep's cap; for DDP trials without one, as many as the cluster's current size fits
    (Ray Train reserves its workers outside Tune). On an autoscaling cluster set
    ``max_concurrent_trials`` in the sweep file: the current size undercounts."""
    if sweep.max_concurrent_trials or not any(s.distributed for s in specs):
        return sweep.max_concurrent_trials
    from kdray.distributed import max_concurrent
    return max_concurrent([s.to_dict() for s in specs])


def _tune_stage(stage: str, specs: list[TrialSpec], sweep: Sweep, store: Store, tracker: Tracker, verbose: int):
    from ray import tune

    callback = _make_callback(tracker, store)
    reporter = tune.CLIReporter(
        metric_columns={"kdray/epoch": "epoch", "kdray/train_loss": "train loss", "kdray/test_acc": "test acc"},
        parameter_columns={"spec/teacher_seed": "teacher"}, max_progress_rows=8, max_error_rows=5, max_report_frequency=15,
        print_intermediate_tables=verbose > 0)
    storage = store.tune_path()
    tuner = tune.Tuner(
        tune.with_resources(trainable, _resources),
        param_space={"storage": store.uri,  # absolute, so every worker finds the same place
                     "spec": tune.grid_search([s.to_dict() for s in specs])},
        # reuse_actors: a worker process keeps torch imported and data sets in memory
        # between trials (every trial re-seeds everything it uses, so results are unchanged).
        tune_config=tune.TuneConfig(max_concurrent_trials=_concurrency(sweep, specs), reuse_actors=True,
                                    trial_name_creator=lambda t: TrialSpec.from_dict(t.config["spec"]).label,
                                    trial_dirname_creator=lambda t: TrialSpec.from_dict(t.config["spec"]).trial_key),
        run_config=tune.RunConfig(name=f"{stage}s", storage_path=storage, callbacks=[callback],
                                  failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                  progress_reporter=reporter, verbose=verbose,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    tuner.fit()
    return callback


def run_sweep(sweep: Sweep, plan: Optional[Plan] = None, verbose: int = 1) -> SweepSummary:
    t0 = time.time()
    plan = plan or build_plan(sweep)
    store = Store(sweep.storage, sweep.name)
    uri = sweep.resolved_tracking_uri()
    artifact_root = str(sweep.local_storage() / "mlartifacts" / sweep.name) if uri.startswith("sqlite") else None
    tracker = Tracker(uri, sweep.name, artifact_root, sweep.description)  # fails before any trial if unreachable
    summary = SweepSummary(sweep.name, len(plan.all), tracking_uri=uri, storage=store.uri)
    done = tracker.finished_keys()
    connect_ray()
    for stage, specs in (("teacher", plan.teachers), ("student", plan.students)):
        todo = [s for s in specs if s.trial_key not in done]
        summary.skipped += len(specs) - len(todo)
        # Runs a killed driver left unfinished go before any trial gets its one new run.
        tracker.discard_unfinished(s.trial_key for s in todo)
        if stage == "teacher":
            reused = [s for s in todo if store.exists(s.trial_key, "model.pt")]
            for spec in reused:
                log_reused_teacher(tracker, store, spec)
            summary.reused += len(reused)
            todo = [s for s in todo if s not in reused]
        if stage == "student":
            ready = [s for s in todo if store.exists(s.teacher_key, "model.pt")]
            summary.blocked += len(todo) - len(ready)
            todo = ready
        if not todo:
            continue
        print(f"kdray: stage {stage}s: {len(todo)} trials", file=sys.stderr, flush=True)
        cb = _tune_stage(stage, todo, sweep, store, tracker, verbose)
        summary.finished += len(cb.finished)
        summary.failed.update(cb.failed)
    summary.seconds = time.time() - t0
    tracker.end_sweep({"trials_finished": summary.finished, "trials_failed": len(summary.failed),
                       "trials_planned": summary.planned, "sweep_seconds": summary.seconds})
    return summary
