"""End to end on a local Ray cluster with MLflow on a temporary sqlite file."""
import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kdray.engine import run_sweep
from kdray.plan import build_plan
from kdray.sweep import ModelRef, parse_sweep
from sweeps import SMALL_GRID, make_sweep


def tiny_sweep(tmp_path, name="e2e"):
    return make_sweep(name, tmp_path / "results", **{**SMALL_GRID, "teacher_seeds": [0, 1]}, name="digits-mlp",
                      teacher={"arch": "mlp", "args": {"hidden": 32}},
                      recipe={"epochs": 2, "batch_size": 128, "lr": 0.01})


def test_sweep_logs_every_planned_trial_to_mlflow_and_resubmission_skips(local_ray, tmp_path):
    sweep = tiny_sweep(tmp_path)
    plan = build_plan(sweep)
    assert len(plan.all) == 14
    summary = run_sweep(sweep, verbose=0)
    assert summary.ok and summary.finished == 14, summary.lines()

    client = MlflowClient(sweep.resolved_tracking_uri())
    assert sweep.resolved_tracking_uri() == f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}"
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'")
    assert len(runs) == 14 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags["kdray.trial_key"] for r in runs} == {s.trial_key for s in plan.all}
    parent = client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'sweep'")
    assert len(parent) == 1 and all(r.data.tags["mlflow.parentRunId"] == parent[0].info.run_id for r in runs)

    by_key = {s.trial_key: s for s in plan.all}
    for r in runs:
        spec = by_key[r.data.tags["kdray.trial_key"]]
        assert r.data.params["method"] == spec.method
        assert all(r.data.params[f"params.{k}"] == str(v) for k, v in spec.params.items())
        assert json.loads(r.data.tags["kdray.condition"]) == {"method": spec.method, "params": spec.params,
                                                              "width": spec.width}
        assert r.data.params["recipe.lr"] == "0.01" and r.data.tags["kdray.setup"] == "digits-mlp"
        assert 0 <= r.data.metrics["test_acc"] <= 1 and "train_loss" in r.data.metrics
        curve = client.get_metric_history(r.info.run_id, "train_loss")
        assert [m.step for m in curve][:2] == [1, 2]
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert "test_outputs.npz" in arts
        if spec.role == "student":
            for k in ("activation_distance", "js_divergence", "rank_disagreement", "prediction_disagreement",
                      "prediction_agreement", "correct_agreement", "variation_of_information", "procrustes_distance"):
                assert k in r.data.metrics, k
        else:
            assert "model.pt" in arts

    # Trials ran in parallel against the one sqlite file (the driver is the only writer).
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:])), "no two trials overlapped"

    again = run_sweep(sweep, verbose=0)
    assert again.finished == 0 and again.skipped == 14
    assert len(client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'")) == 14


def test_unreachable_mlflow_fails_before_any_trial(local_ray, tmp_path):
    from kdray.tracking import TrackingError
    sweep = tiny_sweep(tmp_path).model_copy(update={"tracking_uri": "http://127.0.0.1:9"})
    with pytest.raises(TrackingError, match=r"MLflow tracking at http://127.0.0.1:9 is unreachable"):
        run_sweep(sweep, verbose=0)
    assert not (tmp_path / "results" / "e2e" / "tune").exists()


def test_sweep_on_a_filesystem_uri_storage(local_ray, tmp_path):
    """Storage given as a URI goes through pyarrow (as s3:// and gs:// do) and Tune's storage_path."""
    from kdray.storage import Store
    uri = f"file://{tmp_path / 'bucket'}"
    sweep = tiny_sweep(tmp_path, name="uri").model_copy(update={"storage": uri})
    sweep = sweep.model_copy(update={"setups": [sweep.setups[0].model_copy(update={"student_seeds": [10]})]})
    summary = run_sweep(sweep, verbose=0)
    assert summary.ok and summary.finished == 2 + 2 * 3, summary.lines()
    store = Store(uri, "uri")
    plan = build_plan(sweep)
    for t in plan.teachers:
        assert store.exists(t.trial_key, "model.pt") and (tmp_path / "bucket" / "trials" / t.trial_key / "model.pt").is_file()
    assert (tmp_path / "bucket" / "uri" / "tune").is_dir()
    assert sweep.resolved_tracking_uri() == f"sqlite:///{tmp_path / 'bucket' / 'mlflow.db'}"


def test_object_store_without_tracking_uri_is_a_clear_error(monkeypatch):
    from kdray.sweep import SweepError, parse_sweep
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep = parse_sweep({"name": "s3", "storage": "s3://bucket/kdray", "setups": [
        {"name": "d", "dataset": {"name": "digits"}, "teacher": {"arch": "mlp"}, "recipe": {"epochs": 1}}]})
    with pytest.raises(SweepError, match="storage s3://bucket/kdray is an object store: give tracking_uri"):
        sweep.resolved_tracking_uri()


def test_a_second_sweep_reuses_the_teachers_in_shared_storage(local_ray, tmp_path):
    """Same teacher, other sweep (e.g. standard KD after self-distillation): logged, not retrained."""
    first = tiny_sweep(tmp_path, name="first")
    first = first.model_copy(update={"setups": [first.setups[0].model_copy(update={
        "teacher_seeds": [0], "student_seeds": [10], "conditions": first.setups[0].conditions.model_copy(
            update={"kd": None, "rcd": None})})]})
    assert run_sweep(first, verbose=0).finished == 2
    teacher = build_plan(first).teachers[0]
    model_file = tmp_path / "results" / "trials" / teacher.trial_key / "model.pt"
    mtime = model_file.stat().st_mtime_ns

    second = first.model_copy(update={"name": "second", "setups": [first.setups[0].model_copy(update={
        "name": "other-setup", "student": ModelRef(arch="mlp", args={"hidden": 8})})]})
    assert build_plan(second).teachers[0].trial_key == teacher.trial_key
    summary = run_sweep(second, verbose=0)
    assert summary.reused == 1 and summary.finished == 1 and summary.ok, summary.lines()
    assert model_file.stat().st_mtime_ns == mtime  # not retrained
    client = MlflowClient(second.resolved_tracking_uri())
    exp = client.get_experiment_by_name("second")
    runs = client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'")
    t = [r for r in runs if r.data.tags["kdray.role"] == "teacher"]
    assert len(t) == 1 and t[0].data.tags.get("kdray.reused") == "true" and t[0].info.status == "FINISHED"
    assert "test_acc" in t[0].data.metrics


def test_students_start_when_their_own_teacher_is_done_and_batched_reports_keep_every_epoch(local_ray, tmp_path):
    """No stage barrier: a fast teacher's students run while a slow teacher still trains.  With
    report_every_s far above a trial's length every trial reports once, yet MLflow has every epoch."""
    fast = {"name": "fast", "dataset": {"name": "digits"}, "teacher": {"arch": "mlp", "args": {"hidden": 16}},
            "recipe": {"epochs": 3, "batch_size": 128}, "teacher_seeds": [0], "student_seeds": [10, 11],
            "conditions": {"siddo": True, "kd": None, "rcd": None}}
    slow = {"name": "slow", "dataset": {"name": "digits"}, "teacher": {"arch": "small_cnn", "args": {"channels": 16}},
            "recipe": {"epochs": 40, "batch_size": 32}, "teacher_seeds": [0], "student_seeds": [10],
            "conditions": {"siddo": True, "kd": None, "rcd": None}}
    sweep = parse_sweep({"name": "nobarrier", "storage": str(tmp_path / "results"), "report_every_s": 1000,
                         "setups": [slow, fast]})
    summary = run_sweep(sweep, verbose=0)
    assert summary.ok and summary.finished == 5, summary.lines()

    client = MlflowClient(sweep.resolved_tracking_uri())
    exp = client.get_experiment_by_name("nobarrier")
    runs = client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'")
    slow_teacher = next(r for r in runs if r.data.tags["kdray.setup"] == "slow" and r.data.tags["kdray.role"] == "teacher")
    fast_students = [r for r in runs if r.data.tags["kdray.setup"] == "fast" and r.data.tags["kdray.role"] == "student"]
    assert len(fast_students) == 2
    assert min(r.info.start_time for r in fast_students) < slow_teacher.info.end_time, "students waited for every teacher"
    assert [m.step for m in client.get_metric_history(slow_teacher.info.run_id, "train_loss")] == list(range(1, 41))


def test_tunes_slow_result_warnings_are_dropped_during_a_sweep_and_other_warnings_kept(monkeypatch, caplog):
    """Tune's own ``warn_if_slow`` over a slow result (kdray's callback logging a pack's runs) says to
    report less often, which does not apply: inside the sweep's context it is dropped; another warning
    of the same logger, and the same warning outside the sweep, still reach the user."""
    import logging
    import time

    from ray.tune.utils import util

    from kdray.engine import _graceful_interrupt
    from kdray.mlflow_callback import Flag

    monkeypatch.setattr(util, "START_OF_TIME", time.time() - 120)      # Tune stays quiet in its first minute

    def slow():
        with util.warn_if_slow("process_trial_result", threshold=0.001):
            time.sleep(0.01)

    caplog.set_level(logging.WARNING, logger="ray.tune.utils.util")
    with _graceful_interrupt(Flag()):
        slow()
        util.logger.warning("another Tune warning")
    inside = [r.getMessage() for r in caplog.records]
    assert inside == ["another Tune warning"], inside
    caplog.clear()
    slow()
    assert any("process_trial_result" in r.getMessage() for r in caplog.records)
