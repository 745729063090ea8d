"""Faults injected for real: a killed driver, a killed trial worker, a diverging trial."""
import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from kdray.plan import build_plan
from kdray.recipe import run_trial
from kdray.storage import Store
from kdray.sweep import load_sweep

KDRAY = [sys.executable, "-m", "kdray.cli"]


def write_sweep(tmp_path, name, setup_over=None, **top) -> Path:
    setup = {"name": "d", "dataset": {"name": "digits"}, "teacher": {"arch": "small_cnn", "args": {"channels": 8}},
             "recipe": {"epochs": 3, "batch_size": 128, "lr": 0.01}, "teacher_seeds": [0], "student_seeds": [10, 11, 12],
             "conditions": {"siddo": True, "kd": {"alphas": [0.5, 0.9]}, "rcd": {"alphas": [0.5]}}}
    setup.update(setup_over or {})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "storage": str(tmp_path / "results"), **top, "setups": [setup]}))
    return path


def finished_runs(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db) as c:
            return c.execute("select count(*) from runs r join tags t on r.run_uuid = t.run_uuid "
                             "where t.key = 'kdray.kind' and t.value = 'trial' and r.status = 'FINISHED'").fetchone()[0]
    except sqlite3.Error:
        return 0


def trial_runs(sweep_path: Path):
    sweep = load_sweep(sweep_path)
    client = MlflowClient(sweep.resolved_tracking_uri())
    exp = client.get_experiment_by_name(sweep.name)
    return client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'", max_results=1000)


def test_killed_driver_resumes_to_exactly_the_planned_runs(tmp_path):
    path = write_sweep(tmp_path, "crash")
    plan = build_plan(load_sweep(path))
    db = tmp_path / "results" / "mlflow.db"
    p = subprocess.Popen(KDRAY + ["sweep", str(path), "--quiet"], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while finished_runs(db) < 4 and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    assert p.poll() is None, "the sweep ended before it could be killed"
    os.killpg(p.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
    p.wait()
    before = {r.data.tags["kdray.trial_key"]: r.info.run_id for r in trial_runs(path) if r.info.status == "FINISHED"}
    assert 4 <= len(before) < len(plan.all)

    done = subprocess.run(KDRAY + ["sweep", str(path), "--resume", "--quiet"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{len(before)} already done" in done.stdout

    runs = trial_runs(path)
    keys = [r.data.tags["kdray.trial_key"] for r in runs]
    assert sorted(keys) == sorted(s.trial_key for s in plan.all)  # every planned trial, once
    assert all(r.info.status == "FINISHED" for r in runs)
    after = {r.data.tags["kdray.trial_key"]: r.info.run_id for r in runs}
    assert all(after[k] == run_id for k, run_id in before.items())  # nothing finished was retrained


def _worker_pids():
    return [p.pid for p in psutil.process_iter(["cmdline"]) if "ImplicitFunc" in " ".join(p.info["cmdline"] or [])]


def test_killed_trial_worker_resumes_from_its_checkpoint_bit_identically(tmp_path):
    path = write_sweep(tmp_path, "workerkill",
                       {"recipe": {"epochs": 40, "batch_size": 64, "lr": 0.005, "checkpoint_every": 2},
                        "teacher": {"arch": "small_cnn", "args": {"channels": 24}},
                        "conditions": {"siddo": False, "kd": None, "rcd": None, "ls": {"epsilons": [0.1]}},
                        "student_seeds": [10]}, max_failures=2)
    db = tmp_path / "results" / "mlflow.db"
    p = subprocess.Popen(KDRAY + ["sweep", str(path), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def epochs_logged() -> int:
        try:
            with sqlite3.connect(db) as c:
                row = c.execute("select max(step) from metrics where key = 'train_loss'").fetchone()
                return row[0] or 0
        except sqlite3.Error:
            return 0

    deadline = time.time() + 240
    while epochs_logged() < 7 and time.time() < deadline and p.poll() is None:
        time.sleep(0.1)
    pids = _worker_pids()
    assert pids and p.poll() is None, "no running trial worker to kill"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]

    sweep = load_sweep(path)
    teacher = build_plan(sweep).teachers[0]
    run = next(r for r in trial_runs(path) if r.data.tags["kdray.trial_key"] == teacher.trial_key)
    assert run.data.tags.get("kdray.retries") == "1"   # a lost worker is retried (max_failures), and it shows
    client = MlflowClient(sweep.resolved_tracking_uri())
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert steps.count(1) == 1, f"restarted from scratch: {steps}"
    assert len(steps) > len(set(steps)), f"no epoch was repeated after the restore: {steps}"

    store = Store(sweep.storage, sweep.name)
    recovered = np.load(io.BytesIO(store.read_bytes(teacher.trial_key, "test_outputs.npz")))["logits"]
    clean = Store(str(tmp_path / "clean"), sweep.name)
    run_trial(teacher, clean)
    uninterrupted = np.load(io.BytesIO(clean.read_bytes(teacher.trial_key, "test_outputs.npz")))["logits"]
    assert np.array_equal(recovered, uninterrupted)


def test_diverging_trial_is_failed_with_its_reason_and_reported_as_excluded(tmp_path):
    path = write_sweep(tmp_path, "nan", {"teacher": {"arch": "mlp"},
                                         "student_recipe": {"lr": 1000, "optimizer": "sgd", "batch_size": 32},
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
