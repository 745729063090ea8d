"""`ray job submit` for real: a local head on 127.0.0.1, the quickstart-shaped sweep as a job."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from procs import stop_tree
from sweeps import SMALL_GRID, sweep_dict, write_sweep

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow     # a Ray head and a job: ~1 min


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_head(temp_dir: str, gcs: int, dash: int, env: dict, resources: tuple = ("--num-cpus=2",)) -> subprocess.Popen:
    """A Ray head in the foreground (`ray start --block`): every Ray process it starts is its
    descendant, so the test can stop exactly its own cluster.  Returns once the dashboard listens."""
    log = open(Path(temp_dir) / "head.log", "w")   # a file, not a pipe: a full pipe would stall the head
    # Free ports for every listener, not Ray's fixed defaults: another cluster on the machine
    # (another test run, another user) would otherwise leave this head without a job agent.
    ports = [f"--{name}={free_port()}" for name in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                   "metrics-export-port", "runtime-env-agent-port")]
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", *ports,
                             *resources, f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and head.poll() is None:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", dash)) == 0:
                return head
        time.sleep(0.5)
    stop_head(head)
    raise AssertionError(f"the Ray head did not come up: {(Path(temp_dir) / 'head.log').read_text()[-2000:]}")


def start_worker(temp_dir: str, gcs: int, env: dict, resources: tuple = ("--num-cpus=2",),
                 name: str = "worker") -> subprocess.Popen:
    """A worker node of the head at ``gcs`` (`ray start --address --block`, its own raylet and free
    ports): stopping its process tree is losing the node.  Returns once Ray says it started."""
    log_path = Path(temp_dir) / f"{name}.log"
    log = open(log_path, "w")
    ports = [f"--{p}={free_port()}" for p in ("dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                              "metrics-export-port", "runtime-env-agent-port")]
    node = subprocess.Popen([str(BIN / "ray"), "start", f"--address=127.0.0.1:{gcs}", "--block",
                             "--node-ip-address=127.0.0.1", *ports, *resources, "--disable-usage-stats"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and node.poll() is None:
        if "Ray runtime started" in log_path.read_text():
            return node
        time.sleep(0.5)
    stop_head(node)
    raise AssertionError(f"the Ray worker node did not come up: {log_path.read_text()[-2000:]}")


def stop_head(head: subprocess.Popen) -> None:
    """Stop this test's own Ray processes: the head and its descendants, never `ray stop`."""
    stop_tree(head.pid, root_first=True)
    head.wait(timeout=30)


def test_ray_job_submit_runs_a_sweep_on_a_running_cluster(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="kdray-rayhead-")
    gcs, dash = free_port(), free_port()
    # Token authentication on, as a real cluster should have it: head and client share the token.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())
    head = start_head(temp_dir, gcs, dash, env)
    try:
        # The job's working directory carries the user's plug-in (a module no node has installed):
        # Ray ships it to the driver and to every worker that runs a trial.
        job_dir = tmp_path / "job"
        job_dir.mkdir()
        shutil.copy(ROOT / "tests" / "plugin_demo" / "kdray_plugin_demo.py", job_dir)
        sweep = sweep_dict("jobsweep", tmp_path / "results", top={"plugins": ["kdray_plugin_demo"]}, **SMALL_GRID,
                           name="digits-mlp", teacher={"arch": "mlp", "args": {"hidden": 32}},
                           recipe={"epochs": 2, "batch_size": 128, "lr": 0.01})
        sweep["setups"][0]["conditions"] = {"siddo": True, "kd": None, "rcd": {"alphas": [0.5]},
                                            "logit_mse": {"alphas": [0.5]}}
        sweep_file = write_sweep(job_dir / "jobsweep.yaml", sweep)
        cmd = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(job_dir),
               "--", sys.executable, "-m", "kdray.cli", "sweep", sweep_file.name, "--quiet"]
        t0 = time.time()
        for _ in range(30):  # the head's job agent comes up a few seconds after `ray start`
            job = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(2)
        wall = time.time() - t0
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        assert "sweep jobsweep: 7 trials finished now" in job.stdout
        print(f"ray job submit wall time: {wall:.1f} s")
        # The driver joined this head, not a Ray cluster of its own: the cluster it names is ours.
        ray_line = next((ln for ln in job.stdout.splitlines() if ln.startswith("ray:")), job.stdout[-2000:])
        assert "joined the Ray cluster at " in ray_line and f":{gcs} (1 nodes alive)" in ray_line, ray_line

        client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
        exp = client.get_experiment_by_name("jobsweep")
        runs = client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'")
        assert len(runs) == 7 and all(r.info.status == "FINISHED" for r in runs)
        assert sum(r.data.tags["kdray.method"] == "logit_mse" for r in runs) == 2     # the plug-in ran on the cluster
        parent = client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'sweep'")[0]
        assert parent.data.tags["kdray.ray_gcs_address"].endswith(f":{gcs}")
        assert parent.data.tags["kdray.ray_joined"] == "true"
        nodes = {json.loads((tmp_path / "results" / "trials" / r.data.tags["kdray.trial_key"] / "run.json")
                            .read_text())["ray_node"] for r in runs}
        assert len(nodes) == 1 and None not in nodes                    # every trial on the head's one node
        jobs = subprocess.run([str(BIN / "ray"), "job", "list", "--address", f"http://127.0.0.1:{dash}"],
                              capture_output=True, text=True, timeout=120, env=env)
        assert "SUCCEEDED" in jobs.stdout, jobs.stdout + jobs.stderr     # the cluster's own job list has it
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
