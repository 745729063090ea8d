"""A PostgreSQL server and an ``mlflow server`` of our own, on free 127.0.0.1 ports, for the
benchmarks that measure kdray against a tracking server as clusters run it (issue 29, item 6)
and for the tests that sweep against one (tests/test_tracking_server.py).  Each stops exactly
what it started."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class Missing(RuntimeError):
    """What this machine lacks to start the server (the message says what to install)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> str:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb else ""


@contextmanager
def postgresql() -> Iterator[str]:
    """A PostgreSQL server (initdb + pg_ctl) with password authentication and a database ``mlflow``;
    yields its SQLAlchemy URI (psycopg2, MLflow's driver).  Raises ``Missing`` where it cannot start."""
    bindir = _pg_bin()
    if not bindir:
        raise Missing("PostgreSQL is not installed (apt-get install -y postgresql; see README)")
    try:
        import psycopg2  # noqa: F401  - MLflow's driver for postgresql:// URIs
    except ImportError:
        raise Missing("psycopg2 is not installed (pip install -e '.[dev]')") from None
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="kdray-pg-"))   # not under a root-only 0700 folder: postgres must reach it
    data = root / "data"
    if os.geteuid() == 0:         # postgres refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            raise Missing("running as root and there is no `postgres` user to run PostgreSQL as") from None
        as_user = ["runuser", "-u", "postgres", "--"]
        os.chown(root, user.pw_uid, user.pw_gid)
    # Password authentication (SCRAM), as a real server has it: anyone on 127.0.0.1 could use a trust server.
    password = os.urandom(16).hex()
    pwfile = root / "pw"
    pwfile.write_text(password + "\n")
    if as_user:
        os.chown(pwfile, user.pw_uid, user.pw_gid)
    pwfile.chmod(0o600)
    subprocess.run(as_user + [f"{bindir}/initdb", "-D", str(data), "-U", "kdray", "--auth=scram-sha-256",
                              f"--pwfile={pwfile}", "-E", "UTF8"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pwfile.unlink()
    port = free_port()
    subprocess.run(as_user + [f"{bindir}/pg_ctl", "-D", str(data), "-l", str(root / "log"), "-w", "-o",
                              f"-h 127.0.0.1 -p {port} -k {root}", "start"], check=True, stdout=subprocess.DEVNULL)
    try:
        subprocess.run(as_user + ["env", f"PGPASSWORD={password}", f"{bindir}/createdb", "-h", "127.0.0.1",
                                  "-p", str(port), "-U", "kdray", "mlflow"], check=True)
        # the driver named: SQLAlchemy's default is psycopg 3
        yield f"postgresql+psycopg2://kdray:{password}@127.0.0.1:{port}/mlflow"
    finally:   # pg_ctl stops exactly the server in our data directory
        subprocess.run(as_user + [f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        shutil.rmtree(root, ignore_errors=True)


def start_mlflow_server(folder: Path, port: int, backend_uri: str) -> subprocess.Popen:
    """``mlflow server`` on ``port`` over ``backend_uri``, artifacts proxied into ``folder``; returns
    once /health answers.  Its own process group: ``stop_mlflow_server`` stops it and its workers."""
    import requests

    p = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
                          "--artifacts-destination", str(folder / "server-artifacts"), "--host", "127.0.0.1",
                          "--port", str(port), "--workers", "1"], start_new_session=True, cwd=folder,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return p
        except requests.RequestException:
            time.sleep(0.5)
    stop_mlflow_server(p)
    raise RuntimeError("mlflow server did not start")


def stop_mlflow_server(p: subprocess.Popen) -> None:
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)   # the server and its own workers: our children only
        p.wait()


@contextmanager
def mlflow_server_on_postgresql() -> Iterator[str]:
    """An ``mlflow server`` with PostgreSQL behind it, as docs/distributed.md sets one up for a
    cluster; yields its http:// tracking URI."""
    with postgresql() as backend, tempfile.TemporaryDirectory(prefix="kdray-mlflow-server-") as d:
        port = free_port()
        server = start_mlflow_server(Path(d), port, backend)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            stop_mlflow_server(server)
