"""Plug-ins from the user's own code: conditions, architectures and data sets by import path, by a
sweep file's ``plugins:`` list and by the ``kdray.plugins`` entry-point group.

Each case runs the CLI in a fresh process (registries are per process) with tests/plugin_demo on
PYTHONPATH, as a user's installed package would be.
"""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = Path(__file__).parent / "plugin_demo"


def sweep_file(tmp_path, plugins=("kdray_plugin_demo",), **setup_over) -> Path:
    setup = {"name": "p", "dataset": {"name": "digits"}, "teacher": {"arch": "kdray_plugin_demo:tiny_net"},
             "recipe": {"epochs": 2, "batch_size": 128, "lr": 0.01}, "teacher_seeds": [0],
             "student_seeds": [10, 11, 12, 13, 14, 15],
             "conditions": {"siddo": True, "kd": None, "rcd": {"alphas": [0.5]}, "logit_mse": {"alphas": [0.5]}}}
    setup.update(setup_over)
    d = {"name": "plugins", "storage": str(tmp_path / "results"), "setups": [setup]}
    if plugins is not None:
        d["plugins"] = plugins if isinstance(plugins, str) else list(plugins)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


def kdray(*args, path_extra=(), timeout=120, env_extra=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, path_extra), str(DEMO), str(ROOT)]), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "kdray.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)


def test_a_plugin_condition_and_model_plan_like_built_ins(tmp_path):
    p = kdray("plan", sweep_file(tmp_path), "--list")
    assert p.returncode == 0, p.stderr
    assert "p-logit_mse-a0.5-t0-s10" in p.stdout and "logit_mse 6" in p.stdout
    bad = sweep_file(tmp_path, conditions={"siddo": True, "logit_mse": {"alphas": [1.5]}})
    p = kdray("validate", bad)
    assert p.returncode == 2 and "setups[0].conditions.logit_mse.alphas: alpha must be in [0, 1], got 1.5" in p.stderr


@pytest.mark.parametrize("over,expected", [
    (dict(plugins=["no_such_module"]), "plugins[0]: cannot import 'no_such_module'"),
    (dict(plugins=["kdray_plugin_boom"]), "plugins[0]: importing 'kdray_plugin_boom' raised RuntimeError: kaboom"),
    (dict(plugins="kdray_plugin_demo"), "plugins: expected a list of module names"),
    (dict(teacher={"arch": "kdray_plugin_demo:nope"}), "setups[0].teacher.arch: module 'kdray_plugin_demo' has no 'nope'"),
    (dict(teacher={"arch": "kdray_plugin_demo:NOT_A_BUILDER"}), "setups[0].teacher.arch: kdray_plugin_demo:NOT_A_BUILDER is not an architecture"),
    (dict(teacher={"arch": "kdray_plugin_demo:wrong_signature"}), "is not an architecture: give a kdray.models.Architecture or a builder"),
    (dict(dataset={"name": "kdray_plugin_demo:tiny_net"}), "setups[0].dataset.name: kdray_plugin_demo:tiny_net is not a data set"),
    (dict(teacher={"arch": "kdray_plugin_demo:tiny_net", "args": {"hiden": 3}}),
     "setups[0].teacher.args.hiden: unknown argument of architecture 'kdray_plugin_demo:tiny_net'; valid: hidden"),
    (dict(plugins=[]), "setups[0].conditions.logit_mse: unknown key"),
])
def test_bad_plugins_are_one_line_naming_the_field(tmp_path, over, expected):
    plugins = over.pop("plugins", ("kdray_plugin_demo",))
    p = kdray("validate", sweep_file(tmp_path, plugins=plugins, **over))
    err = p.stderr.strip()
    assert p.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("kdray: error: ") and expected in err, err


def install(site: Path, package: str, entry_point: str) -> None:
    """An installed distribution's metadata with one kdray.plugins entry point (the module is on PYTHONPATH)."""
    dist = site / f"{package.replace('-', '_')}-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[kdray.plugins]\n{entry_point}\n")


