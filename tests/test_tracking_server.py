"""A sweep logging to a real `mlflow server` over HTTP that is killed mid-sweep and restarted:
the retries carry the sweep through, nothing is lost and no run is duplicated.  The server's
backend is sqlite and, as documented for clusters, a real PostgreSQL the suite starts itself."""
import os
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

from benchmarks.servers import Missing, free_port, postgresql, start_mlflow_server, stop_mlflow_server
from kdray.plan import build_plan
from kdray.sweep import load_sweep
from kdray.tracking import seed_sqlite_store

KDRAY = [sys.executable, "-m", "kdray.cli"]


def _missing(reason: str):
    """Fail under CI (``$CI`` set), skip with the reason elsewhere (as tests/conftest.py does for data)."""
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of our own on a free 127.0.0.1 port (benchmarks/servers.py); stopped at the end."""
    try:
        with postgresql() as uri:
            yield uri
    except Missing as e:
        _missing(str(e))


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path):
    """The server's backend store URI."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'server.db'}"
    return request.getfixturevalue("postgres")


def _query(backend_uri, sql):
    """Rows of ``sql`` on the server's own backend store (sqlite file or PostgreSQL), [] if not there yet."""
    if backend_uri.startswith("sqlite"):
        try:
            with sqlite3.connect(backend_uri[len("sqlite:///"):]) as c:
                return c.execute(sql).fetchall()
        except sqlite3.Error:
            return []
    import psycopg2
    try:
        with psycopg2.connect(backend_uri.replace("+psycopg2", "")) as c, c.cursor() as cur:
            cur.execute(sql)
            return cur.fetchall()
    except psycopg2.Error:
        return []


def _start_server(tmp_path, port, backend_uri):
    """A new sqlite backend starts as kdray's copy of an empty MLflow schema (kdray/tracking.py, as every
    sweep's own sqlite store does), so the server does not run MLflow's migrations (~20 s) at its start."""
    seed_sqlite_store(backend_uri)
    return start_mlflow_server(tmp_path, port, backend_uri)


def _kill(p):
    stop_mlflow_server(p)


def _runs(db, status=None):
    q = ("select r.name, r.status, t2.value from runs r join tags t on r.run_uuid = t.run_uuid "
         "left join tags t2 on r.run_uuid = t2.run_uuid and t2.key = 'kdray.trial_key' "
         "where t.key = 'kdray.kind' and t.value = 'trial' and r.lifecycle_stage = 'active'")
    rows = _query(db, q)
    return [r for r in rows if status is None or r[1] == status]


