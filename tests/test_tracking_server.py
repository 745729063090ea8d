"""A sweep logging to a real `mlflow server` over HTTP that is killed mid-sweep and restarted:
the retries carry the sweep through, nothing is lost and no run is duplicated."""
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest
import requests
import yaml

from kdray.plan import build_plan
from kdray.sweep import load_sweep

KDRAY = [sys.executable, "-m", "kdray.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(tmp_path, port):
    p = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
                          "--artifacts-destination", str(tmp_path / "server-artifacts"), "--host", "127.0.0.1",
                          "--port", str(port), "--workers", "1"], start_new_session=True, cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return p
        except requests.RequestException:
            time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL)
    raise AssertionError("mlflow server did not start")


def _kill(p):
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)   # the server and its own workers: this test's children only
        p.wait()


def _runs(db, status=None):
    try:
        with sqlite3.connect(db) as c:
            q = ("select r.name, r.status, t2.value from runs r join tags t on r.run_uuid = t.run_uuid "
                 "left join tags t2 on r.run_uuid = t2.run_uuid and t2.key = 'kdray.trial_key' "
                 "where t.key = 'kdray.kind' and t.value = 'trial' and r.lifecycle_stage = 'active'")
            rows = c.execute(q).fetchall()
    except sqlite3.Error:
        return []
    return [r for r in rows if status is None or r[1] == status]


@pytest.mark.slow
def test_a_tracking_server_killed_mid_sweep_and_restarted_loses_and_duplicates_nothing(tmp_path):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    path = tmp_path / "served.yaml"
    path.write_text(yaml.safe_dump({"name": "served", "storage": str(tmp_path / "results"), "tracking_uri": uri,
                                    "report_every_s": 0, "setups": [{
        "name": "d", "dataset": {"name": "digits"}, "teacher": {"arch": "small_cnn", "args": {"channels": 8}},
        "recipe": {"epochs": 4, "batch_size": 128, "lr": 0.01}, "teacher_recipe": {"epochs": 100},
        "teacher_seeds": [0], "student_seeds": [10, 11], "conditions": {"siddo": True, "kd": {"alphas": [0.5]},
                                                                         "rcd": None}}]}))
    plan = build_plan(load_sweep(path))
    db = tmp_path / "server.db"
    server = _start_server(tmp_path, port)
    sweep = subprocess.Popen(KDRAY + ["sweep", str(path), "--quiet"], start_new_session=True, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 180
        while not _runs(db, "RUNNING") and time.time() < deadline and sweep.poll() is None:
            time.sleep(0.2)
        assert sweep.poll() is None, "the sweep ended before the server could be killed"
        time.sleep(1.0)
        _kill(server)                            # mid-teacher: its epochs are being logged
        time.sleep(6.0)
        assert sweep.poll() is None, sweep.communicate()[1][-3000:]
        server = _start_server(tmp_path, port)
        out, err = sweep.communicate(timeout=600)
    finally:
        _kill(sweep)
        _kill(server)
    assert sweep.returncode == 0, err[-3000:]
    assert "5 trials finished now" in out, out
    runs = _runs(db)
    assert sorted(r[2] for r in runs) == sorted(s.trial_key for s in plan.all)   # each planned trial once
    assert all(r[1] == "FINISHED" for r in runs), runs
    with sqlite3.connect(db) as c:        # every teacher epoch reached the server
        steps = c.execute("select count(distinct m.step) from metrics m join runs r on m.run_uuid = r.run_uuid "
                          "where r.name = 'd-teacher-t0' and m.key = 'train_loss'").fetchone()[0]
    assert steps == 100
