"""Stable trial identity: the keys of stored trials never change by accident.

- Golden keys: a handful of specs (teacher, KD, KD at T=2, RCD, LS, FM, FM's
  control, a DDP student) keep the keys kdray gave them before conditions were
  plug-in modules (the same values main computed then).
- Every sweep file in search_spaces/ plans exactly the trials it planned then
  (tests/fixtures/planned_trials.json, recorded before the change).
- A parameter, recipe option or field added with a default leaves every key alone.
- A store and MLflow experiment written then (tests/fixtures/legacy_store.tar.gz)
  are reused: re-running their sweep retrains nothing, and the report reads them.
"""
import csv
import json
import sqlite3
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import ray

from kdray import conditions
from kdray.cli import main
from kdray.plan import build_plan
from kdray.sweep import load_sweep, parse_sweep

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures"

GOLDEN = {
    "img-teacher-t0": "b25c33276f0e7288",
    "lm-teacher-t0": "f0ba2ee0a0e9edb6",
    "img-siddo-t0-s10": "5384c5d692b836f6",
    "img-kd-a0.5-t0-s10": "5dfbc2b977d456d4",
    "img-kd-a0.5-T2-t0-s10": "5f91663add92ba25",
    "img-rcd-a0.5-t0-s10": "da7cf4c8565cc279",
    "img-ls-e0.1-t0-s10": "c62fa0a46228a5e7",
    "lm-fm-a0.5-b4-t0-s10": "d6153331886a083b",
    "lm-fm_rcd-a0.5-b4-t0-s10": "1f4de81d1564c507",
    "ddp-siddo-t0-s10": "110c9b1981543709",
}


def golden_sweep():
    def setup(**over):
        s = {"name": "g", "dataset": {"name": "digits"}, "teacher": {"arch": "small_cnn", "args": {"channels": 8}},
             "recipe": {"epochs": 2, "batch_size": 64, "lr": 0.002}, "teacher_seeds": [0], "student_seeds": [10]}
        s.update(over)
        return s
    gpt = dict(dataset={"name": "tinyshakespeare", "args": {"block_size": 32}},
               teacher={"arch": "nano_gpt", "args": {"n_layer": 4}}, recipe={"iterations": 10, "log_every": 5})
    return parse_sweep({"name": "golden", "data_root": str(ROOT), "setups": [
        setup(name="img", conditions={"siddo": True, "kd": {"alphas": [0.5], "temperatures": [1.0, 2.0]},
                                      "rcd": {"alphas": [0.5]}, "ls": {"epsilons": [0.1]}}),
        setup(name="lm", conditions={"siddo": False, "kd": None, "rcd": None,
                                     "fm": {"alphas": [0.5], "blocks": [4]}}, **gpt),
        setup(name="ddp", distributed={"workers": 2}, conditions={"siddo": True, "kd": None, "rcd": None})]})


def test_golden_keys():
    assert {s.label: s.trial_key for s in build_plan(golden_sweep()).all} == GOLDEN


def test_every_search_space_plans_the_recorded_trials():
    recorded = json.loads((FIXTURES / "planned_trials.json").read_text())
    assert sorted(recorded) == sorted(p.name for p in (ROOT / "search_spaces").glob("*.yaml"))
    for name, trials in recorded.items():
        plan = build_plan(load_sweep(ROOT / "search_spaces" / name))
        assert [s.trial_key for s in plan.all] == [k for k, _ in trials], name
        # Labels too; label smoothing's epsilon, once stored in alpha, now shows as "e".
        assert [s.label for s in plan.all] == [lb.replace("-ls-a", "-ls-e") for _, lb in trials], name


def test_a_new_parameter_with_a_default_leaves_keys_alone(monkeypatch):
    specs = build_plan(golden_sweep()).all
    kd = conditions.get("kd")
    extra = conditions.Param("warmup", "warmups", 0.0, [0.0], float, 0.0, None, short="wu", always=False)
    monkeypatch.setitem(conditions.CONDITIONS._items, "kd", replace(kd, params=kd.params + (extra,)))
    for s in specs:
        params = conditions.find(s.method).full_params(s.params) if s.role == "student" else s.params
        assert s.with_(params=params).trial_key == GOLDEN[s.label]
    kd_spec = next(s for s in specs if s.method == "kd")
    changed = kd_spec.with_(params={**kd_spec.params, "warmup": 0.5})
    assert changed.trial_key != kd_spec.trial_key


def test_a_new_recipe_option_at_its_default_leaves_keys_alone():
    spec = next(s for s in build_plan(golden_sweep()).all if s.method == "kd")
    assert spec.with_(recipe={**spec.recipe, "not_yet_an_option": None}).trial_key != spec.trial_key  # unknown: hashed
    from kdray.spec import stable_recipe
    assert stable_recipe(spec.recipe) == spec.recipe                 # every option of today was in schema 1


def test_the_key_schema_version_is_hashed_once_bumped(monkeypatch):
    assert build_plan(golden_sweep()).teachers[0].trial_key == GOLDEN["img-teacher-t0"]
    monkeypatch.setattr("kdray.spec.KEY_SCHEMA", 2)     # a spec keeps the key it was made with: plan again
    assert build_plan(golden_sweep()).teachers[0].trial_key != GOLDEN["img-teacher-t0"]


@pytest.mark.slow
def test_a_store_written_before_conditions_were_plugins_is_reused(tmp_path, capsys):
    store = tmp_path / "store"
    store.mkdir()
    with tarfile.open(FIXTURES / "legacy_store.tar.gz") as tar:
        tar.extractall(store, filter="data")
    with sqlite3.connect(store / "mlflow.db") as db:   # artefacts of new runs go under tmp_path
        db.execute("UPDATE experiments SET artifact_location = ?", ((store / "mlartifacts").as_uri(),))
    sweep_file = FIXTURES / "legacy_sweep.yaml"
    was_running = ray.is_initialized()
    try:
        assert main(["sweep", str(sweep_file), "--quiet", "--storage", str(store)]) == 0
    finally:
        if not was_running:
            ray.shutdown()
    out = capsys.readouterr().out
    assert "0 trials finished now, 15 already done" in out, out

    report = tmp_path / "report"
    uri = f"sqlite:///{store / 'mlflow.db'}"
    assert main(["report", "legacy-store", "--tracking-uri", uri, "--out", str(report)]) == 0
    with open(report / "data" / "tests.csv") as f:
        pairs = {(r["condition"], r["control"]) for r in csv.DictReader(f)}
    assert ("FM α=0.5 b2", "FM-RCD α=0.5 b2") in pairs and ("KD α=0.5 T=2", "RCD α=0.5") in pairs
    assert "| LS ε=0.1 |" in (report / "tables" / "metrics_digits-tiny_t0.md").read_text()
