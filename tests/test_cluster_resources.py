"""Resources the cluster cannot provide: a local cluster fails at once, naming what is asked and what exists."""
import sqlite3
import subprocess
import sys

import pytest
import yaml

from kdray.cluster import check_resources
from kdray.errors import ClusterError
from kdray.plan import build_plan
from kdray.sweep import load_sweep

KDRAY = [sys.executable, "-m", "kdray.cli"]


def _sweep(tmp_path, teacher):
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump({"name": "big", "storage": str(tmp_path / "results"), "setups": [{
        "name": "d", "dataset": {"name": "digits"}, "teacher": {"arch": "small_cnn"}, "recipe": {"epochs": 1},
        "resources": {"teacher": teacher}, "teacher_seeds": [0], "student_seeds": [1]}]}))
    return path


@pytest.mark.slow
@pytest.mark.parametrize("teacher,asked,flags", [({"cpu": 64}, "cpu: 64, gpu: 0", ["--quiet"]),
                                                 ({"gpu": 1}, "cpu: 1, gpu: 1", [])])
def test_a_local_cluster_refuses_a_trial_no_node_can_hold(tmp_path, teacher, asked, flags):
    import torch
    if "gpu" in teacher and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path = _sweep(tmp_path, teacher)
    p = subprocess.run(KDRAY + ["sweep", str(path), *flags], capture_output=True, text=True, timeout=300)
    assert "Token authentication is enabled" not in p.stderr + p.stdout     # Ray's notice on every start
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2, p.stderr[-3000:]
    assert last.startswith("kdray: error: setup 'd': resources.teacher asks for " + asked), last
    assert "the largest of the cluster's 1 node(s) has cpu: " in last and "no autoscaler" in last
    assert "Traceback" not in p.stderr and "trials on Ray Tune" not in p.stderr   # no trial started
    with sqlite3.connect(tmp_path / "results" / "mlflow.db") as c:
        assert c.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0] == 0
        assert c.execute("select count(*) from runs where name != 'sweep big'").fetchone()[0] == 0


@pytest.mark.slow
def test_with_an_autoscaler_the_sweep_says_it_waits_for_nodes(tmp_path, capsys):
    import ray
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        specs = build_plan(load_sweep(_sweep(tmp_path, {"cpu": 64}))).all
        check_resources(specs, autoscaling=True)      # the real local node's resources
        err = capsys.readouterr().err
        assert "resources.teacher asks for cpu: 64" in err and "waits for the autoscaler" in err
        with pytest.raises(ClusterError, match="has cpu: 2, gpu: 0"):
            check_resources(specs, autoscaling=False)
        check_resources(build_plan(load_sweep(_sweep(tmp_path, {"cpu": 2}))).all, autoscaling=False)  # fits
    finally:
        ray.shutdown()
