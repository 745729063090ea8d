"""Tf-KD's virtual teacher: a control added as one module (kdray/conditions/tfkd.py) and nothing else.

Its objective against a hand computation, and its way through the schema, the
plan, a real sweep, MLflow and the report's tests, tables and figures.
"""
import csv
import json
import math

import pytest
import ray
import yaml
from mlflow.tracking import MlflowClient

from kdray.cli import main
from kdray.conditions import build_objective
from kdray.plan import build_plan
from kdray.sweep import SweepError, parse_sweep


def _softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


@pytest.mark.parametrize("alpha,T,conf", [(0.5, 1.0, 0.9), (0.9, 2.0, 0.7)])
def test_virtual_teacher_objective_matches_hand_formula(alpha, T, conf):
    import torch
    from kdray.losses import Batch

    z, y = [[1.0, -0.5, 2.0], [0.3, 0.2, -1.0]], [2, 1]
    want = 0.0
    for zs, yi in zip(z, y):
        target = [conf if k == yi else (1 - conf) / 2 for k in range(3)]
        q = _softmax([v / T for v in zs])
        kl = sum(p * math.log(p / qi) for p, qi in zip(target, q))
        want += (1 - alpha) * -math.log(_softmax(zs)[yi]) + alpha * T * T * kl
    loss = build_objective("tfkd", {"alpha": alpha, "temperature": T, "confidence": conf})
    assert float(loss(Batch(torch.tensor(z), torch.tensor(y)))) == pytest.approx(want / 2, rel=1e-5)


def _sweep(tmp_path, **tfkd):
    return {"name": "tfkd-e2e", "storage": str(tmp_path / "results"),
            "setups": [{"name": "digits-tiny", "dataset": {"name": "digits"},
                        "teacher": {"arch": "small_cnn", "args": {"channels": 4}},
                        "recipe": {"epochs": 3, "batch_size": 128, "lr": 0.01},
                        "teacher_seeds": [0], "student_seeds": [10, 11, 12, 13, 14, 15],
                        "conditions": {"siddo": True, "kd": {"alphas": [0.9]}, "rcd": {"alphas": [0.9]},
                                       "tfkd": {"alphas": [0.9], **tfkd}}}]}


def test_the_schema_and_the_plan_know_it(tmp_path):
    plan = build_plan(parse_sweep(_sweep(tmp_path, confidences=[0.9, 0.8])))
    labels = {s.label for s in plan.students if s.method == "tfkd"}
    assert "digits-tiny-tfkd-a0.9-t0-s10" in labels and "digits-tiny-tfkd-a0.9-c0.8-t0-s10" in labels
    assert len(labels) == 12
    spec = next(s for s in plan.students if s.method == "tfkd")
    assert spec.params == {"alpha": 0.9, "temperature": 1.0, "confidence": 0.9}
    with pytest.raises(SweepError, match=r"setups\[0\]\.conditions\.tfkd\.confidences: confidence must be in \(0, 1\]"):
        parse_sweep(_sweep(tmp_path, confidences=[0]))


@pytest.mark.slow
def test_it_runs_through_sweep_mlflow_and_report(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(_sweep(tmp_path)))
    was_running = ray.is_initialized()
    try:
        assert main(["sweep", str(path), "--quiet"]) == 0
    finally:
        if not was_running:
            ray.shutdown()
    uri = f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tfkd-e2e")
    runs = client.search_runs([exp.experiment_id], "tags.`kdray.method` = 'tfkd'")
    assert len(runs) == 6 and all(r.info.status == "FINISHED" for r in runs)
    assert json.loads(runs[0].data.tags["kdray.condition"])["params"]["confidence"] == 0.9
    assert all("prediction_disagreement" in r.data.metrics for r in runs)

    out = tmp_path / "report"
    assert main(["report", str(path), "--out", str(out)]) == 0
    with open(out / "data" / "tests.csv") as f:
        tests = list(csv.DictReader(f))
    against = {r["metric"] for r in tests if r["condition"] == "KD α=0.9" and r["control"] == "Tf-KD α=0.9"}
    assert {"activation_distance", "js_divergence", "rank_disagreement", "prediction_disagreement",
            "test_acc", "test_loss"} <= against
    metrics_md = (out / "tables" / "metrics_digits-tiny_t0.md").read_text()
    assert "| Tf-KD α=0.9 | 6 |" in metrics_md
    assert "Tf-KD" in (out / "figures" / "metrics_digits-tiny.svg").read_text()
