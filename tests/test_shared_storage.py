"""Local storage on a two-node Ray cluster: a sweep runs when every node sees the folder, and is one
line (exit 2, no trial started) when one node does not.

Both nodes run on this machine, as the test's own ``ray start --block`` processes on free ports.
For the node that cannot see the folder, its ``ray start`` runs in its own mount namespace
(``unshare``) with an empty tmpfs mounted over the storage folder: that node's processes really
see a different, empty folder at the same path, as a node with its own disk would.  Where
unshare is not allowed, that test is skipped, saying why.
"""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from procs import stop_tree
from sweeps import sweep_dict, write_sweep

BIN = Path(sys.executable).parent
KDRAY = [sys.executable, "-m", "kdray.cli"]
pytestmark = pytest.mark.slow     # a two-node Ray cluster and a sweep


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _agent_ports() -> list[str]:
    """Free ports for every listener of a node: two nodes on one machine must not share Ray's defaults."""
    return [f"--{name}={_free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "metrics-export-port", "runtime-env-agent-port")]


def _can_unshare() -> str:
    """'' when this machine lets a process mount a tmpfs in its own mount namespace, else why not."""
    if not shutil.which("unshare"):
        return "no unshare command"
    d = tempfile.mkdtemp(prefix="kdray-unshare-")
    try:
        p = subprocess.run(["unshare", "-Urm", "sh", "-c", f"mount -t tmpfs kdray-test {shlex.quote(d)}"],
                           capture_output=True, text=True, timeout=30)
        return "" if p.returncode == 0 else f"unshare -Urm + mount refused: {p.stderr.strip()[:200]}"
    finally:
        os.rmdir(d)


class TwoNodes:
    """A head and one worker node, started and stopped by this test (by pid, with their descendants)."""

    def __init__(self, tmp: Path, hide: Path | None = None):
        self.temp_dir = tempfile.mkdtemp(prefix="kdray-2nodes-")
        self.gcs = _free_port()
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())
        self.procs: list[subprocess.Popen] = []
        common = ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats",
                  f"--temp-dir={self.temp_dir}"]      # both nodes' sessions and logs in this test's folder
        self._start("head", [str(BIN / "ray"), "start", "--head", f"--port={self.gcs}", "--include-dashboard=false",
                             *common, *_agent_ports()])
        worker = [str(BIN / "ray"), "start", f"--address=127.0.0.1:{self.gcs}", *common, *_agent_ports()]
        if hide is not None:       # this node's view of `hide`: an empty tmpfs, not the driver's folder
            hide.mkdir(parents=True, exist_ok=True)
            worker = ["unshare", "-Urm", "sh", "-c",
                      f"mount -t tmpfs kdray-test {shlex.quote(str(hide))} && exec {shlex.join(worker)}"]
        self._start("worker", worker)
        self._wait_for(2)

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(Path(self.temp_dir) / f"{name}.log", "w")   # a file: a full pipe would stall the node
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _wait_for(self, n: int) -> None:
        probe = [sys.executable, "-c", "import ray; ray.init(log_to_driver=False); "
                 "print(sum(x['Alive'] for x in ray.nodes()))"]
        env = {**self.env, "RAY_ADDRESS": f"127.0.0.1:{self.gcs}"}
        deadline = time.time() + 180
        while time.time() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            out = subprocess.run(probe, env=env, capture_output=True, text=True, timeout=120).stdout.strip()
            if out.splitlines() and out.splitlines()[-1] == str(n):
                return
            time.sleep(2)
        logs = "\n".join(p.read_text()[-1500:] for p in Path(self.temp_dir).glob("*.log"))
        self.stop()
        raise AssertionError(f"the two-node cluster did not come up:\n{logs}")

    def sweep(self, path: Path) -> subprocess.CompletedProcess:
        env = {**self.env, "RAY_ADDRESS": f"127.0.0.1:{self.gcs}"}
        return subprocess.run(KDRAY + ["sweep", str(path), "--quiet"], env=env, capture_output=True, text=True,
                              timeout=400)

    def stop(self) -> None:
        for p in reversed(self.procs):
            stop_tree(p.pid, root_first=True)   # `ray start --block` stops its node in order
            p.wait(timeout=30)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _sweep_file(tmp_path: Path, storage: Path) -> Path:
    data = sweep_dict("shared", storage, teacher={"arch": "mlp", "args": {"hidden": 32}},
                      recipe={"epochs": 1, "batch_size": 128, "lr": 0.01}, teacher_seeds=[0], student_seeds=[10],
                      conditions={"siddo": True, "kd": None, "rcd": None})
    return write_sweep(tmp_path / "shared.yaml", data)


def test_local_storage_every_node_sees_runs(tmp_path):
    storage = tmp_path / "results"
    path = _sweep_file(tmp_path, storage)
    cluster = TwoNodes(tmp_path)
    try:
        done = cluster.sweep(path)
    finally:
        cluster.stop()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 trials finished now" in done.stdout, done.stdout
    assert not list(storage.glob(".kdray-shared-check-*"))        # the marker is removed


def test_local_storage_a_node_does_not_see_is_one_line_before_any_trial(tmp_path):
    why = _can_unshare()
    if why:
        pytest.skip(f"cannot give a node its own view of the folder here ({why})")
    storage = tmp_path / "results"
    path = _sweep_file(tmp_path, storage)
    cluster = TwoNodes(tmp_path, hide=storage)
    try:
        done = cluster.sweep(path)
    finally:
        cluster.stop()
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert err[-1].startswith("kdray: error: ") and "Traceback" not in done.stderr, done.stderr[-3000:]
    line = err[-1]
    for words in (f"storage {storage} is a folder on this machine", "1 of the cluster's 2 nodes do not see it",
                  "not found on: ", "s3://BUCKET/PREFIX", f"mounted at {storage} on every node"):
        assert words in line, line
    listed = line.split("not found on: ")[1].split("); their")[0]
    assert listed.count(", host ") == 1, listed                  # one node named: the one with its own view
    assert not (storage / "trials").exists()                      # no trial started
    assert not list(storage.glob(".kdray-shared-check-*"))