def _served_sweep(tmp_path, name, uri, epochs, teacher_epochs, student_seeds):
    """A digits sweep logging to ``uri``: a teacher long enough to kill the server during it, SIDDO + KD."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "storage": str(tmp_path / "results"), "tracking_uri": uri,
                                    "report_every_s": 0, "setups": [{
        "name": "d", "dataset": {"name": "digits"}, "teacher": {"arch": "small_cnn", "args": {"channels": 8}},
        "recipe": {"epochs": epochs, "batch_size": 128, "lr": 0.01}, "teacher_recipe": {"epochs": teacher_epochs},
        "teacher_seeds": [0], "student_seeds": student_seeds,
        "conditions": {"siddo": True, "kd": {"alphas": [0.5]}, "rcd": None}}]}))
    return path


def _start_sweep(path, db, env=None) -> subprocess.Popen:
    """``kdray sweep`` in its own session, returned once a trial run is RUNNING on the server."""
    sweep = subprocess.Popen(KDRAY + ["sweep", str(path), "--quiet"], start_new_session=True, text=True, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 180
    while not _runs(db, "RUNNING") and time.time() < deadline and sweep.poll() is None:
        time.sleep(0.2)
    if sweep.poll() is not None:
        _kill(sweep)
        raise AssertionError("the sweep ended before the server could be killed")
    return sweep


@pytest.mark.slow
def test_the_tests_postgresql_wants_a_password(postgres):
    """Not trust authentication: without the password nobody on 127.0.0.1 gets in."""
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url(postgres)
    args = dict(host=url.host, port=url.port, user=url.username, dbname=url.database)
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(**args, password="wrong")
    with psycopg2.connect(**args, password=url.password) as c, c.cursor() as cur:
        cur.execute("select 1")
        assert cur.fetchone() == (1,)


def test_a_tracking_server_killed_mid_sweep_and_restarted_loses_and_duplicates_nothing(tmp_path, backend):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    path = _served_sweep(tmp_path, "served", uri, epochs=4, teacher_epochs=100, student_seeds=[10, 11])
    plan = build_plan(load_sweep(path))
    db = backend
    server = _start_server(tmp_path, port, backend)
    sweep = None
    try:
        sweep = _start_sweep(path, db)
        time.sleep(1.0)
        _kill(server)                            # mid-teacher: its epochs are being logged
        time.sleep(6.0)
        assert sweep.poll() is None, sweep.communicate()[1][-3000:]
        server = _start_server(tmp_path, port, backend)
        out, err = sweep.communicate(timeout=600)
    finally:
        if sweep is not None:
            _kill(sweep)
        _kill(server)
    assert sweep.returncode == 0, err[-3000:]
    assert "5 trials finished now" in out, out
    assert "View run" not in out, out          # MLflow's per-run URL lines: one per trial, off
    runs = _runs(db)
    assert sorted(r[2] for r in runs) == sorted(s.trial_key for s in plan.all)   # each planned trial once
    assert all(r[1] == "FINISHED" for r in runs), runs
    # every teacher epoch reached the server
    steps = _query(db, "select count(distinct m.step) from metrics m join runs r on m.run_uuid = r.run_uuid "
                       "where r.name = 'd-teacher-t0' and m.key = 'train_loss'")[0][0]
    assert steps == 100
    # the report reads the database's tables itself (kdray/analysis/sqlruns.py): same frame as MLflow's client
    import pandas as pd
    from kdray.analysis.runs import load_runs
    direct = load_runs(db, "served")
    assert len(direct) == len(plan.all)
    pd.testing.assert_frame_equal(direct, load_runs(db, "served", direct=False))


@pytest.mark.slow
def test_a_tracking_server_that_stays_down_stops_the_sweep_in_one_line_and_it_resumes_later(tmp_path):
    """Past ``KDRAY_TRACKING_PATIENCE_S`` the sweep stops (exit 75, one line naming the server); rerun
    once the server is back, it finishes every planned trial with one run each."""
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    path = _served_sweep(tmp_path, "down", uri, epochs=3, teacher_epochs=60, student_seeds=[10])
    plan = build_plan(load_sweep(path))
    db = f"sqlite:///{tmp_path / 'server.db'}"
    server = _start_server(tmp_path, port, db)
    env = {**os.environ, "KDRAY_TRACKING_PATIENCE_S": "4"}
    sweep = None
    try:
        sweep = _start_sweep(path, db, env)
        _kill(server)                            # and it stays down
        t_kill = time.time()
        out, err = sweep.communicate(timeout=240)
        stopped_after = time.time() - t_kill
    finally:
        if sweep is not None:
            _kill(sweep)
        _kill(server)
    assert sweep.returncode == 75, (out, err[-3000:])
    assert "Traceback" not in out + err, err[-3000:]
    said = [ln for ln in err.splitlines() if "stopping the running trials" in ln]
    assert len(said) == 1 and f"MLflow tracking at {uri} did not answer for" in said[0], err[-3000:]
    assert f"TRACKING LOST: MLflow tracking at {uri} did not answer" in out, out
    assert "3 of 3 trials did not run to the end" in out and "0 trials finished now" in out, out
    assert "1 interrupted" in out, out          # the teacher, whose epochs were being logged
    assert stopped_after < 120, stopped_after          # the patience, not MLflow's own minutes of retries

    server = _start_server(tmp_path, port, db)
    try:
        again = subprocess.run(KDRAY + ["sweep", str(path), "--quiet"], text=True, capture_output=True, timeout=600)
    finally:
        _kill(server)
    assert again.returncode == 0, again.stderr[-3000:]
    runs = _runs(db)
    assert sorted(r[2] for r in runs) == sorted(s.trial_key for s in plan.all)   # each planned trial once
    assert all(r[1] == "FINISHED" for r in runs), runs
    sweeps = _query(db, "select r.status from runs r join tags t on r.run_uuid = t.run_uuid where t.key = "
                        "'kdray.kind' and t.value = 'sweep' and r.lifecycle_stage = 'active'")
    assert sweeps == [("FINISHED",)], sweeps
