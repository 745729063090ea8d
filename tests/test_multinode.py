"""Multi-node Ray clusters on this machine (issue 29; each node is a `ray start --block` process
tree, its own raylet).  A worker node lost mid-sweep, mid-pack and while the driver writes to
MLflow (a head with no CPUs, two worker nodes): the sweep still ends with exactly one FINISHED run
per planned trial, the packs that were on the lost node are retried elsewhere and store the same
bytes an undisturbed sweep stores, and the summary counts the retries.  A node that stops
answering (SIGSTOP) until the head declares it dead and then comes back: the same account.  DDP
ranks on two nodes, one of whose nodes is lost mid-teacher, equal the undisturbed one-node run."""
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import pytest

from kdray.plan import build_plan
from kdray.sweep import load_sweep
from sweeps import sweep_dict, write_sweep
from kdray.testhook import DRIVER_HOLD_ENV, HOLD_ENV, RELEASE
from procs import descendants, kill_tree
from test_answers import _stored_files
from test_job_submit import free_port, start_head, start_worker, stop_head
from test_reliability import KDRAY, trial_runs

pytestmark = pytest.mark.slow


def _file(tmp_path, name):
    data = sweep_dict(name, tmp_path / name, top={"max_failures": 3, "report_every_s": 0},
                      name="d", teacher={"arch": "mlp", "args": {"hidden": 16}},
                      recipe={"epochs": 1, "batch_size": 128, "lr": 0.01},
                      student={"arch": "small_cnn", "args": {"channels": 8, "dropout": 0.0}},
                      student_recipe={"epochs": 12}, teacher_seeds=[0], student_seeds=[10, 11],
                      conditions={"siddo": True, "kd": {"alphas": [0.5, 0.9]}, "rcd": {"alphas": [0.5]}},
                      resources={"student": {"cpu": 1, "pack": 2}})
    return write_sweep(tmp_path / f"{name}.yaml", data)


