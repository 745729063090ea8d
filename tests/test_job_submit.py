"""`ray job submit` for real: a local head on 127.0.0.1, the quickstart-shaped sweep as a job."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_head(temp_dir: str) -> None:
    """Stop only this test's Ray processes (found by their session folder), never `ray stop`."""
    procs = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        p.kill()


def test_ray_job_submit_runs_a_sweep_on_a_running_cluster(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="kdray-rayhead-")
    gcs, dash = free_port(), free_port()
    # Token authentication on, as a real cluster should have it: head and client share the token.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())
    start = subprocess.run([str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=2",
                            f"--temp-dir={temp_dir}", "--disable-usage-stats"],
                           capture_output=True, text=True, timeout=120, env=env)
    assert start.returncode == 0, start.stderr[-2000:]
    try:
        sweep = {"name": "jobsweep", "storage": str(tmp_path / "results"),
                 "setups": [{"name": "digits-mlp", "dataset": {"name": "digits"},
                             "teacher": {"arch": "mlp", "args": {"hidden": 32}},
                             "recipe": {"epochs": 2, "batch_size": 128, "lr": 0.01},
                             "teacher_seeds": [0], "student_seeds": [10, 11],
                             "conditions": {"siddo": True, "kd": {"alphas": [0.5]}, "rcd": {"alphas": [0.5]}}}]}
        sweep_file = tmp_path / "jobsweep.yaml"
        sweep_file.write_text(yaml.safe_dump(sweep))
        runtime_env = {"excludes": ["/.git", "/results", "/.venv", "/data"]}
        cmd = [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
               "--runtime-env-json", json.dumps(runtime_env), "--",
               sys.executable, "-m", "kdray.cli", "sweep", str(sweep_file), "--quiet"]
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

        client = MlflowClient(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}")
        exp = client.get_experiment_by_name("jobsweep")
        runs = client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'")
        assert len(runs) == 7 and all(r.info.status == "FINISHED" for r in runs)
    finally:
        stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
