"""A faster sweep start (docs/benchmarks.md, "Faster start"): Tune's trial actors start in the
worker processes Ray started with the local cluster, not in new ones."""
import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow     # a Ray cluster of its own, in a subprocess

SCRIPT = textwrap.dedent("""
    import json, os, sys, tempfile, time
    import ray
    from ray import tune

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid

    def workers():   # the raylet's idle worker processes (their title is ray::IDLE)
        out = set()
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
            except (OSError, ValueError, IndexError):
                continue
            if ppid == raylet and cmd.startswith(b"ray::IDLE"):
                out.add(int(pid))
        return out

    deadline = time.time() + 60
    while len(workers()) < 2 and time.time() < deadline:
        time.sleep(0.2)
    before = workers()
    from contextlib import nullcontext
    from ray.tune.execution.class_cache import DEFAULT_ENV_VARS
    from kdray.engine import _trials_on_prestarted_workers
    defaults = dict(DEFAULT_ENV_VARS)

    def trainable(config):
        tune.report({"pid": os.getpid()})

    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    with tempfile.TemporaryDirectory() as d:
        with _trials_on_prestarted_workers() if sys.argv[1] == "kdray" else nullcontext():
            grid = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}), param_space={"x": 1},
                              run_config=tune.RunConfig(storage_path=d, verbose=0)).fit()
        print(json.dumps({"before": sorted(before), "trial": grid[0].metrics["pid"],
                          "restored": dict(DEFAULT_ENV_VARS) == defaults}))
""")


def _run(mode: str) -> dict:
    p = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_tune_trials_start_in_the_workers_ray_started_with_the_cluster():
    got = _run("kdray")
    assert len(got["before"]) >= 1, got           # Ray started idle workers with the cluster
    assert got["trial"] in got["before"], got     # and the trial ran in one of them
    assert got["restored"], got                   # Tune's defaults are back afterwards