@contextlib.contextmanager
def _two_worker_cluster(tmp_path, prefix: str, head_env: Optional[dict] = None):
    """A head with no CPUs and two 2-CPU worker nodes, token authentication on; yields (the sweeps'
    environment, the worker nodes, the dashboard port).  Once the folder ``tmp_path / "hold"``
    exists, every student's worker holds after its 3rd epoch (kdray/testhook.py; set on the nodes,
    whose raylets start the workers) until ``hold / RELEASE`` exists, so a test can act on a node
    while a pack is surely running there, however fast this machine trains."""
    temp_dir = tempfile.mkdtemp(prefix=prefix)
    gcs, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())   # nodes and sweeps share one token
    head = start_head(temp_dir, gcs, dash, {**env, **(head_env or {})}, ("--num-cpus=0",))   # trials on the workers
    nodes = []
    try:
        nodes = [start_worker(temp_dir, gcs, {**env, HOLD_ENV: f":3:{tmp_path / 'hold'}"}, ("--num-cpus=2",),
                              f"w{i}") for i in range(2)]
        yield {**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, nodes, dash
    finally:
        for node in nodes:
            if node.poll() is None:
                stop_head(node)
        stop_head(head)


def _wait_for(ready, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and not ready():
        time.sleep(0.2)


def _sweep_held_on(path, env: dict, hold: Path, node: subprocess.Popen) -> subprocess.Popen:
    """Start ``kdray sweep path`` with the hold on; return once a student is held on ``node``."""
    hold.mkdir()
    p = subprocess.Popen(KDRAY + ["sweep", str(path), "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=env)

    def held_there():
        return {int(f.name) for f in hold.iterdir() if f.name.isdigit()} & set(descendants(node.pid))

    _wait_for(lambda: p.poll() is not None or bool(held_there()))
    assert held_there(), f"no student held on the node (sweep exit {p.poll()})"
    return p


def _ends_with_one_finished_run_per_trial_after_retries(p: subprocess.Popen, path) -> None:
    out, err = p.communicate(timeout=900)
    assert p.returncode == 0, out[-2000:] + err[-3000:]
    assert "retried:" in out and "after a lost worker or node" in out, out
    runs = trial_runs(path)
    assert sorted(x.data.tags["kdray.trial_key"] for x in runs) == sorted(s.trial_key
                                                                         for s in build_plan(load_sweep(path)).all)
    assert all(x.info.status == "FINISHED" for x in runs)
    assert any(int(x.data.tags.get("kdray.retries", 0)) > 0 for x in runs)


def test_a_worker_node_lost_mid_sweep_while_the_driver_writes_to_mlflow(tmp_path):
    """A student held mid-pack on the doomed node; then the driver is held inside its next write to
    MLflow (kdray/testhook.py) while the students go on, and the node is lost during that write."""
    with _two_worker_cluster(tmp_path, "kdray-lostnode-") as (env, nodes, _):
        calm = _file(tmp_path, "calm")
        r = subprocess.run(KDRAY + ["sweep", str(calm), "--quiet"], capture_output=True, text=True, timeout=900,
                           env=env)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        lost = _file(tmp_path, "lost")
        doomed, writing = nodes[0], tmp_path / "driver-hold"
        p = _sweep_held_on(lost, {**env, DRIVER_HOLD_ENV: str(writing)}, tmp_path / "hold", doomed)
        writing.mkdir()
        (tmp_path / "hold" / RELEASE).write_text("")        # the students go on; the driver holds at its next write
        _wait_for(lambda: (writing / "held").exists() or p.poll() is not None)
        assert (writing / "held").exists(), f"the driver never wrote to MLflow (sweep exit {p.poll()})"
        kill_tree(doomed.pid)               # the node's raylet and every worker process on it, at once
        doomed.wait(timeout=30)
        (writing / RELEASE).write_text("")
        _ends_with_one_finished_run_per_trial_after_retries(p, lost)
    a, b = _stored_files(tmp_path / "calm"), _stored_files(tmp_path / "lost")
    assert sorted(a) == sorted(b) and [k for k in a if a[k] != b[k]] == []    # retried packs: same bytes


@pytest.mark.timeout(900)   # a one-node sweep, then four Ray nodes started and a teacher retried
def test_a_ddp_teacher_over_two_nodes_survives_losing_one_and_equals_the_one_node_run(tmp_path):
    """Ray Train DDP (gloo) with 2 workers of 0.9 CPU on 3 worker nodes of one CPU each (so one rank
    per node; the head has none).  The teacher's ranks are held after its first epoch and the node of
    one of them is lost: Tune retries the teacher on the two nodes left.  The workers' node ids say 2
    nodes, the teacher's run counts the retry, and every trial's results equal the same trial's on
    one node (both ranks there, undisturbed) to 1e-6."""
    def sweep_file(name):
        data = sweep_dict(name, tmp_path / name, top={"max_failures": 3}, name="d",
                          teacher={"arch": "mlp", "args": {"hidden": 16}},
                          recipe={"epochs": 2, "batch_size": 128, "lr": 0.01}, teacher_seeds=[0],
                          student_seeds=[10], conditions={"siddo": True, "kd": None, "rcd": None},
                          distributed={"workers": 2, "backend": "gloo"},
                          resources={"teacher": {"cpu": 0.9}, "student": {"cpu": 0.9}})   # per rank
        return write_sweep(tmp_path / f"{name}.yaml", data)

    one = sweep_file("one")
    r = subprocess.run(KDRAY + ["sweep", str(one), "--quiet"], capture_output=True, text=True, timeout=900,
                       env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]

    temp_dir = tempfile.mkdtemp(prefix="kdray-ddpnodes-")
    gcs, dash = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())
    hold = tmp_path / "hold"
    head = start_head(temp_dir, gcs, dash, env, ("--num-cpus=0",))     # no rank on the head
    nodes = []
    try:
        nodes = [start_worker(temp_dir, gcs, {**env, HOLD_ENV: f"teacher:1:{hold}"}, ("--num-cpus=1",), f"w{i}")
                 for i in range(3)]
        two = sweep_file("two")
        hold.mkdir()
        p = subprocess.Popen(KDRAY + ["sweep", str(two), "--quiet"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"})

        def rank_nodes():   # the nodes a held rank of the teacher runs on (its Tune trial holds too)
            held = {int(f.name) for f in hold.iterdir() if f.name.isdigit() and " rank " in f.read_text()}
            return [n for n in nodes if held & set(descendants(n.pid))]
        _wait_for(lambda: len(rank_nodes()) == 2 or p.poll() is not None)
        assert len(rank_nodes()) == 2, f"the teacher's two ranks were not held on two nodes (sweep exit {p.poll()})"
        doomed = rank_nodes()[0]
        kill_tree(doomed.pid)
        doomed.wait(timeout=30)
        (hold / RELEASE).write_text("")
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, out[-2000:] + err[-3000:]
        assert "retried:" in out, out
    finally:
        for node in nodes:
            if node.poll() is None:
                stop_head(node)
        stop_head(head)
    runs = {name: {x.data.tags["kdray.trial_key"]: x for x in trial_runs(path)} for name, path in
            (("one", one), ("two", two))}
    assert sorted(runs["one"]) == sorted(runs["two"])
    assert all(x.info.status == "FINISHED" for x in runs["two"].values())
    teacher = [x for x in runs["two"].values() if "teacher" in x.info.run_name]
    assert len(teacher) == 1 and int(teacher[0].data.tags.get("kdray.retries", 0)) >= 1
    for key, x in runs["two"].items():
        assert x.data.metrics["ddp_workers"] == 2 and x.data.metrics["ddp_nodes"] == 2, x.info.run_name
        assert runs["one"][key].data.metrics["ddp_nodes"] == 1
        for m in ("test_acc", "test_loss", "train_loss", "train_acc"):
            assert x.data.metrics[m] == pytest.approx(runs["one"][key].data.metrics[m], abs=1e-6), (key, m)


def _dead_nodes(dash: int, env: dict) -> int:
    """How many of the cluster's nodes its dashboard reports DEAD (Ray's state API, in a child process:
    this test process never connects to Ray)."""
    code = ("from ray.util.state import list_nodes; "
            f"print(sum(n.state == 'DEAD' for n in list_nodes(address='http://127.0.0.1:{dash}')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else 0


def test_a_worker_node_that_stops_answering_and_comes_back(tmp_path):
    """The head loses a worker node mid-pack (its processes stopped with SIGSTOP: to the head, a
    partition) until it declares the node dead, then the node comes back (SIGCONT): the sweep
    retries that node's packs elsewhere and ends with exactly one FINISHED run per planned trial,
    nothing logged twice by the node that returned."""
    # the head declares a silent node dead after about 2 s instead of Ray's default ~30 s
    quick = {"RAY_health_check_period_ms": "500", "RAY_health_check_timeout_ms": "500",
             "RAY_health_check_failure_threshold": "4"}
    with _two_worker_cluster(tmp_path, "kdray-pausednode-", quick) as (env, nodes, dash):
        paused = _file(tmp_path, "paused")
        p = _sweep_held_on(paused, env, tmp_path / "hold", nodes[0])
        frozen = [nodes[0].pid] + descendants(nodes[0].pid)
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        try:
            (tmp_path / "hold" / RELEASE).write_text("")          # the other node's students go on
            deadline = time.time() + 120
            while time.time() < deadline and _dead_nodes(dash, env) == 0:
                time.sleep(1)
            assert _dead_nodes(dash, env) == 1, "the head never declared the silent node dead"
        finally:
            for pid in frozen:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
        _ends_with_one_finished_run_per_trial_after_retries(p, paused)
