"""A GPU sweep rehearsed without a GPU (issue 29): on a Ray head that advertises a logical GPU,
trials that ask for GPUs fail with one line unless the simulation switch is on, and with it they
train on the CPU and are tagged SIMULATED in their fingerprint, their MLflow runs and the report."""
import json
import os
import subprocess
import tempfile

import pytest
import torch

from kdray.simulation import ENV, LABEL, NoGpuError, device_for
from sweeps import SMALL_GRID, sweep_dict, write_sweep
from test_job_submit import free_port, start_head, stop_head
from test_reliability import KDRAY, trial_runs


def test_a_gpu_trial_never_falls_back_to_the_cpu_silently():
    assert device_for({"cpu": 1, "gpu": 0}, False) == ("cpu", None)
    if torch.cuda.is_available():
        assert device_for({"gpu": 1}, False) == ("cuda", None)
        return
    with pytest.raises(NoGpuError, match=f"{ENV}=1"):
        device_for({"gpu": 0.5}, False)
    assert device_for({"gpu": 0.5}, True) == ("cpu", LABEL)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="simulation is for machines without CUDA")
def test_a_gpu_sweep_on_a_head_with_a_logical_gpu_fails_without_the_switch_and_is_labelled_with_it(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="kdray-simgpu-")
    gcs, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", ENV)}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())
    head = start_head(temp_dir, gcs, dash, env, ("--num-cpus=2", "--num-gpus=1"))
    try:
        env["RAY_ADDRESS"] = f"127.0.0.1:{gcs}"

        def sweep(name, *flags):
            data = sweep_dict(name, tmp_path / name, **SMALL_GRID, teacher={"arch": "mlp", "args": {"hidden": 16}},
                              recipe={"epochs": 1, "batch_size": 128},
                              resources={"teacher": {"cpu": 1, "gpu": 1}, "student": {"cpu": 1, "gpu": 0.5, "pack": 2}})
            path = write_sweep(tmp_path / f"{name}.yaml", data)
            return path, subprocess.run(KDRAY + ["sweep", str(path), "--quiet", *flags], capture_output=True,
                                        text=True, timeout=600, env=env)

        path, off = sweep("off")
        assert off.returncode == 1, off.stdout[-2000:] + off.stderr[-2000:]
        assert "1 failed" in off.stdout and "6 blocked by a failed teacher" in off.stdout, off.stdout
        teacher = next(r for r in trial_runs(path) if r.data.tags["kdray.role"] == "teacher")
        assert teacher.info.status == "FAILED" and f"{ENV}=1" in teacher.data.tags["kdray.failure"]

        path, on = sweep("on", "--simulate-gpu")
        assert on.returncode == 0, on.stdout[-2000:] + on.stderr[-2000:]
        runs = trial_runs(path)
        assert len(runs) == 7 and all(r.data.tags.get("kdray.simulated") == LABEL for r in runs)
        assert all(json.loads(r.data.tags["kdray.fingerprint_json"])["simulated"] == LABEL for r in runs)
        assert sum("kdray.pack" in r.data.tags for r in runs) == 6          # the students trained packed
        report = subprocess.run(KDRAY + ["report", str(path), "--jobs", "1"], capture_output=True, text=True,
                                timeout=600, env=env)
        assert report.returncode == 0, report.stderr[-2000:]
        assert "SIMULATED: 7 runs are GPU trials run on a CPU" in report.stdout, report.stdout
    finally:
        stop_head(head)
