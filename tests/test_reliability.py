"""Faults injected for real: a killed driver, a killed trial worker, a diverging trial.

The crashes happen at a fixed point through kdray's test-only hook (kdray/testhook.py:
``KDRAY_TEST_EXIT_AT``), so nothing races; the only processes signalled are the ones this
test started (its sweep's own process group).
"""
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from kdray.plan import build_plan
from kdray.recipe import run_trial
from kdray.storage import Store
from kdray.sweep import load_sweep
from kdray.testhook import ENV as EXIT_AT, EXIT_STATUS
from sweeps import SMALL_GRID, sweep_dict, write_sweep

KDRAY = [sys.executable, "-m", "kdray.cli"]
pytestmark = pytest.mark.slow     # each test runs whole sweeps in a subprocess (its own Ray cluster)


def sweep_file(tmp_path, name, setup_over=None, **top) -> Path:
    setup = {**SMALL_GRID, "name": "d", "teacher": {"arch": "small_cnn", "args": {"channels": 8}},
             "recipe": {"epochs": 3, "batch_size": 128, "lr": 0.01}, "student_seeds": [10, 11, 12],
             "conditions": {"siddo": True, "kd": {"alphas": [0.5, 0.9]}, "rcd": {"alphas": [0.5]}}}
    data = sweep_dict(name, tmp_path / "results", top=top, **{**setup, **(setup_over or {})})
    return write_sweep(tmp_path / f"{name}.yaml", data)


def exit_at(where: str, label: str, epoch, marker: Path | None = None) -> dict:
    """The environment that makes ``where`` crash at ``epoch`` of the trial labelled ``label``."""
    return {**os.environ, EXIT_AT: ":".join([where, label, str(epoch)] + ([str(marker)] if marker else []))}


