"""A simulated autoscaling GPU cluster on this machine (issue 29): cluster/rehearsal/autoscaling.yaml
under Ray's fake multi-node provider, a head with no CPUs and worker types launched from zero.  A
sweep with GPU teachers and packed GPU students (simulation switch on) scales the cluster up,
runs every trial on a node that advertises GPUs, finishes with the exact account, says which
cluster it joined and how many GPU-seconds it held beside the plan's estimate; then the
autoscaler scales the idle workers back down."""
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from kdray.simulation import LABEL
from sweeps import SMALL_GRID, sweep_dict, write_sweep
from test_job_submit import free_port, start_head, stop_head
from test_reliability import KDRAY, trial_runs

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

NODES = """
import json, ray
ray.init(address="{address}", log_to_driver=False)
print(json.dumps([dict(id=n["NodeID"], alive=n["Alive"], head="node:__internal_head__" in n["Resources"],
                       gpus=n["Resources"].get("GPU", 0)) for n in ray.nodes()]))
"""


def cluster_nodes(address: str, env: dict) -> list[dict]:
    """The cluster's nodes as Ray's GCS lists them (a short-lived driver of this test's own cluster)."""
    out = subprocess.run([sys.executable, "-c", NODES.format(address=address)], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_gpu_sweep_scales_a_simulated_cluster_up_from_zero_and_back_down(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="kdray-autoscale-")
    gcs, dash = free_port(), free_port()
    config = yaml.safe_load((ROOT / "cluster" / "rehearsal" / "autoscaling.yaml").read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
    path = Path(temp_dir) / "autoscaling.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "KDRAY_SIMULATE_GPU")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex(), RAY_FAKE_CLUSTER="1",
               AUTOSCALER_UPDATE_INTERVAL_S="1")
    head = start_head(temp_dir, gcs, dash, env, ("--num-cpus=0", f"--autoscaling-config={path}"))
    address = f"127.0.0.1:{gcs}"
    try:
        before = [n for n in cluster_nodes(address, env) if n["alive"]]
        assert len(before) == 1 and before[0]["head"]                           # zero workers
        data = sweep_dict("auto", tmp_path / "auto", **SMALL_GRID, teacher={"arch": "mlp", "args": {"hidden": 16}},
                          recipe={"epochs": 2, "batch_size": 128},
                          resources={"teacher": {"cpu": 1, "gpu": 1}, "student": {"cpu": 1, "gpu": 0.5, "pack": 3}})
        sweep = write_sweep(tmp_path / "auto.yaml", data)
        r = subprocess.run(KDRAY + ["sweep", str(sweep), "--quiet", "--simulate-gpu"], capture_output=True, text=True,
                           timeout=900, env={**env, "RAY_ADDRESS": address})
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        assert "7 trials finished now, 0 already done" in r.stdout and "0 not started; 7 planned" in r.stdout
        ray_line = next(ln for ln in r.stdout.splitlines() if ln.startswith("ray:"))
        assert "joined the Ray cluster at " in ray_line and f":{gcs} (" in ray_line, ray_line
        gpu_line = next(ln for ln in r.stdout.splitlines() if ln.startswith("gpu:"))
        assert "the plan estimates 3.71 GPU-hours" in gpu_line and "SIMULATED" in gpu_line, gpu_line
        assert float(gpu_line.split("held GPUs for ")[1].split(" GPU-seconds")[0].replace(",", "")) > 0

        runs = trial_runs(sweep)
        assert len(runs) == 7 and all(x.info.status == "FINISHED" for x in runs)
        assert all(x.data.tags.get("kdray.simulated") == LABEL for x in runs)
        placed = [json.loads((tmp_path / "auto" / "trials" / x.data.tags["kdray.trial_key"] / "run.json").read_text())
                  for x in runs]
        assert all(p["ray_gpu_ids"] for p in placed)                           # each trial held a (logical) GPU
        head_id = before[0]["id"]
        assert all(p["ray_node"] and p["ray_node"] != head_id for p in placed)   # ... on a worker it scaled up
        during = {n["id"]: n for n in cluster_nodes(address, env)}
        assert {p["ray_node"] for p in placed} <= set(during)
        assert all(during[p["ray_node"]]["gpus"] >= 1 for p in placed)          # the GPU node type

        deadline = time.time() + 240                                           # idle workers go after 6 s
        while time.time() < deadline:
            alive = [n for n in cluster_nodes(address, env) if n["alive"] and not n["head"]]
            if not alive:
                break
            time.sleep(5)
        assert not alive, f"the autoscaler did not scale back down: {alive}"
    finally:
        stop_head(head)
