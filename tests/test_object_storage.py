"""``storage: s3://BUCKET/PREFIX`` against a real S3-protocol server (moto's, on 127.0.0.1).

The checks before Ray starts (unreachable endpoint, missing bucket, refused credentials,
no tracking URI) are one ``kdray: error:`` line and exit 2, in ``validate`` and ``sweep``.
The end-to-end sweeps (slow) keep trials, Tune state and MLflow artifacts in the bucket,
resume, report, and load a checkpoint teacher from the bucket.
"""
from __future__ import annotations

import io
import os
import socket
import time

import pytest
import yaml

from kdray.cli import main
from s3server import moto_s3
from sweeps import SMALL_GRID, sweep_dict

BUCKET = "kdray-bucket"
ENDPOINT_VARS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "MLFLOW_S3_ENDPOINT_URL",
                 "MLFLOW_TRACKING_URI")


@pytest.fixture(scope="module")
def s3():
    """One moto server that checks credentials, with the test bucket, for the module."""
    with moto_s3(auth=True) as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture()
def s3_env(s3, monkeypatch):
    """The server's endpoint and keys in this process's environment, only for the test."""
    for k in ENDPOINT_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in s3.env().items():
        monkeypatch.setenv(k, v)
    return s3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write(tmp_path, storage: str, tracking: str | None = "sqlite", **setup) -> str:
    top = {} if tracking is None else {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    data = sweep_dict("objs", storage, top=top, **setup)
    path = tmp_path / "objs.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _one_line(capsys, rc, *words) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("kdray: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err
    return err


@pytest.fixture()
def nothing_started(tmp_path):
    """After the test: no MLflow database was created (MLflow opens before Ray starts) and, unless
    another test's Ray was already up, Ray was not started."""
    import ray
    ray_before = ray.is_initialized()
    yield
    assert not (tmp_path / "mlflow.db").exists(), "MLflow was opened before the storage was checked"
    assert ray_before or not ray.is_initialized(), "Ray started before the storage was checked"


def test_a_reachable_bucket_validates_and_the_write_check_leaves_nothing(tmp_path, capsys, s3_env):
    path = _write(tmp_path, f"s3://{BUCKET}/ok")
    assert main(["validate", path]) == 0, capsys.readouterr().err
    assert "ok (" in capsys.readouterr().out
    # The marker object was written and deleted; pyarrow keeps the emptied prefix as a folder
    # marker ("ok/"), where the sweep would write anyway.
    assert s3_env.keys(BUCKET, "ok") in ([], ["ok/"])


@pytest.mark.parametrize("command", ["validate", "sweep"])
def test_an_unreachable_endpoint_is_one_line_in_seconds(tmp_path, capsys, s3_env, monkeypatch, command,
                                                       nothing_started):
    port = _free_port()      # nothing listens here
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    path = _write(tmp_path, f"s3://{BUCKET}/kdray")
    t0 = time.time()
    rc = main([command, path])
    _one_line(capsys, rc, f"{path}: storage: s3://{BUCKET}/kdray", f"127.0.0.1:{port}", "does not answer",
              "AWS_ENDPOINT_URL")
    assert time.time() - t0 < 30


def test_a_missing_bucket_is_one_line(tmp_path, capsys, s3_env):
    path = _write(tmp_path, "s3://no-such-bucket/kdray")
    _one_line(capsys, main(["validate", path]), "storage:", "bucket 'no-such-bucket' does not exist",
              s3_env.endpoint, "create it")
    assert "no-such-bucket" not in [b["Name"] for b in s3_env.client().list_buckets()["Buckets"]]


@pytest.mark.parametrize("wrong", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_refused_credentials_are_one_line(tmp_path, capsys, s3_env, monkeypatch, wrong):
    monkeypatch.setenv(wrong, "not-the-right-one")
    path = _write(tmp_path, f"s3://{BUCKET}/kdray")
    _one_line(capsys, main(["validate", path]), "storage:", "refused the credentials", "AWS_SECRET_ACCESS_KEY")


def test_credentials_that_may_read_but_not_write_are_one_line(tmp_path, capsys, s3_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_env.reader[0])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.reader[1])
    path = _write(tmp_path, f"s3://{BUCKET}/kdray")
    _one_line(capsys, main(["validate", path]), "storage:", "refused the credentials while writing a marker object",
              "writes and deletes under the prefix")


def test_the_server_really_refuses_wrong_credentials(s3):
    """The credential test above is meaningful only if moto checks keys: it does (IAM enforced)."""
    from botocore.exceptions import ClientError
    with pytest.raises(ClientError):
        s3.client(secret="not-the-right-one").list_objects_v2(Bucket=BUCKET)
    s3.client().list_objects_v2(Bucket=BUCKET)
    reader = s3.client(*s3.reader)
    reader.list_objects_v2(Bucket=BUCKET)                   # the reader may list ...
    with pytest.raises(ClientError):
        reader.put_object(Bucket=BUCKET, Key="x", Body=b"") # ... but not write


@pytest.mark.parametrize("command", ["validate", "sweep"])
def test_object_storage_without_a_tracking_uri_is_one_line(tmp_path, capsys, s3_env, command, nothing_started):
    path = _write(tmp_path, f"s3://{BUCKET}/kdray", tracking=None)
    _one_line(capsys, main([command, path]), "storage:", "cannot hold the MLflow database", "tracking_uri",
              "MLFLOW_TRACKING_URI")


def test_an_unknown_scheme_is_one_line(tmp_path, capsys):
    path = _write(tmp_path, "ftp://host/kdray")
    _one_line(capsys, main(["validate", path]), "storage:", "unknown scheme", "s3://BUCKET/PREFIX")


def test_the_storage_override_is_checked_too(tmp_path, capsys, s3_env, nothing_started):
    path = _write(tmp_path, str(tmp_path / "results"))
    _one_line(capsys, main(["sweep", path, "--storage", "s3://no-such-bucket/x"]), "no-such-bucket")


# ------------------------------------------------------------------ end to end (Ray, MLflow, torch)

def _trial_runs(uri: str, name: str):
    from mlflow.tracking import MlflowClient
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    return client, exp, client.search_runs([exp.experiment_id], "tags.`kdray.kind` = 'trial'", max_results=1000)


def sweep_into_bucket(server, scheme: str, endpoint_var: str, tmp_path, capsys, monkeypatch):
    """Run a small sweep with ``storage: <scheme>://BUCKET/e2e`` and check what lands in the bucket:
    each trial's artefacts, the teachers' weights, no temporaries, Ray Tune's state and MLflow's
    artifacts, one FINISHED run per trial.  Ray started before the test set ``endpoint_var``: its
    workers find the bucket only because kdray hands it to the trial actors (objectstore.carried_to_trials).
    Returns (sweep file, plan, bucket keys, MLflow client, trial runs)."""
    import ray
    from kdray.plan import build_plan
    from kdray.sweep import load_sweep

    assert ray.get(ray.remote(lambda: os.environ.get(endpoint_var)).remote()) != os.environ[endpoint_var]
    monkeypatch.chdir(tmp_path)
    storage = f"{scheme}://{BUCKET}/e2e"
    path = _write(tmp_path, storage, **SMALL_GRID, teacher={"arch": "mlp", "args": {"hidden": 32}},
                  recipe={"epochs": 1, "batch_size": 128, "lr": 0.01})
    plan = build_plan(load_sweep(path))
    assert main(["sweep", path, "--quiet"]) == 0, capsys.readouterr().err[-3000:]
    out = capsys.readouterr().out
    assert f"{len(plan.all)} trials finished now" in out, out

    keys = set(server.keys(BUCKET, "e2e/"))
    for spec in plan.all:
        own = {k.rsplit("/", 1)[1] for k in keys if k.startswith(f"e2e/trials/{spec.trial_key}/")}
        assert {"test_outputs.npz", "result.json"} <= own, (spec.label, own)
        if spec.role == "teacher":
            assert {"model.pt", "test_logits.npy"} <= own, own
    assert not [k for k in keys if k.endswith(".tmp")]          # every write was renamed into place
    assert any(k.startswith("e2e/objs/tune/trials/") for k in keys), "no Ray Tune state in the bucket"
    # MLflow's artifacts (sqlite-tracked sweep) went to the bucket too, through MLflow's own client.
    client, exp, runs = _trial_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "objs")
    assert exp.artifact_location == f"{storage}/mlartifacts/objs"
    assert sorted(r.data.tags["kdray.trial_key"] for r in runs) == sorted(s.trial_key for s in plan.all)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert any(k.startswith("e2e/mlartifacts/objs/") and k.endswith("/test_outputs.npz") for k in keys)
    teacher_run = next(r for r in runs if r.data.tags["kdray.role"] == "teacher")
    assert "model.pt" in {a.path for a in client.list_artifacts(teacher_run.info.run_id)}
    return path, plan, keys, client, runs


