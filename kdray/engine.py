"""Run a plan on Ray Tune: teachers first, each teacher's students as soon as it is done.

kdray expands the grid itself (kdray.plan); a Tune searcher hands the specs
over in one run, teachers first and each student once its teacher's model is
in storage (no barrier between stages).  The driver's ``MlflowCallback``
(kdray/mlflow_callback.py) logs every result; trials only compute and write artefacts to storage.  A re-submitted
sweep skips every trial whose key already has a FINISHED MLflow run.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from ray.tune.search import Searcher

from kdray import objectstore, simulation, testhook
from kdray.contracts import EPOCH, FAILURE, FINAL, RESULT_EPOCHS, RESULT_LAST, RESULT_PACK
from kdray.errors import DataNotFoundError
from kdray.packing import run_pack
from kdray.plan import Plan, build_plan
from kdray.recipe import TrialDiverged, run_trial
from kdray.sanity import sanity_lines
from kdray.simulation import NoGpuError, device_for
from kdray.spec import TrialSpec
from kdray.storage import Store
from kdray.sweep import Sweep
from kdray.mlflow_callback import Flag, MlflowCallback, log_reused_teacher
from kdray.tracking import MLFLOW_CLIENT_ENV, Tracker, TrackingError, patience_s, probe

log = logging.getLogger(__name__)

BRIEF = (EPOCH, "train_loss", "test_acc", FINAL, FAILURE)   # a result's RESULT_LAST: Tune's table


# ------------------------------------------------------------------ the Tune trainable



def trainable(config: dict) -> None:
    """Tune's function trainable: rebuild the spec, train, report the epochs' metrics in batches."""
    from ray import tune

    if config.get("pack"):
        return _train_pack(config)
    spec = TrialSpec.from_dict(config["spec"])
    store = Store(config["storage"], spec.sweep)
    torch.set_num_threads(max(1, int(spec.resources.get("cpu", 1))))
    every = float(config.get("report_every_s", 0.0))
    pending: list[dict] = []       # epochs not yet sent to the driver
    last_sent = [time.monotonic()]

    def send(state: Optional[dict] = None) -> None:
        # Every tune.report waits for the driver to take the result: batching epochs keeps
        # short trials from stalling on the driver (the metrics of docs/protocol.md §4 are unchanged).
        # RESULT_LAST is only what Tune's table shows: Tune keeps statistics of every number in it and
        # rewrites them as JSON; the callback takes the records from RESULT_EPOCHS.
        result = {RESULT_LAST: {k: v for k, v in pending[-1].items() if k in BRIEF}, RESULT_EPOCHS: list(pending)}
        pending.clear()
        last_sent[0] = time.monotonic()
        if state is None:
            tune.report(result)
            return
        with tempfile.TemporaryDirectory() as d:
            torch.save(state, Path(d) / "state.pt")
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(d))

    def report(metrics: dict, state: Optional[dict] = None) -> None:
        pending.append(metrics)
        if state is not None or metrics.get(FINAL) or time.monotonic() - last_sent[0] >= every:
            send(state)
        testhook.maybe_exit("worker", spec.label, metrics.get("epoch"))
        testhook.maybe_hold(spec.label, metrics.get("epoch"))

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
            device, simulated = device_for(spec.resources, bool(config.get("simulate_gpu")))
            run_trial(spec, store, report, restore, device=device, simulated=simulated)
    except Exception as e:
        if not deterministic(e):
            raise          # a lost worker or node, or a transient fault: Tune retries (max_failures)
        # Not a crash to retry: the same spec would fail again. End the trial normally
        # with the reason (and the epochs before it); the callback marks its run FAILED.
        pending.append({FAILURE: f"{type(e).__name__}: {str(e).strip()[:2000]}"})
        send()


def _train_pack(config: dict) -> None:
    """A packed trial (kdray/packing.py): K students in one process, each reported under its own key
    so the driver gives each its own MLflow run.  A student whose result is already in storage
    (its trial ran, its run was not ended) is reported from there, not retrained."""
    from ray import tune

    specs = [TrialSpec.from_dict(d) for d in config["pack"]]
    store = Store(config["storage"], specs[0].sweep)
    torch.set_num_threads(max(1, int(specs[0].resources.get("cpu", 1))))
    every = float(config.get("report_every_s", 0.0))
    pending: dict[str, list[dict]] = {}
    last_sent = [time.monotonic()]

    def send() -> None:
        tune.report({RESULT_PACK: {k: {RESULT_EPOCHS: v} for k, v in pending.items()}, RESULT_LAST: {}})
        pending.clear()
        last_sent[0] = time.monotonic()

    labels = {s.trial_key: s.label for s in specs}

    def report(key: str, metrics: dict) -> None:
        pending.setdefault(key, []).append(metrics)
        if time.monotonic() - last_sent[0] >= every:
            send()
        if metrics.get(FINAL):   # the student is stored: a crash here leaves its pack half stored
            testhook.maybe_exit("worker", labels[key], metrics.get(EPOCH))
        testhook.maybe_hold(labels[key], metrics.get(EPOCH))

    for s in specs:   # the driver's students whose result a killed run of this pack already stored
        if s.trial_key in config.get("pack_todo", ()) and store.exists(s.trial_key, "result.json"):
            stored = store.load_result(s.trial_key)
            pending[s.trial_key] = stored["history"] + [stored[FINAL]]
    try:
        device, simulated = device_for(specs[0].resources, bool(config.get("simulate_gpu")))
        run_pack(specs, store, device, report, simulated=simulated)
    except Exception as e:
        send()   # what the students did before (a finished student stays finished)
        if not deterministic(e):
            raise
        # then the reason for every one not ended
        tune.report({RESULT_PACK: {}, RESULT_LAST: {FAILURE: f"{type(e).__name__}: {str(e).strip()[:2000]}"}})
        return
    send()


# Errors the same spec raises again on every attempt: retrying them (max_failures) only wastes the
# slot.  RuntimeError is deterministic only for a shape mismatch (torch's wording); CUDA out of
# memory, NCCL and other RuntimeErrors may pass on another node and are retried.
DETERMINISTIC = (TrialDiverged, ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError,
                 ZeroDivisionError, AssertionError, DataNotFoundError, NoGpuError)
SHAPE_WORDS = ("shape", "size mismatch", "must match the size", "mat1 and mat2", "dimension")


def deterministic(e: BaseException) -> bool:
    if isinstance(e, DETERMINISTIC):
        return True
    oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e)
    return type(e) is RuntimeError and not oom and any(w in str(e) for w in SHAPE_WORDS)


def _resources(config: dict):
    from ray import tune

    spec = config["spec"]
    if spec.get("distributed"):  # the driver's bundle; the Train run reserves its workers itself
        from kdray.distributed import placement_group_factory
        return placement_group_factory(spec)
    r = spec.get("resources") or {}
    return tune.PlacementGroupFactory([{"CPU": r.get("cpu", 1), "GPU": r.get("gpu", 0)}])


# ------------------------------------------------------------------ the sweep

EXIT_FAILED, EXIT_INTERRUPTED = 1, 130
EXIT_TRACKING_LOST = 75   # sysexits' EX_TEMPFAIL: nothing is wrong with the sweep; run it again later


@dataclass
class SweepSummary:
    """Where every planned trial stands after a run: the counts add up to ``planned``."""
    name: str
    planned: int
    skipped: int = 0           # already FINISHED in MLflow before this run
    reused: int = 0            # teachers whose artefacts another sweep (or run) left in storage
    finished: int = 0
    failed: dict = field(default_factory=dict)
    blocked: int = 0           # students whose teacher failed (now or before)
    interrupted: int = 0       # running when Ctrl-C came (their runs are KILLED, rerun on resume)
    not_started: int = 0       # still waiting when the sweep stopped
    stopped: bool = False      # Ctrl-C (SIGINT) ended the run
    tracking_lost: str = ""    # why MLflow stopped answering (the run stopped; resume when it is back)
    suspect: list = field(default_factory=list)   # (role, label, reason): finished, but at chance or diverging
    gpu_hours_planned: float = 0.0   # the plan's estimate (gpu_hours_per_model), for the GPU line
    gpu_seconds: float = 0.0   # GPU x seconds the trials finished now held (logical GPUs when simulated)
    retried: int = 0           # Tune trials restarted after a lost worker or node (each counted once)
    restarts: int = 0          # ... and how many restarts that took
    seconds: float = 0.0
    tracking_uri: str = ""
    storage: str = ""
    ray_start_seconds: float = 0.0   # ray.init (or joining the cluster), overlapped with opening MLflow
    first_trial_seconds: float = float("nan")    # from the sweep's start to Tune starting its first trial
    started_at: float = 0.0
    ray_cluster: str = ""            # which Ray cluster ran it (joined, or started locally)

    def lines(self) -> list[str]:
        out = [f"sweep {self.name}: {self.finished} trials finished now, {self.skipped} already done, "
               f"{self.reused} teachers reused from storage, {len(self.failed)} failed, "
               f"{self.blocked} blocked by a failed teacher, {self.interrupted} interrupted, "
               f"{self.not_started} not started; {self.planned} planned; {self.seconds:.0f} s"]
        for key, reason in list(self.failed.items())[:10]:
            out.append(f"  failed {key}: {reason}")
        if self.retried:
            out.append(f"  retried: {self.retried} Tune trials restarted {self.restarts} times after a lost worker or "
                       f"node (their runs carry kdray.retries)")
        out += sanity_lines(self.suspect, self.finished)
        if self.tracking_lost:
            out.append(f"TRACKING LOST: {self.tracking_lost}; {self.interrupted + self.not_started} of "
                       f"{self.planned} trials did not run to the end; when the server answers again, run the "
                       f"same command to resume (finished trials are kept)")
        if self.stopped:
            out.append(f"INTERRUPTED: {self.interrupted + self.not_started} of {self.planned} trials did not run "
                       f"to the end; run the same command again to resume (finished trials are kept)")
        if self.ray_cluster:
            out.append(f"ray:       {self.ray_cluster}")
        if self.gpu_hours_planned or self.gpu_seconds:
            sim = " (SIMULATED: logical GPUs, trained on CPUs)" if simulation.requested() else ""
            out.append(f"gpu:       the plan estimates {self.gpu_hours_planned:,.2f} GPU-hours; the trials finished now "
                       f"held GPUs for {self.gpu_seconds:,.1f} GPU-seconds{sim}")
        out.append(f"runs:      MLflow experiment '{self.name}' at {self.tracking_uri}")
        out.append(f"artefacts: {self.storage}")
        out.append(f"browse:    kdray ui --tracking-uri '{self.tracking_uri}'   (or: mlflow ui --backend-store-uri '{self.tracking_uri}')")
        out.append(f"report:    kdray report {self.name} --tracking-uri '{self.tracking_uri}'")
        return out

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @property
    def exit_code(self) -> int:
        """0 only when every planned trial is done; 130 when interrupted; 1 for failures, or when every
        trial finished now looks like nonsense (kdray/sanity.py)."""
        if self.tracking_lost:
            return EXIT_TRACKING_LOST
        if self.stopped:
            return EXIT_INTERRUPTED
        nonsense = self.finished and len(self.suspect) == self.finished
        return EXIT_FAILED if self.failed or self.blocked or self.not_started or nonsense else 0

    @property
    def status(self) -> str:
        """The sweep's MLflow run status."""
        return {0: "FINISHED", EXIT_FAILED: "FAILED"}.get(self.exit_code, "KILLED")


