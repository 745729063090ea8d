"""Ctrl-C to a real `kdray sweep`: never exit 0, every planned trial accounted for, nothing left RUNNING."""
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from procs import default_sigint

KDRAY = [sys.executable, "-m", "kdray.cli"]
COUNTS = re.compile(r"(\d+) trials finished now, (\d+) already done, (\d+) teachers reused from storage, (\d+) failed, "
                    r"(\d+) blocked by a failed teacher, (\d+) interrupted, (\d+) not started; (\d+) planned")


def _sweep(tmp_path, teacher_epochs=60):
    path = tmp_path / "intr.yaml"
    path.write_text(yaml.safe_dump({"name": "intr", "storage": str(tmp_path / "results"), "progress_every_s": 0,
                                    "setups": [{
        "name": "d", "dataset": {"name": "digits"}, "teacher": {"arch": "small_cnn", "args": {"channels": 8}},
        "recipe": {"epochs": 2, "batch_size": 128, "lr": 0.01}, "teacher_recipe": {"epochs": teacher_epochs},
        "teacher_seeds": [0], "student_seeds": [10, 11],
        "conditions": {"siddo": True, "kd": {"alphas": [0.5]}, "rcd": None}}]}))
    return path


def _runs_with_status(db, status):
    try:
        with sqlite3.connect(db) as c:
            return c.execute("select count(*) from runs where status = ?", (status,)).fetchone()[0]
    except sqlite3.Error:
        return 0


def _counts(stdout):
    m = COUNTS.search(stdout)
    assert m, stdout[-3000:]
    return [int(x) for x in m.groups()]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["driver", "process group"])
def test_sigint_exits_130_and_accounts_for_every_planned_trial(tmp_path, target):
    path = _sweep(tmp_path)
    db = tmp_path / "results" / "mlflow.db"
    p = subprocess.Popen(KDRAY + ["sweep", str(path)], start_new_session=True, text=True, preexec_fn=default_sigint,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while _runs_with_status(db, "RUNNING") < 2 and time.time() < deadline and p.poll() is None:
            time.sleep(0.2)            # the sweep's run and the teacher's run
        assert p.poll() is None, "the sweep ended before it could be interrupted"
        time.sleep(1.0)                # the teacher is training
        if target == "driver":
            p.send_signal(signal.SIGINT)
        else:
            os.killpg(p.pid, signal.SIGINT)   # Ctrl-C in a terminal: this sweep's own group
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, (out[-2000:], err[-3000:])
    finished, skipped, reused, failed, blocked, interrupted, not_started, planned = _counts(out)
    assert planned == 5 and finished + skipped + reused + failed + blocked + interrupted + not_started == planned
    assert interrupted == 1 and not_started == 4 and failed == 0, out   # the teacher was running
    assert "run the same command again to resume" in out + err
    assert "Tuner.restore" not in out + err and "Traceback" not in err, err[-3000:]
    assert _runs_with_status(db, "RUNNING") == 0        # no trial run and no sweep run left RUNNING
    assert _runs_with_status(db, "KILLED") == 2         # the teacher and the sweep

    # kdray's progress lines (not Tune's tables), and `kdray status` counts the same from MLflow and storage
    assert "kdray: teachers  0/1 done, 1 running, 0 pending, 0 failed" in err, err[-3000:]
    assert "kdray: students  0/4 done, 0 running, 4 pending, 0 failed" in err and "== Status ==" not in out + err
    status = subprocess.run(KDRAY + ["status", str(path)], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0, status.stderr[-2000:]
    lines = status.stdout.splitlines()
    teacher_done = int((tmp_path / "results" / "trials").exists() and any(
        (d / "model.pt").exists() for d in (tmp_path / "results" / "trials").iterdir()))
    assert lines[0].startswith(f"sweep intr: {teacher_done}/5 trials done"), status.stdout
    assert lines[1] == (f"teachers  {teacher_done}/1 done, 0 running, 0 pending, 0 failed"
                        + ("" if teacher_done else ", 1 interrupted")), status.stdout
    assert lines[2] == "students  0/4 done, 0 running, 4 pending, 0 failed", status.stdout

    if target == "driver":   # resuming finishes exactly the plan (with Tune's own tables: --verbose)
        done = subprocess.run(KDRAY + ["sweep", str(path), "--verbose"], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "== Status ==" in done.stdout + done.stderr and "kdray: students " not in done.stderr
        finished, skipped, reused = _counts(done.stdout)[:3]
        assert skipped == 0 and finished + reused == 5, done.stdout   # a teacher whose model was written is reused
        client = MlflowClient(f"sqlite:///{db}")
        exp = client.get_experiment_by_name("intr")
        runs = client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'")
        assert len(runs) == 5 and all(r.info.status == "FINISHED" for r in runs)
        assert len({r.data.tags["kdray.trial_key"] for r in runs}) == 5