def test_a_sweep_on_s3_storage_writes_resumes_and_reports(local_ray, s3_env, tmp_path, capsys, monkeypatch):
    from kdray.data import load_dataset
    from kdray.storage import Store

    path, plan, keys, client, runs = sweep_into_bucket(s3_env, "s3", "AWS_ENDPOINT_URL", tmp_path, capsys, monkeypatch)
    fixed_inputs = load_dataset("digits").train_inputs_are_fixed()
    for spec in plan.teachers:      # the KD students' cached teacher logits
        own = {k.rsplit("/", 1)[1] for k in keys if k.startswith(f"e2e/trials/{spec.trial_key}/")}
        assert fixed_inputs == ("train_logits.npy" in own), own
    storage = f"s3://{BUCKET}/e2e"
    teacher_run = next(r for r in runs if r.data.tags["kdray.role"] == "teacher")
    # What the store reads back is what the trial computed (as MLflow logged it).
    store = Store(storage, "objs")
    result = store.load_json(plan.teachers[0].trial_key, "result.json")
    assert teacher_run.data.metrics["test_acc"] == pytest.approx(result["final"]["test_acc"])

    # `kdray status` counts from MLflow and the bucket (a teacher's model.pt there counts as done).
    assert main(["status", path]) == 0
    assert f"sweep objs: {len(plan.all)}/{len(plan.all)} trials done" in capsys.readouterr().out

    # Run again: everything is done, nothing is retrained.
    assert main(["sweep", path, "--quiet"]) == 0
    assert f"0 trials finished now, {len(plan.all)} already done" in capsys.readouterr().out
    assert len(_trial_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "objs")[2]) == len(plan.all)

    # The report reads the runs back and logs itself to MLflow (its artifacts: into the bucket).
    assert main(["report", path, "--jobs", "1", "--out", str(tmp_path / "report")]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "logged to MLflow" in out, out
    assert (tmp_path / "report").is_dir() and any((tmp_path / "report").iterdir())


def test_a_checkpoint_teacher_in_the_bucket_is_loaded_not_trained(local_ray, s3_env, tmp_path, capsys):
    """``teacher: {checkpoint: s3://...}``: validated in the driver, loaded by the trial's worker from the bucket."""
    import hashlib

    import torch
    from kdray.data import load_dataset
    from kdray.models import build_model
    from kdray.storage import Store

    torch.manual_seed(0)
    b = load_dataset("digits")
    model = build_model("mlp", b.num_classes, b.input_shape, hidden=32)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for xb, yb in b.train_batches(64, b.steps_per_epoch(64), g):
        loss = torch.nn.functional.cross_entropy(model(b.preprocess(xb, True, g)), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    s3_env.client().put_object(Bucket=BUCKET, Key="pretrained/teacher.pt", Body=buf.getvalue())
    sha = hashlib.sha256(buf.getvalue()).hexdigest()

    path = _write(tmp_path, f"s3://{BUCKET}/ckpt", teacher={"arch": "mlp", "args": {"hidden": 32},
                                                            "checkpoint": f"s3://{BUCKET}/pretrained/teacher.pt"},
                  student_seeds=[10], conditions={"siddo": True, "kd": None, "rcd": None}, recipe={"epochs": 1, "batch_size": 128})
    assert main(["sweep", path, "--quiet"]) == 0, capsys.readouterr().err[-3000:]
    assert "2 trials finished now" in capsys.readouterr().out
    _, _, runs = _trial_runs(f"sqlite:///{tmp_path / 'mlflow.db'}", "objs")
    (teacher,) = [r for r in runs if r.data.tags["kdray.role"] == "teacher"]
    assert teacher.data.tags["kdray.checkpoint_sha256"] == sha
    assert "train_loss" not in teacher.data.metrics          # loaded, not trained
    stored = torch.load(io.BytesIO(Store(f"s3://{BUCKET}/ckpt", "objs").read_bytes(
        teacher.data.tags["kdray.trial_key"], "model.pt")), weights_only=True)
    given = model.state_dict()
    assert stored.keys() == given.keys() and all(torch.equal(stored[k], given[k]) for k in given)


def test_a_missing_checkpoint_in_the_bucket_is_one_line(tmp_path, capsys, s3_env):
    path = _write(tmp_path, f"s3://{BUCKET}/ckpt", teacher={"arch": "mlp", "checkpoint": f"s3://{BUCKET}/nope.pt"})
    _one_line(capsys, main(["validate", path]), "setups[0].teacher.checkpoint:", f"s3://{BUCKET}/nope.pt",
              "does not exist")


@pytest.mark.slow      # two sweeps in subprocesses, each with its own Ray cluster
def test_a_killed_driver_resumes_from_the_bucket(s3_env, tmp_path):
    """The driver (its own process and Ray cluster) crashes once a student is logged; the rerun
    trains only what is missing and finds the finished trials' artefacts in the bucket."""
    import signal
    import subprocess
    import sys

    from kdray.plan import build_plan
    from kdray.sweep import load_sweep
    from kdray.testhook import ENV as EXIT_AT, EXIT_STATUS

    path = _write(tmp_path, f"s3://{BUCKET}/crash", **SMALL_GRID, teacher={"arch": "mlp", "args": {"hidden": 32}},
                  recipe={"epochs": 1, "batch_size": 128, "lr": 0.01})
    plan = build_plan(load_sweep(path))
    crash = next(s for s in plan.students if s.method == "kd")
    kdray = [sys.executable, "-m", "kdray.cli", "sweep", path, "--quiet"]
    p = subprocess.Popen(kdray, start_new_session=True, env={**os.environ, EXIT_AT: f"driver:{crash.label}:1"},
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = p.communicate(timeout=300)
        assert p.returncode == EXIT_STATUS, f"the driver did not crash at the planned point: {err[-2000:]}"
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)      # the local Ray cluster the dead driver had started
        except ProcessLookupError:
            pass
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = {r.data.tags["kdray.trial_key"]: r.info.run_id for r in _trial_runs(uri, "objs")[2]
              if r.info.status == "FINISHED"}
    assert crash.trial_key in before and len(before) < len(plan.all)

    done = subprocess.run(kdray, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{len(before)} already done" in done.stdout, done.stdout
    runs = _trial_runs(uri, "objs")[2]
    assert sorted(r.data.tags["kdray.trial_key"] for r in runs) == sorted(s.trial_key for s in plan.all)
    assert all(r.info.status == "FINISHED" for r in runs)
    after = {r.data.tags["kdray.trial_key"]: r.info.run_id for r in runs}
    assert all(after[k] == run_id for k, run_id in before.items())      # nothing finished was retrained
    keys = set(s3_env.keys(BUCKET, "crash/trials/"))
    assert all(f"crash/trials/{s.trial_key}/result.json" in keys for s in plan.all)


def test_plan_is_a_preview_that_does_not_contact_the_store(tmp_path, capsys, monkeypatch, s3_env):
    """`kdray plan` may run where the bucket is out of reach (a laptop before `ray job submit`)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    for tracking in ("sqlite", None):
        path = _write(tmp_path, f"s3://{BUCKET}/kdray", tracking=tracking)
        assert main(["plan", path]) == 0, capsys.readouterr().err
        assert "sweep objs:" in capsys.readouterr().out
    assert main(["validate", path]) == 2          # validate does contact it
    capsys.readouterr()
