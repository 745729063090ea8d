"""Silent nonsense made loud: chance accuracy and diverging losses flagged; deterministic errors not retried."""
import math
import sqlite3
import subprocess
import sys

import pytest
import torch
import yaml

from kdray.engine import deterministic
from kdray.errors import DataNotFoundError
from kdray.recipe import TrialDiverged
from kdray.sanity import report_lines, suspicion

KDRAY = [sys.executable, "-m", "kdray.cli"]


def test_chance_and_divergence_are_judged_against_one_over_k():
    assert "at chance (1/10 = 0.100)" in suspicion({"test_acc": 0.11, "chance_acc": 0.1})
    assert "at chance (1/4 = 0.250)" in suspicion({"test_acc": 0.3125, "chance_acc": 0.25})   # 1.25 x 1/4
    assert suspicion({"test_acc": 0.32, "chance_acc": 0.25}) == ""
    assert "rose from 2.3 (first epoch) to 7.5" in suspicion({"train_loss_first": 2.3, "train_loss": 7.5})
    assert suspicion({"test_acc": 0.9, "chance_acc": 0.1, "train_loss_first": 2.3, "train_loss": 0.1}) == ""
    assert suspicion({"test_acc": math.nan, "chance_acc": 0.1}) == ""        # nothing to judge


def test_the_report_section_names_teachers_against_chance_and_every_suspect():
    runs = [{"status": "FINISHED", "role": "teacher", "setup": "d", "method": "teacher", "teacher_seed": 0,
             "test_acc": 0.95, "chance_acc": 0.1},
            {"status": "FINISHED", "role": "student", "setup": "d", "method": "kd", "teacher_seed": 0,
             "student_seed": 3, "test_acc": 0.5, "chance_acc": 0.1, "train_loss_first": 1.0, "train_loss": 4.0},
            {"status": "FAILED", "role": "student", "test_acc": 0.0, "chance_acc": 0.1}]
    lines = report_lines(runs)
    assert lines[0] == "sanity: teachers' test accuracy 0.950..0.950 over 1 teacher(s); chance (1/K) 0.100"
    assert lines[1].startswith("warning: 1 of 2 finished trials looks like nonsense")
    assert lines[2].startswith("  suspect student d-kd-t0-s3: training loss rose") and len(lines) == 3


def test_bugs_are_deterministic_and_lost_resources_are_not():
    with pytest.raises(RuntimeError) as shape:
        torch.nn.Linear(3, 2)(torch.zeros(1, 4))          # torch's own shape-mismatch error
    assert deterministic(shape.value)
    for e in (ValueError("bad argument"), TypeError("x"), KeyError("k"), TrialDiverged("nan"),
              DataNotFoundError("no files")):
        assert deterministic(e), e
    for e in (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), ConnectionError("node lost"),
              OSError("disk"), RuntimeError("NCCL error: unhandled system error")):
        assert not deterministic(e), e


def _tags(db, key):
    with sqlite3.connect(db) as c:
        return dict(c.execute("select r.name, t.value from runs r join tags t on r.run_uuid = t.run_uuid "
                              "where t.key = ?", (key,)).fetchall())


def _write(tmp_path, name, setup, **top):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "storage": str(tmp_path / "results"), **top, "setups": [{
        "name": "d", "teacher_seeds": [0], "student_seeds": [10, 11],
        "conditions": {"siddo": True, "kd": None, "rcd": None}, **setup}]}))
    return path


@pytest.mark.slow
def test_a_sweep_at_chance_is_flagged_in_summary_and_report_and_exits_1(tmp_path):
    path = _write(tmp_path, "chance", {"dataset": {"name": "digits"}, "teacher": {"arch": "small_cnn"},
                                       "recipe": {"epochs": 2, "lr": 1e-9, "optimizer": "sgd"}})
    p = subprocess.run(KDRAY + ["sweep", str(path), "--quiet"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "3 trials finished now" in p.stdout
    assert "WARNING: every finished trial looks like nonsense (1 teacher(s))" in p.stdout, p.stdout
    assert "suspect teacher d-teacher-t0: test accuracy" in p.stdout
    suspects = _tags(tmp_path / "results" / "mlflow.db", "kdray.suspect")
    assert len(suspects) == 3 and all("at chance (1/10 = 0.100)" in v for v in suspects.values()), suspects
    rep = subprocess.run(KDRAY + ["report", str(path), "--out", str(tmp_path / "rep"), "--jobs", "1"],
                         capture_output=True, text=True, timeout=600)
    assert rep.returncode == 0, rep.stderr[-3000:]
    summary = (tmp_path / "rep" / "summary.txt").read_text()
    assert "sanity: teachers' test accuracy" in summary and "chance (1/K) 0.100" in summary
    assert "WARNING: every finished trial looks like nonsense" in rep.stdout


@pytest.mark.slow
def test_a_deterministic_error_is_not_retried(tmp_path):
    (tmp_path / "empty").mkdir()
    path = _write(tmp_path, "det", {"dataset": {"name": "fsdd"}, "teacher": {"arch": "mlp"}, "recipe": {"epochs": 1}},
                  data_root=str(tmp_path / "empty"), max_failures=3)
    p = subprocess.run(KDRAY + ["sweep", str(path), "--quiet"], capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]
    assert "0 trials finished now, 0 already done, 0 teachers reused from storage, 1 failed, " \
           "2 blocked by a failed teacher, 0 interrupted, 0 not started; 3 planned" in p.stdout, p.stdout
    db = tmp_path / "results" / "mlflow.db"
    failures = _tags(db, "kdray.failure")
    assert list(failures) == ["d-teacher-t0"] and failures["d-teacher-t0"].startswith("DataNotFoundError: ")
    assert _tags(db, "kdray.retries") == {}        # max_failures 3, but the same error would recur


def test_progress_lines_and_status_counts_add_up():
    from kdray.progress import StageCounts, eta, status_counts

    c = StageCounts("student", 10, done=4, running=2, failed=1)
    assert c.pending == 3
    assert eta(c, 40.0) == 50.0                       # 5 left at 10 s per finished trial
    assert eta(StageCounts("teacher", 2), 5.0) is None  # nothing finished yet: no pace
    assert c.line(50.0) == "students  4/10 done, 2 running, 3 pending, 1 failed; ETA 0:00:50"
    roles = {"t": "teacher", "u": "teacher", "a": "student", "b": "student", "c": "student"}
    counts = status_counts(roles, {"t": "KILLED", "a": "FINISHED", "b": "RUNNING"}, stored={"t"})
    assert [c.line() for c in counts] == ["teachers  1/2 done, 0 running, 1 pending, 0 failed",
                                          "students  1/3 done, 1 running, 1 pending, 0 failed"]
