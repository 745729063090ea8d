"""Packed students in a real sweep (``resources: {student: {pack: K}}``): one Tune trial per pack,
exactly one MLflow run per student, results within the stated tolerance of the same sweep unpacked, and
per-student resume after the driver is killed mid-pack."""
import subprocess
from pathlib import Path

import pytest

from kdray.plan import build_plan
from kdray.sweep import load_sweep
from sweeps import sweep_dict, write_sweep
from test_packing import ATOL
from test_reliability import KDRAY, crash_driver_at, trial_runs

pytestmark = pytest.mark.slow     # whole sweeps in a subprocess (their own Ray cluster)

SETUP = {"name": "d", "teacher": {"arch": "mlp", "args": {"hidden": 32, "dropout": 0.0}},
         "recipe": {"epochs": 3, "batch_size": 128, "lr": 0.01, "eval_every": 2},
         "teacher_seeds": [0], "student_seeds": [10, 11],
         "conditions": {"siddo": True, "kd": {"alphas": [0.5]}, "rcd": {"alphas": [0.5]}}}


def _file(tmp_path, name, pack, report_every_s=0):
    data = sweep_dict(name, tmp_path / name, top={"report_every_s": report_every_s},
                      **{**SETUP, "resources": {"student": {"pack": pack}}})
    return write_sweep(tmp_path / f"{name}.yaml", data)


def by_key(runs) -> dict:
    """{trial key: run}, after asserting that no trial was logged twice (a dict alone would hide it)."""
    keys = [r.data.tags["kdray.trial_key"] for r in runs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    assert not twice, f"trials logged more than once: {twice}"
    return dict(zip(keys, runs))


def _metrics(path):
    return {k: (r.info.status, r.data.metrics) for k, r in by_key(trial_runs(path)).items()}


def test_a_packed_sweep_gives_each_student_its_own_run_matching_the_unpacked_sweep(tmp_path):
    packed, alone = _file(tmp_path, "packed", 3), _file(tmp_path, "alone", 1)
    plan = build_plan(load_sweep(packed))
    shown = subprocess.run(KDRAY + ["plan", str(packed)], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "students packed up to 3 per trial" in shown.stdout, shown.stdout
    out = {}
    for path in (packed, alone):
        r = subprocess.run(KDRAY + ["sweep", str(path), "--quiet"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        out[path] = r
    assert "6 of them in 2 packs" in out[packed].stderr, out[packed].stderr
    assert "7 trials finished now" in out[packed].stdout
    p, a = _metrics(packed), _metrics(alone)
    assert sorted(p) == sorted(a) == sorted(s.trial_key for s in plan.all)    # one run per trial, same keys
    for key, (status, metrics) in p.items():
        assert status == "FINISHED"
        assert set(metrics) == set(a[key][1]), key                              # mid-training test metrics too
        for name, v in a[key][1].items():
            if name not in ("train_seconds",):
                assert metrics[name] == pytest.approx(v, abs=ATOL), (key, name)


def test_a_pack_resumes_per_student_after_the_driver_is_killed_mid_pack(tmp_path):
    path = _file(tmp_path, "resume", 3, report_every_s=60)   # a pack's students reach the driver together, at its end
    plan = build_plan(load_sweep(path))
    first = next(s for s in plan.students if s.method == "kd")     # the driver dies once its run is FINISHED
    crash_driver_at(path, first.label, 3)
    before = {k for k, (status, _) in _metrics(path).items() if status == "FINISHED"}
    assert first.trial_key in before and len(before) < len(plan.all)
    store_dir = tmp_path / "resume" / "trials"
    stored = {s.trial_key: (store_dir / s.trial_key / "result.json").stat().st_mtime_ns
              for s in plan.students if (store_dir / s.trial_key / "result.json").exists()}
    assert set(stored) - before, "the killed pack left no stored, unlogged student to resume"

    again = subprocess.run(KDRAY + ["sweep", str(path), "--quiet"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(before)} already done" in again.stdout, again.stdout
    after = _metrics(path)
    assert sorted(after) == sorted(s.trial_key for s in plan.all)
    assert all(status == "FINISHED" for status, _ in after.values())
    # students the killed pack had finished are logged from storage, not trained again
    assert all((store_dir / k / "result.json").stat().st_mtime_ns == t for k, t in stored.items())


def test_a_student_that_diverges_inside_a_pack_fails_alone(tmp_path):
    """A plug-in method that diverges at alpha 1: its students end FAILED with the reason, their
    pack-mates (same pack, same process) end as they do in a pack without them."""
    import os
    import sys

    from mlflow.tracking import MlflowClient

    from test_plugins import DEMO, ROOT

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DEMO), str(ROOT)])}

    def sweep(name, alphas):
        conditions = {"siddo": True, "kd": None, "rcd": None, "scaled_mse": {"alphas": alphas}}
        data = sweep_dict(name, tmp_path / name, top={"plugins": ["kdray_plugin_demo"]},
                          **{**SETUP, "conditions": conditions, "resources": {"student": {"pack": 8}}})
        path = write_sweep(tmp_path / f"{name}.yaml", data)
        r = subprocess.run([sys.executable, "-m", "kdray.cli", "sweep", str(path), "--quiet"], capture_output=True,
                           text=True, timeout=600, env=env)
        client = MlflowClient(f"sqlite:///{tmp_path / name / 'mlflow.db'}")   # the plug-in is not imported here
        exp = client.get_experiment_by_name(name)
        return r, by_key(client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'"))

    r, runs = sweep("diverge", [0.5, 1.0])
    assert r.returncode == 1, r.stderr[-3000:]
    assert "6 of them in 1 packs" in r.stderr and "5 trials finished now" in r.stdout and "2 failed" in r.stdout
    failed = [x for x in runs.values() if x.info.status == "FAILED"]
    assert len(runs) == 7 and len(failed) == 2
    assert all("-a1-" in x.info.run_name and "TrialDiverged: training loss is" in x.data.tags["kdray.failure"]
               for x in failed), [(x.info.run_name, x.data.tags.get("kdray.failure")) for x in failed]
    ok, calm = sweep("calm", [0.5])
    assert ok.returncode == 0, ok.stderr[-3000:]
    finished = {k: x for k, x in runs.items() if x.info.status == "FINISHED"}
    assert sorted(finished) == sorted(calm)                                  # the same trials, by key
    for key, x in finished.items():
        for name, v in calm[key].data.metrics.items():
            if name != "train_seconds":
                assert x.data.metrics[name] == pytest.approx(v, abs=ATOL), (x.info.run_name, name)