def kill_own_group(p: subprocess.Popen) -> None:
    """Whatever is left of the sweep this test started in its own session (its local Ray cluster)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def crash_driver_at(path: Path, label: str, epoch) -> None:
    """Run the sweep until its driver crashes once ``label``'s run is FINISHED at ``epoch``."""
    p = subprocess.Popen(KDRAY + ["sweep", str(path), "--quiet"], start_new_session=True,
                         env=exit_at("driver", label, epoch), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert p.wait(timeout=300) == EXIT_STATUS, "the driver did not crash at the planned point"
    finally:
        kill_own_group(p)  # the local Ray cluster the dead driver had started


def trial_runs(sweep_path: Path):
    sweep = load_sweep(sweep_path)
    client = MlflowClient(sweep.resolved_tracking_uri())
    exp = client.get_experiment_by_name(sweep.name)
    return client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'", max_results=1000)


def test_killed_driver_resumes_to_exactly_the_planned_runs(tmp_path):
    path = sweep_file(tmp_path, "crash")
    plan = build_plan(load_sweep(path))
    crash = next(s for s in plan.students if s.method == "kd")   # the driver dies once this one is logged
    crash_driver_at(path, crash.label, 3)
    before = {r.data.tags["kdray.trial_key"]: r.info.run_id for r in trial_runs(path) if r.info.status == "FINISHED"}
    assert crash.trial_key in before and plan.teachers[0].trial_key in before
    assert len(before) < len(plan.all)

    done = subprocess.run(KDRAY + ["sweep", str(path), "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{len(before)} already done" in done.stdout

    runs = trial_runs(path)
    keys = [r.data.tags["kdray.trial_key"] for r in runs]
    assert sorted(keys) == sorted(s.trial_key for s in plan.all)  # every planned trial, once
    assert all(r.info.status == "FINISHED" for r in runs)
    after = {r.data.tags["kdray.trial_key"]: r.info.run_id for r in runs}
    assert all(after[k] == run_id for k, run_id in before.items())  # nothing finished was retrained


def test_killed_trial_worker_resumes_from_its_checkpoint_bit_identically(tmp_path):
    # report_every_s 0: epoch 7 reaches MLflow before the worker dies, so the re-run epoch shows twice
    path = sweep_file(tmp_path, "workerkill",
                      {"recipe": {"epochs": 12, "batch_size": 64, "lr": 0.005, "checkpoint_every": 2},
                       "teacher": {"arch": "small_cnn", "args": {"channels": 24}},
                       "conditions": {"siddo": False, "kd": None, "rcd": None, "ls": {"epsilons": [0.1]}},
                       "student_seeds": [10]}, max_failures=2, report_every_s=0)
    sweep = load_sweep(path)
    teacher = build_plan(sweep).teachers[0]
    fired = tmp_path / "worker-exited"       # the hook fires once: the restarted worker carries on
    p = subprocess.Popen(KDRAY + ["sweep", str(path), "--quiet"], start_new_session=True,
                         env=exit_at("worker", teacher.label, 7, fired), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = p.communicate(timeout=600)
    finally:
        kill_own_group(p)
    assert p.returncode == 0, out[-3000:]
    assert fired.exists(), "the worker never reached the planned crash"

    run = next(r for r in trial_runs(path) if r.data.tags["kdray.trial_key"] == teacher.trial_key)
    assert run.data.tags.get("kdray.retries") == "1"   # a lost worker is retried (max_failures), and it shows
    client = MlflowClient(sweep.resolved_tracking_uri())
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert steps.count(1) == 1, f"restarted from scratch: {steps}"
    # epoch 7 trained twice (crash, then from epoch 6's checkpoint); nothing before the checkpoint
    # re-trained (Tune may replay the checkpoint's own report: epoch 6 may show twice)
    assert set(steps) == set(range(1, 13)) and steps.count(7) == 2, f"not resumed from epoch 6: {steps}"
    assert all(steps.count(e) == 1 for e in range(1, 6)), f"re-trained epochs before the checkpoint: {steps}"

    store = Store(sweep.storage, sweep.name)
    recovered = np.load(io.BytesIO(store.read_bytes(teacher.trial_key, "test_outputs.npz")))["logits"]
    clean = Store(str(tmp_path / "clean"), sweep.name)
    run_trial(teacher, clean)
    uninterrupted = np.load(io.BytesIO(clean.read_bytes(teacher.trial_key, "test_outputs.npz")))["logits"]
    assert np.array_equal(recovered, uninterrupted)


def test_diverging_trial_is_failed_with_its_reason_and_reported_as_excluded(tmp_path):
    path = sweep_file(tmp_path, "nan", {"teacher": {"arch": "mlp"},
                                         # lr * weight_decay = 10: the weights overflow within a few dozen steps
                                         "student_recipe": {"lr": 100, "optimizer": "sgd", "weight_decay": 0.1},
                                         "conditions": {"siddo": True, "kd": {"alphas": [0.5]}, "rcd": None},
                                         "student_seeds": [10, 11]})
    p = subprocess.run(KDRAY + ["sweep", str(path), "--quiet"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 1  # the sweep ran, some trials failed
    assert "TrialDiverged: training loss is" in p.stdout
    runs = trial_runs(path)
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 4 and all("training loss is" in r.data.tags["kdray.failure"] for r in failed)
    rep = subprocess.run(KDRAY + ["report", str(path), "--out", str(tmp_path / "report")], capture_output=True,
                         text=True, timeout=300)
    assert rep.returncode == 0, rep.stderr
    excluded = (tmp_path / "report" / "tables" / "excluded.md").read_text()
    assert excluded.count("training loss is") == 4


def test_tracking_retries_wait_out_a_blip_stop_at_the_patience_and_never_retry_a_permanent_error(monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from kdray.tracking import PATIENCE_ENV, TrackingError, patience_s, retry

    calls = []

    def flaky():                       # down twice, then answers
        calls.append(time.monotonic())
        if len(calls) < 3:
            raise ConnectionError("connection refused")
        return "ok"

    assert retry(flaky, "log_metrics", "http://h:1", patience=10, delay=0.01) == "ok" and len(calls) == 3

    down = []
    t0 = time.monotonic()
    with pytest.raises(TrackingError) as e:
        retry(lambda: down.append(1) or (_ for _ in ()).throw(ConnectionError("refused")), "log_metrics",
              "http://h:1", patience=0.3, delay=0.01)
    assert 0.3 <= time.monotonic() - t0 < 2.0 and len(down) >= 3
    assert str(e.value).startswith("MLflow tracking at http://h:1 did not answer for 0 s (log_metrics: ConnectionError")

    bad = []
    with pytest.raises(MlflowException):
        retry(lambda: bad.append(1) or (_ for _ in ()).throw(
            MlflowException("no such run", error_code=RESOURCE_DOES_NOT_EXIST)), "set_tag", patience=10)
    assert len(bad) == 1

    monkeypatch.setenv(PATIENCE_ENV, "12.5")
    assert patience_s() == 12.5
    for raw in ("soon", "-1", "nan", "inf"):
        monkeypatch.setenv(PATIENCE_ENV, raw)
        with pytest.raises(TrackingError, match=PATIENCE_ENV):
            patience_s()
