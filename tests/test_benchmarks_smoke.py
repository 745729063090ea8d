"""Smoke test of benchmarks/: every benchmark's core function at a tiny size returns a well-formed record.

Not a timing test (the numbers are meaningless at these sizes).  The sweep
benchmark's Ray side is replaced by a stand-in (a real Ray start alone takes
~10 s here; tests/test_engine.py covers run_sweep), so no assertion rests on its
numbers; its plain loop is real.
FFCV's timing path is skipped (numba compiles its pipeline for ~15 s); its
"not installed" path and the torchvision side are exercised.
"""
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # benchmarks/ is a top-level package, not installed

from benchmarks import NAMES, load  # noqa: E402
from benchmarks.docs import read_records, update  # noqa: E402

pytestmark = pytest.mark.slow     # every benchmark at a tiny size: ~25 s, and test_docs_update needs them all

KEYS = {"benchmark", "title", "ratio", "ratio_def", "target", "met", "measurements", "params", "notes", "seconds"}


def check(r: dict, name: str, ratio: bool = True) -> dict:
    assert KEYS <= set(r), KEYS - set(r)
    assert r["benchmark"] == name and r["title"] and r["target"]
    assert r["met"] in (True, False, None)
    if ratio:
        assert isinstance(r["ratio"], float) and math.isfinite(r["ratio"]) and r["ratio"] > 0
    assert r["measurements"] and all(isinstance(k, str) for k in r["measurements"])
    assert r["seconds"] >= 0
    return r


@pytest.fixture(scope="module")
def records():
    return {}


def test_sweep(records, monkeypatch):
    sweep = load("sweep")
    fake = {"wall_s": 2.0, "ray_start_s": 1.0, "sweep_s": 1.0, "ray_shutdown_s": 0.1, "trials": 4, "slots": 2,
            "trial_train_sum_s": 1.0, "trial_train_median_s": 0.25, "overhead_per_trial_core_s": 0.25,
            "mlflow_driver_s": 0.1, "mlflow_calls": 12, "load_avg_1m": (0.0, 0.0)}
    monkeypatch.setattr(sweep, "run_kdray", lambda d, device, slots=None: dict(fake, slots=slots))
    # The kdray side is the stand-in above, so nothing is asserted about its numbers; what is
    # checked is the real loop and that the record divides the two sides as documented.
    r = check(sweep.run(grids={"tiny": sweep.tiny_grid()}, loop_threads={"tiny": (2, 1)}, slots=2), "sweep",
              ratio=False)
    case = r["cases"][0]
    loops = case["loops"]
    assert set(loops) == {"2", "1"} and all(v["trials"] == 4 and v["wall_s"] > 0 for v in loops.values())
    assert case["ratio_all_cores"] == fake["wall_s"] / loops["2"]["wall_s"]
    assert case["ratio_best_loop"] == fake["wall_s"] / min(v["wall_s"] for v in loops.values())
    assert r["ratio"] == case["ratio_all_cores"]
    records["sweep"] = r


def test_sweep_mlflow_timer_restores_tracker():
    from kdray.tracking import Tracker
    from benchmarks.sweep import _MlflowTimer

    before = Tracker.start_trial
    with _MlflowTimer():
        assert Tracker.start_trial is not before
    assert Tracker.start_trial is before


@pytest.mark.parametrize("name", ["train_step", "kd_step"])
def test_training_steps(records, name):
    mod = load(name)
    r = check(mod.run(case_list={"tiny": load("train_step").tiny_case()}, reps=1), name)
    assert set(r["cases"]) == {"tiny"}
    records[name] = r


def test_data(records):
    r = check(load("data").run(n=512, reps=1, workers=(0,), threads=(1,)), "data")
    assert r["measurements"]["kdray_t1 samples/s"] > 0 and r["measurements"]["torchvision_w0 samples/s"] > 0
    records["data"] = r


def test_functional(records):
    mod = load("functional")
    r = check(mod.run(n=300, k=12, students=3, loop_rows=60, loop_students=1, reps=1), "functional")
    assert r["measurements"]["max |loop - kdray| on the checked rows"] < 1e-9   # the loop computes the same
    records["functional"] = r


def test_report(records):
    r = check(load("report").run(n_runs=71, breakdown=False, subprocess_cli=False), "report")
    assert r["measurements"]["runs"] == 71 and r["measurements"]["report files written"] > 5
    records["report"] = r


def test_report_scale(records):
    """The bulk-written runs are read back by MlflowClient inside the benchmark (it raises if they differ)."""
    r = check(load("report_scale").run(n_runs=142), "report_scale")
    assert r["measurements"]["runs"] == 142 and r["measurements"]["setups"] == 1
    assert r["measurements"]["report files written"] > 5
    records["report_scale"] = r


def test_ffcv_not_installed_and_torchvision_side(records, monkeypatch, tmp_path):
    mod = load("ffcv")
    monkeypatch.setattr(mod, "ffcv_available", lambda: (False, "ImportError: no module named ffcv"))
    r = check(mod.run(n=8), "ffcv", ratio=False)
    assert r["ratio"] is None and r["met"] is None
    assert r["measurements"]["status"] == "not measured: ffcv not installed"
    records["ffcv"] = r
    mod.write_jpegs(tmp_path / "img", 8, 64, classes=2)
    loader = mod.torchvision_loader(tmp_path / "img", 32, 4, 0, "cpu")
    assert mod.epoch(loader, "cpu", None, 32) > 0


