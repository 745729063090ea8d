"""What a person sees first in the MLflow UI: the model-training view, readable nested runs."""
from mlflow.tracking import MlflowClient

from kdray.plan import build_plan
from kdray.sweep import parse_sweep
from kdray.tracking import Tracker


def test_experiments_open_in_mlflow_3_s_model_training_view_with_nested_readable_runs(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    old = client.create_experiment("old")                       # made before kdray set the tag
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    Tracker(uri, "old")
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"

    tracker = Tracker(uri, "new")
    exp = client.get_experiment_by_name("new")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    sweep = parse_sweep({"name": "new", "setups": [{"name": "digits-cnn", "dataset": {"name": "digits"},
                                                    "teacher": {"arch": "small_cnn"}, "recipe": {"epochs": 1},
                                                    "teacher_seeds": [0], "student_seeds": [3]}]}, "x.yaml")
    student = next(s for s in build_plan(sweep).all if s.method == "kd")
    run = client.get_run(tracker.start_trial(student))
    assert run.data.tags["mlflow.parentRunId"] == tracker.parent_id
    assert client.get_run(tracker.parent_id).info.run_name == "sweep new"
    assert run.info.run_name.startswith("digits-cnn-kd") and "t0" in run.info.run_name and "s3" in run.info.run_name