def test_an_installed_packages_entry_point_registers_its_plugins(tmp_path):
    install(tmp_path / "site", "kdray-plugin-demo", "demo = kdray_plugin_demo")
    p = kdray("validate", sweep_file(tmp_path, plugins=None), path_extra=[tmp_path / "site"])
    assert p.returncode == 0, p.stderr
    assert "ok (1 setups, 19 trials)" in p.stdout


def test_a_broken_entry_point_is_one_warning_and_can_be_switched_off(tmp_path):
    """One installed plug-in that fails to import must not stop every kdray command on the machine."""
    site = tmp_path / "site"
    install(site, "kdray-plugin-boom", "boom = kdray_plugin_boom")
    install(site, "kdray-plugin-demo", "demo = kdray_plugin_demo")
    path = sweep_file(tmp_path, plugins=None)
    p = kdray("validate", path, path_extra=[site])
    assert p.returncode == 0, p.stderr
    assert "ok (1 setups, 19 trials)" in p.stdout           # the working plug-in still registers
    assert p.stderr.strip().splitlines() == [
        "kdray: warning: skipped the kdray.plugins entry point 'boom' of package 'kdray-plugin-boom' "
        "(kdray_plugin_boom): RuntimeError: kaboom; fix or uninstall it (KDRAY_PLUGINS=off skips all plug-in "
        "entry points)"]
    p = kdray("validate", path, path_extra=[site], env_extra={"KDRAY_PLUGINS": "off"})
    assert p.returncode == 2 and "kaboom" not in p.stderr    # nothing loaded: the demo's condition is unknown
    assert "setups[0].conditions.logit_mse: unknown key; valid: siddo, kd" in p.stderr, p.stderr


@pytest.mark.slow
def test_a_plugin_condition_runs_and_is_reported_like_a_built_in(tmp_path):
    path = sweep_file(tmp_path)
    p = kdray("sweep", path, "--quiet", timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "19 trials finished now" in p.stdout
    out = tmp_path / "report"
    p = kdray("report", path, "--out", out, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    with open(out / "data" / "tests.csv") as f:
        pairs = {(r["condition"], r["control"]) for r in csv.DictReader(f)}
    assert ("LogitMSE α=0.5", "SIDDO") in pairs and ("LogitMSE α=0.5", "RCD α=0.5") in pairs
    ticks = (out / "tables" / "ticks_p.md").read_text()
    assert "| LogitMSE α=0.5 |" in ticks
    assert "LogitMSE" in (out / "figures" / "asymmetry_p.svg").read_text()


@pytest.mark.slow
def test_validate_on_a_cluster_checks_that_its_workers_import_the_plugins(tmp_path):
    """The driver imports the plug-in (it is on the driver's PYTHONPATH), the cluster's workers cannot:
    validate says so in one line before any trial fails with an unknown name."""
    import shutil
    import tempfile

    from test_job_submit import free_port, start_head, stop_head

    temp_dir = tempfile.mkdtemp(prefix="kdt-head-")     # short: Ray's socket paths
    gcs, dash = free_port(), free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}   # head and client share it
    head_env = {**{k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}, **auth}
    head = start_head(temp_dir, gcs, dash, head_env)
    try:
        cluster = {"RAY_ADDRESS": f"127.0.0.1:{gcs}", **auth}
        p = kdray("validate", sweep_file(tmp_path), env_extra=cluster, timeout=300)
        err = p.stderr.strip()
        assert p.returncode == 2 and len(err.splitlines()) == 1, err
        assert "plugins[0]: the Ray workers cannot import 'kdray_plugin_demo' (node " in err, err
        assert "ModuleNotFoundError" in err and "py_modules" in err, err
        # A plug-in every node has (here an import path into kdray itself) passes the same check.
        ok = sweep_file(tmp_path, plugins=[], teacher={"arch": "kdray.models.small:mlp", "args": {"hidden": 8}},
                        conditions={"siddo": True, "kd": {"alphas": [0.5]}, "rcd": False})
        p = kdray("validate", ok, env_extra=cluster, timeout=300)
        assert p.returncode == 0 and "ok (1 setups" in p.stdout, p.stderr
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)