def test_packing(records):
    mod = load("packing")
    tiny = {"mlp": {"dataset": {"name": "digits"}, "teacher": {"arch": "mlp", "args": {"hidden": 8, "dropout": 0.0}},
                    "recipe": {"epochs": 1, "batch_size": 256, "lr": 0.01}}}
    r = check(mod.run(quick=True, ks=(2,), cases=tiny), "packing", ratio=False)
    m = r["measurements"]["mlp K=2"]
    assert m["k"] == 2 and m["packed_s"] > 0 and m["loop_s"] > 0
    # the speed-up is loop/packed of the unrounded seconds; the record's seconds are rounded to 1 ms
    ratio = m["loop_s"] / m["packed_s"]
    bound = 0.005 + ratio * (0.0005 / m["loop_s"] + 0.0005 / m["packed_s"]) * 1.01
    assert abs(m["speedup"] - ratio) <= bound, (m, bound)
    assert r["ratio"] is None  # no K=16 measured at this size
    records["packing"] = r


def test_packed_sweep(records):
    """The real path: run_sweep on a local Ray cluster with packed students, against the loop."""
    mod = load("packed_sweep")
    sweep = load("sweep")
    d = sweep.tiny_grid()
    d["setups"][0].update(student_seeds=[10, 11], resources={"student": {"pack": 2}})
    r = check(mod.run(grids={"quickstart-tiny-packed": d}, slots=2, reps=1), "packed_sweep")
    case = r["cases"][0]
    assert case["kdray"]["trials"] == 6 and case["loops"]["2"]["trials"] == 6     # 2 teachers, 2 packs of 2
    best = min(v["wall_s"] for v in case["loops"].values())
    assert set(case["loops"]) == {"2", "1"}
    assert r["ratio"] == case["ratio_best_loop"] == case["kdray"]["wall_s"] / best
    assert r["met"] == (r["ratio"] <= 0.5)
    records["packed_sweep"] = r


def test_scale(records):
    """The real path at two tiny sizes: run_sweep on a local Ray cluster, unpacked and packed, and the
    fitted exponent equals an independent log-log fit of the recorded points."""
    mod = load("scale")
    r = check(mod.run(sizes=((1, 1), (1, 3))), "scale", ratio=False)   # at 4 and 10 trials start-up dominates:
    assert math.isfinite(r["ratio"])                                    # the exponent may even be negative
    m = r["measurements"]
    ns = (4, 10)
    pts = [m[f"unpacked, {n} trials: driver CPU ms/trial"] * n / 1000 for n in ns]
    b = math.log(pts[1] / pts[0]) / math.log(ns[1] / ns[0])          # two points: the slope in log-log
    assert r["ratio"] == pytest.approx(b, abs=0.01)
    assert all(m[f"{label}, {n} trials: sweep wall s"] > 0 for label in ("unpacked", "packed 16") for n in ns)
    records["scale"] = r


def test_scale_server(records):
    """The same sweeps logging to a real mlflow server on a real PostgreSQL that the benchmark starts
    itself: it raises unless every planned trial has one FINISHED run in its sweep's experiment there."""
    r = check(load("scale_server").run(sizes=((1, 1), (1, 2)), packs=(1,)), "scale_server", ratio=False)
    m = r["measurements"]
    assert [m[f"unpacked, {n} trials: driver CPU ms/trial"] > 0 for n in (4, 7)] == [True, True]
    records["scale_server"] = r


def test_lm_step(records):
    """kdray's LM trial against a plain transformers loop (kdray[lm]: fails under CI without it)."""
    from test_lm import require_lm
    require_lm()
    mod = load("lm_step")
    r = check(mod.run(case_list={"tiny": mod.tiny_case()}, reps=1), "lm_step")
    m = r["cases"]["tiny"]
    assert m["ratio"] == pytest.approx(m["plain_epoch_s"] / m["kdray_epoch_s"])
    assert len(m["kdray_epochs_s"][0]) == len(m["plain_epochs_s"][0]) == 2       # 3 logged epochs, first dropped
    records["lm_step"] = r


def test_docs_update(records, tmp_path):
    assert set(records) == set(NAMES), set(NAMES) - set(records)
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nhand-written text\n\n## Summary\n\n<!-- bench:summary:start -->\n"
                   "<!-- bench:summary:end -->\n")
    run = {"command": "python -m benchmarks all --quick", "date": "2026-01-01 00:00 UTC",
           "machine": {"cpu": "x", "cores": 2, "torch": "2", "device": "cpu"}}
    update(out, list(records.values()), run)
    update(out, [records["data"]], dict(run, command="python -m benchmarks data"))   # one block again
    text = out.read_text()
    assert "hand-written text" in text
    assert [r["benchmark"] for r in read_records(out)] == list(NAMES)
    assert text.count("<!-- bench:data:start -->") == 1 and "python -m benchmarks data`" in text
    summary = text.split("<!-- bench:summary:start -->")[1].split("<!-- bench:summary:end -->")[0]
    assert summary.count("\n| ") == len(NAMES) + 1