def connect_ray(num_cpus: Optional[int] = None) -> None:
    """Join the cluster named by RAY_ADDRESS (or `ray job submit`), else start a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if os.environ.get("RAY_ADDRESS"):
        try:
            ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            from kdray.errors import ClusterError
            raise ClusterError(f"cannot join the Ray cluster at RAY_ADDRESS={os.environ['RAY_ADDRESS']}: "
                               f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}") from None
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)


def ray_cluster() -> dict[str, str]:
    """Which Ray cluster this driver runs on (tags of the sweep's run, and ``text`` for its summary):
    a sweep under ``ray job submit`` or RAY_ADDRESS must be seen to have joined that cluster."""
    import ray

    joined = bool(os.environ.get("RAY_ADDRESS"))
    address = ray.get_runtime_context().gcs_address
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    text = (f"joined the Ray cluster at {address} ({nodes} nodes alive)" if joined
            else f"a local Ray cluster started for this sweep ({address})")
    return {"kdray.ray_gcs_address": address, "kdray.ray_joined": str(joined).lower(), "kdray.ray_nodes": str(nodes),
            "text": text}


@contextmanager
def _trials_on_prestarted_workers():
    """Let Tune's trial actors start in the worker processes Ray starts with the cluster.

    Tune gives every trainable actor a runtime environment (``{"env_vars": {"PL_DISABLE_FORK":
    "1"}}``, for PyTorch Lightning), and Ray never places an actor with a runtime environment in
    one of the idle workers it started beforehand: each trial then waits for a new process and
    the runtime-environment agent (about 0.9 s per first trial, measured on 2 cores; the docs'
    "Faster start").  kdray does not use Lightning; without that variable the actor's
    environment is empty and the waiting workers are used.  Variables Tune must carry to other
    nodes (cloud credentials, Ray Train settings) are still carried.  Restored on exit, for
    whatever else this process runs on Tune."""
    try:
        from ray.tune.execution import class_cache
        defaults = class_cache.DEFAULT_ENV_VARS
    except (ImportError, AttributeError):    # another Ray: nothing to do
        defaults = None
    saved = dict(defaults) if isinstance(defaults, dict) else None
    if saved is not None:
        defaults.pop("PL_DISABLE_FORK", None)
    try:
        yield
    finally:
        if saved is not None:
            defaults.clear()
            defaults.update(saved)


def _concurrency(sweep: Sweep, specs: list[TrialSpec]) -> Optional[int]:
    """The sweep's cap; for DDP trials without one, as many as the cluster's current size fits
    (Ray Train reserves its workers outside Tune). On an autoscaling cluster set
    ``max_concurrent_trials`` in the sweep file: the current size undercounts."""
    if sweep.max_concurrent_trials or not any(s.distributed for s in specs):
        return sweep.max_concurrent_trials
    from kdray.distributed import max_concurrent
    return max_concurrent([s.to_dict() for s in specs])


class TeachersFirst(Searcher):
    """Hands Tune every teacher first, then each student as soon as its own teacher's model is in
    storage: one Tune run, and no slot waits for the slowest teacher of a stage.

    It keeps no state worth saving: kdray resumes from MLflow and storage, not from Tune's
    experiment state (Tune's "save not implemented" notice is silenced in ``_tune_run``).
    ``trained``: teacher keys whose model was in storage before this run.
    """

    def __init__(self, specs: list[TrialSpec], store: Store, trained: set[str],
                 packs: Optional[list[list[TrialSpec]]] = None):
        super().__init__()
        self.store = store
        self.todo = {s.trial_key for s in specs}
        self.teachers = [s for s in specs if s.role == "teacher"]
        # each job is one Tune trial: a student, or a pack of students of one teacher
        self.students = packs if packs is not None else [[s] for s in specs if s.role == "student"]
        self.in_flight: dict[str, str] = {}   # Tune trial id -> teacher key
        self.unsettled = {t.trial_key for t in self.teachers}   # teachers not yet ended
        self.ready = set(trained)                              # teachers with a model
        self.blocked = 0                      # students whose teacher has no model

    def suggest(self, trial_id: str):
        if self.teachers:
            t = self.teachers.pop(0)
            self.in_flight[trial_id] = t.trial_key
            return {"spec": t.to_dict()}
        waiting = [j for j in self.students if j[0].teacher_key in self.ready or j[0].teacher_key in self.unsettled]
        self.blocked += sum(map(len, self.students)) - sum(map(len, waiting))
        self.students = waiting
        for i, job in enumerate(self.students):
            if job[0].teacher_key in self.ready:
                return job_config(self.students.pop(i), self.todo)
        return None if self.students else Searcher.FINISHED

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False):
        key = self.in_flight.pop(trial_id, None)
        if key is not None:
            self.unsettled.discard(key)
            if self.store.exists(key, "model.pt"):  # written last by a teacher that finished
                self.ready.add(key)


def job_config(job: list[TrialSpec], todo: Optional[set[str]] = None) -> dict:
    """A Tune trial's config: one spec, or a pack (``pack``, all its members; ``pack_todo``, the
    keys this run must finish; ``spec`` is its first, for resources and names)."""
    config = {"spec": job[0].to_dict()}
    if len(job) > 1:
        config["pack"] = [s.to_dict() for s in job]
        config["pack_todo"] = [s.trial_key for s in job if todo is None or s.trial_key in todo]
    return config


def _trial_name(trial) -> str:
    spec, pack = TrialSpec.from_dict(trial.config["spec"]), trial.config.get("pack")
    return f"{spec.label}+{len(pack) - 1}" if pack else spec.label


def _trial_dirname(trial) -> str:
    key = TrialSpec.from_dict(trial.config["spec"]).trial_key
    return f"pack-{key}" if trial.config.get("pack") else key


class _TuneNotices(logging.Filter):
    """Drops Tune's interrupt notices (its resume advice, ``Tuner.restore``, is not how kdray resumes),
    its result grid's notice that trials have no result files (kdray writes none: see ``_tune_run``),
    and its warnings that processing a result was slow: that time is kdray's MLflow callback logging
    the trial's runs (sixteen for a pack), counted in docs/benchmarks.md, and Tune's advice ("report
    results less frequently") does not apply to a trial's one final result."""
    DROP = ("Tuner.restore", "Stop signal received", "Trials did not complete", "Experiment has been interrupted",
            "Failed to fetch metrics for", "The `process_trial_result` operation took", "Processing trial results took")
    LOGGERS = ("ray.tune.tune", "ray.tune.analysis.experiment_analysis", "ray.tune.utils.util")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(d in record.getMessage() for d in self.DROP)


@contextmanager
def _graceful_interrupt(stopping: Flag):
    """The first Ctrl-C ends the Tune run through Tune's own stop path (SIGUSR1: running trials are
    stopped, the loop returns) and is remembered in ``stopping``; a second one stops at once."""
    def handler(signum, frame):
        if stopping.is_set():
            raise KeyboardInterrupt
        stopping.set()
        print("kdray: interrupted: stopping the running trials (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGUSR1)

    tune_logs = [logging.getLogger(n) for n in _TuneNotices.LOGGERS]
    notices = _TuneNotices()
    previous = signal.signal(signal.SIGINT, handler)
    for log in tune_logs:
        log.addFilter(notices)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        for log in tune_logs:
            log.removeFilter(notices)


def _tune_run(specs: list[TrialSpec], sweep: Sweep, store: Store, tracker: Tracker, trained: set[str],
              verbose: int, progress: Optional[dict[str, int]] = None,
              packs: Optional[list[list[TrialSpec]]] = None):
    """One Tune run over teachers and students; returns (callback, searcher) for the summary.
    ``verbose``: Tune's own tables; ``progress``: kdray's lines, given the trials done before, per role."""
    import ray
    from ray import tune

    tune_env = {
        # Tune's CSV, JSON and TensorBoard files would duplicate MLflow at a cost to the driver
        # (its result grid's notice that they are missing is dropped: see _TuneNotices).
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
        # Tune's experiment state (every trial's JSON, rewritten whole) is for Tuner.restore, which
        # kdray does not use (it resumes from MLflow and storage): save it rarely, not every ~10 s.
        "TUNE_GLOBAL_CHECKPOINT_S": "900",
        # Tune queues one pending trial at a time for a custom searcher; queue as many as it does
        # for a grid, so that free slots fill at once and an autoscaler sees the demand.
        "TUNE_MAX_PENDING_TRIALS_PG": str(max(200, int(ray.cluster_resources().get("CPU", 1) * 1.1))),
        # Ctrl-C is kdray's (see _graceful_interrupt): it must be counted, and resuming is kdray's.
        "TUNE_DISABLE_SIGINT_HANDLER": "1",
    }
    stopping = Flag()
    callback = MlflowCallback(tracker, store, stopping)
    searcher = TeachersFirst(specs, store, trained, packs)
    n_jobs = len(searcher.teachers) + len(searcher.students)
    callbacks = [callback]
    if progress is not None:
        from kdray.progress import Progress
        callbacks.append(Progress({s.trial_key: s.role for s in specs}, progress, callback, sweep.progress_every_s))
    logging.getLogger("ray.tune.search.searcher").setLevel(logging.ERROR)   # see TeachersFirst
    reporter = tune.CLIReporter(
        metric_columns={"kdray/epoch": "epoch", "kdray/train_loss": "train loss", "kdray/test_acc": "test acc"},
        parameter_columns={"spec/role": "role", "spec/teacher_seed": "teacher"}, max_progress_rows=8,
        max_error_rows=5, max_report_frequency=15, print_intermediate_tables=verbose > 0)
    tuner = tune.Tuner(
        tune.with_resources(trainable, _resources),
        param_space={"storage": store.uri,  # absolute, so every worker finds the same place
                     "report_every_s": sweep.report_every_s, "simulate_gpu": simulation.requested()},
        # reuse_actors: a worker process keeps torch imported and data sets in memory
        # between trials (every trial re-seeds everything it uses, so results are unchanged).
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=n_jobs,
                                    max_concurrent_trials=_concurrency(sweep, specs), reuse_actors=True,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(name="trials", storage_path=store.tune_path(), callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                                  progress_reporter=reporter, verbose=verbose,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
    with _environ(tune_env), _graceful_interrupt(stopping), _trials_on_prestarted_workers(), \
            objectstore.carried_to_trials():
        tuner.fit()
    if stopping.is_set():
        callback.end_in_flight()
    return callback, searcher


@contextmanager
def _environ(values: dict[str, str]):
    """Set environment variables for the block (where the user has not set them), then restore."""
    added = {k: v for k, v in values.items() if k not in os.environ}
    os.environ.update(added)
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def _tracker_and_ray(uri: str, sweep: Sweep, artifact_root: Optional[str]) -> tuple[Tracker, float]:
    """Open MLflow (fails before any trial if unreachable) while Ray starts: each takes seconds."""
    from concurrent.futures import ThreadPoolExecutor

    import mlflow.tracking  # noqa: F401 - imported here, never by two threads at once
    import ray  # noqa: F401

    probe(uri)  # an unreachable server fails now, before Ray starts
    with ThreadPoolExecutor(1, thread_name_prefix="kdray-start") as pool:
        opening = pool.submit(Tracker, uri, sweep.name, artifact_root, sweep.description, tuple(sweep.plugins))
        t0 = time.time()
        try:
            testhook.maybe_interrupt("ray_start")
            connect_ray()  # in the main thread: Ray installs signal handlers
            seconds = time.time() - t0
        except BaseException:   # Ctrl-C or a failed start: the sweep's run must not stay RUNNING
            if opening.exception() is None:
                opening.result().end_sweep({}, "KILLED")
            raise
        tracker = opening.result()
    return tracker, seconds


def run_sweep(sweep: Sweep, plan: Optional[Plan] = None, verbose: int = 0, progress: bool = False,
              source_sha256: str = "") -> SweepSummary:
    """Run what the plan still needs; ``verbose``: Tune's tables, ``progress``: kdray's stage lines;
    ``source_sha256``: the sweep file's SHA-256, tagged on every run this sweep starts."""
    patience_s()   # a bad $KDRAY_TRACKING_PATIENCE_S is one line before anything starts
    with _environ(MLFLOW_CLIENT_ENV):   # kdray's retries, with their one budget, are the only ones
        return _run_sweep(sweep, plan or build_plan(sweep), verbose, progress, source_sha256)


def _run_sweep(sweep: Sweep, plan: Plan, verbose: int, progress: bool, source_sha256: str = "") -> SweepSummary:
    t0 = time.time()
    store = Store(sweep.storage, sweep.name)
    uri = sweep.resolved_tracking_uri()
    artifact_root = objectstore.artifact_root(sweep.storage, sweep.name, uri)
    tracker, ray_seconds = _tracker_and_ray(uri, sweep, artifact_root)
    tracker.use_sweep_file(source_sha256)
    cluster = ray_cluster()
    summary = SweepSummary(sweep.name, len(plan.all), tracking_uri=uri, storage=store.uri, ray_start_seconds=ray_seconds,
                           started_at=t0, ray_cluster=cluster.pop("text"), gpu_hours_planned=plan.gpu_hours())
    tracker.set_tags(tracker.parent_id, cluster)
    try:
        _run_todo(summary, plan, sweep, store, tracker, verbose, progress)
        summary.seconds = time.time() - t0
        if not summary.tracking_lost:
            tracker.end_sweep({"trials_finished": summary.finished, "trials_failed": len(summary.failed),
                               "trials_interrupted": summary.interrupted + summary.not_started,
                               "trials_planned": summary.planned, "sweep_seconds": summary.seconds}, summary.status)
    except TrackingError as e:   # MLflow gone for good: nothing more can be written there
        summary.tracking_lost, summary.seconds = str(e), time.time() - t0
        accounted = (summary.skipped + summary.reused + summary.finished + len(summary.failed) + summary.blocked
                     + summary.interrupted + summary.not_started)
        summary.not_started += max(0, summary.planned - accounted)
    except BaseException:    # a second Ctrl-C, or an error: the sweep's run must not stay RUNNING
        try:                 # ... if MLflow answers soon: this must not hide the error or wait minutes
            tracker.end_sweep({}, "KILLED", patience=min(patience_s(), 5.0))
        except TrackingError:
            pass
        raise
    return summary


def _run_todo(summary: SweepSummary, plan: Plan, sweep: Sweep, store: Store, tracker: Tracker, verbose: int,
              progress: bool) -> None:
    """Skip what MLflow has, log teachers storage has, and run the rest on Tune."""
    done = tracker.finished_keys()
    todo = [s for s in plan.all if s.trial_key not in done]
    summary.skipped = len(plan.all) - len(todo)
    # Runs a killed driver left unfinished go before any trial gets its one new run.
    tracker.discard_unfinished(s.trial_key for s in todo)
    reused = [s for s in todo if s.role == "teacher" and store.exists(s.trial_key, "model.pt")]
    for spec in reused:
        log_reused_teacher(tracker, store, spec)
    summary.reused = len(reused)
    todo = [s for s in todo if s not in reused]
    training = {s.trial_key for s in todo if s.role == "teacher"}
    trained = {k for k in {s.teacher_key for s in todo if s.role == "student"} - training
               if store.exists(k, "model.pt")}      # one storage look per teacher, not per student
    runnable = [s for s in todo if s.role == "teacher" or s.teacher_key in training or s.teacher_key in trained]
    summary.blocked = len(todo) - len(runnable)   # their teacher is neither trained nor training
    todo = runnable
    if todo:
        from kdray.cluster import check_resources, check_shared_storage
        check_resources(todo, autoscaling=bool(os.environ.get("RAY_ADDRESS")))   # a local cluster cannot grow
        check_shared_storage(sweep.storage)      # a local folder on a multi-node cluster: every node's?
        n_teachers = sum(s.role == "teacher" for s in todo)
        packs, notes = plan_jobs(plan, {s.trial_key for s in todo})
        for note in notes:
            print(f"kdray: {note}", file=sys.stderr, flush=True)
        keys = {s.trial_key for s in todo}
        n_packs = sum(len(j) > 1 for j in packs)
        in_packs = sum(s.trial_key in keys for j in packs if len(j) > 1 for s in j)
        packed = f" ({in_packs} of them in {n_packs} packs)" if n_packs else ""
        print(f"kdray: {len(todo)} trials on Ray Tune: {n_teachers} teachers first, each teacher's "
              f"{len(todo) - n_teachers} students{packed} as soon as it is done", file=sys.stderr, flush=True)
        had = done | {s.trial_key for s in reused}
        done_before = {role: sum(s.role == role and s.trial_key in had for s in plan.all) for role in ("teacher", "student")}
        cb, _ = _tune_run(todo, sweep, store, tracker, trained, verbose, done_before if progress else None, packs)
        _account(summary, todo, cb)


def plan_jobs(plan: Plan, todo: set[str]) -> tuple[list[list[TrialSpec]], list[str]]:
    """The Tune trials that finish the ``todo`` students, as the plan cut them (``Plan.packing``:
    packs from every planned student, so a pack is the same students whatever ran before) that
    hold one of them, and one trial per unpacked student; with the plan's notes on students that
    cannot be packed."""
    packing = plan.packing()
    return packing.for_todo(todo), packing.notes


def _account(summary: SweepSummary, todo: list[TrialSpec], cb: MlflowCallback) -> None:
    """Each trial handed to Tune is finished, failed, interrupted, blocked (its teacher failed) or not started."""
    summary.finished = len(cb.finished)
    summary.failed.update(cb.failed)
    summary.interrupted = len(cb.interrupted)
    summary.suspect = list(cb.suspect)
    summary.retried, summary.restarts = len(cb.retries), sum(cb.retries.values())
    summary.gpu_seconds = cb.gpu_seconds
    summary.tracking_lost = cb.lost
    if cb.first_start_at is not None:
        summary.first_trial_seconds = cb.first_start_at - summary.started_at
    summary.stopped = cb.stopping.is_set() and not cb.lost
    ended = cb.ended_keys()
    left = [s for s in todo if s.trial_key not in ended]
    blocked = sum(s.role == "student" and s.teacher_key in cb.failed for s in left)
    summary.blocked += blocked
    summary.not_started = len(left) - blocked
