"""Damaged MLflow databases, sweep names that collide with storage, bad YAML in report, and `kdray ui`:
one line, a non-zero exit, nothing modified, nothing started."""
import os
import signal
import socket
import sqlite3
import subprocess
import sys

import pytest
import yaml

from kdray.cli import main
from procs import default_sigint

KDRAY = [sys.executable, "-m", "kdray.cli"]


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    """The bytes of a real MLflow sqlite database with one experiment."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("db") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").create_experiment("other")
    return path.read_bytes()


def _sweep(tmp_path, name="s", **top):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": name, "storage": str(tmp_path / "results"), **top, "setups": [{
        "name": "d", "dataset": {"name": "digits"}, "teacher": {"arch": "small_cnn"},
        "recipe": {"epochs": 1}, "teacher_seeds": [0], "student_seeds": [1]}]}))
    return path


def _one_line_error(capsys, rc, *words):
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("kdray: error: "), err
    for w in words:
        assert w in err, err
    return err


DAMAGE = {
    "empty": lambda good: b"",
    "truncated": lambda good: good[: len(good) // 3],
    "garbage": lambda good: b"\x00\x01not a database\n" * 100,
    "half-overwritten": lambda good: good[:4096] + b"\xff" * (len(good) - 4096),
}


@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("command", ["sweep", "validate", "report", "ui"])
def test_a_damaged_mlflow_db_is_one_line_and_left_untouched(tmp_path, capsys, mlflow_db, damage, command):
    import ray

    path = _sweep(tmp_path)
    db = tmp_path / "results" / "mlflow.db"
    db.parent.mkdir()
    db.write_bytes(DAMAGE[damage](mlflow_db))
    before = (db.read_bytes(), db.stat().st_mtime_ns)
    rc = main([command, str(path)])
    _one_line_error(capsys, rc, str(db))
    assert (db.read_bytes(), db.stat().st_mtime_ns) == before          # no schema written, nothing changed
    assert sorted(p.name for p in db.parent.iterdir()) == ["mlflow.db"]  # nothing else created
    assert not ray.is_initialized()


def test_a_sqlite_db_that_is_not_mlflows_is_refused(tmp_path, capsys):
    path = _sweep(tmp_path)
    db = tmp_path / "results" / "mlflow.db"
    db.parent.mkdir()
    with sqlite3.connect(db) as c:
        c.execute("create table notes (x)")
    _one_line_error(capsys, main(["report", str(path)]), "not MLflow's", "runs")


@pytest.mark.parametrize("name", ["mlflow.db", "trials", "mlartifacts"])
def test_a_sweep_named_like_storage_s_own_files_is_refused(tmp_path, capsys, name):
    _one_line_error(capsys, main(["validate", str(_sweep(tmp_path, name))]), "name", "rename the sweep")


def test_a_sweep_name_colliding_with_a_file_in_storage_is_refused(tmp_path, capsys):
    path = _sweep(tmp_path, "notes.txt")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "notes.txt").write_text("mine")
    _one_line_error(capsys, main(["sweep", str(path)]), "collides with the file", "notes.txt")
    assert (tmp_path / "results" / "notes.txt").read_text() == "mine"


def test_report_on_a_sweep_file_with_a_yaml_error_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nsetups:\n  - name: [unclosed\n")
    _one_line_error(capsys, main(["report", str(bad)]), str(bad), "not valid YAML")
    dup = tmp_path / "dup.yaml"
    dup.write_text("name: x\nname: y\n")
    _one_line_error(capsys, main(["report", str(dup)]), str(dup), "name")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("name: gr\xfcn\n".encode("latin-1"))
    _one_line_error(capsys, main(["report", str(latin)]), str(latin), "UTF-8")


def test_ui_on_a_sweep_never_run_says_so_and_creates_nothing(tmp_path, capsys):
    path = _sweep(tmp_path)
    err = _one_line_error(capsys, main(["ui", str(path)]), "nothing to show", "kdray sweep")
    assert not (tmp_path / "results").exists(), err


def test_ui_on_a_taken_port_is_one_line(tmp_path, capsys, mlflow_db):
    path = _sweep(tmp_path)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "mlflow.db").write_bytes(mlflow_db)
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        _one_line_error(capsys, main(["ui", str(path), "--port", str(port)]), f"port {port}", "taken")


def _sweep_run_statuses(db):
    try:
        with sqlite3.connect(db) as c:
            return [r[0] for r in c.execute("select status from runs r join tags t on r.run_uuid = t.run_uuid "
                                            "where t.key = 'kdray.kind' and t.value = 'sweep'")]
    except sqlite3.Error:
        return []


@pytest.mark.slow
def test_ctrl_c_while_ray_starts_leaves_no_running_sweep_run(tmp_path):
    path = _sweep(tmp_path)
    db = tmp_path / "results" / "mlflow.db"
    # The driver sends itself SIGINT just as it starts Ray (kdray/testhook.py): no timer, no race.
    env = dict(os.environ, KDRAY_TEST_SIGINT_AT="ray_start")
    p = subprocess.Popen(KDRAY + ["sweep", str(path), "--quiet"], start_new_session=True, text=True, env=env,
                         preexec_fn=default_sigint, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    assert p.returncode == 130, err[-3000:]
    assert "run the same command again to resume" in out + err
    assert _sweep_run_statuses(db) == ["KILLED"]


def test_a_new_sqlite_store_starts_as_a_copy_of_the_empty_schema_made_once(tmp_path, monkeypatch):
    from kdray.tracking import Tracker

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = Tracker(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", "a", str(tmp_path / "a" / "art"))
    (template,) = (tmp_path / "cache" / "kdray").glob("mlflow-*-empty.db")
    made = template.stat().st_mtime_ns
    with sqlite3.connect(template) as c:       # the schema, at MLflow's head revision, and no experiment
        assert c.execute("select count(*) from experiments").fetchone() == (0,)
        assert c.execute("select count(*) from alembic_version").fetchone() == (1,)
    second = Tracker(f"sqlite:///{tmp_path / 'b' / 'mlflow.db'}", "b", str(tmp_path / "b" / "art"))
    assert template.stat().st_mtime_ns == made                   # made once, copied after
    for t, name in ((first, "a"), (second, "b")):               # each store works as one MLflow made itself
        names = {e.name for e in t.client.search_experiments()}
        assert names == {"Default", name}
        run = t.client.create_run(t.experiment_id)
        t.client.log_metric(run.info.run_id, "x", 1.0)
        assert t.client.get_run(run.info.run_id).data.metrics == {"x": 1.0}
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["mlflow.db"]   # no partial copy left
