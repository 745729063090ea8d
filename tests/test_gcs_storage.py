"""``storage: gs://BUCKET/PREFIX`` against a real GCS-protocol server (gcp-storage-emulator, on 127.0.0.1).

The same checks before Ray starts as for s3:// (tests/test_object_storage.py), with the
GCS variables in their messages, and one end-to-end sweep (slow) whose trials, teacher
weights, Tune state and MLflow artifacts land in the bucket, read back by ``kdray report``.
The emulator checks no credentials, so refused credentials are tested only on S3.
"""
from __future__ import annotations

import time

import pytest

from gcsserver import gcs_emulator
from kdray.cli import main
from test_object_storage import _free_port, _one_line, _write, sweep_into_bucket

BUCKET = "kdray-bucket"
GCS_VARS = ("CLOUD_STORAGE_EMULATOR_ENDPOINT", "STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS",
            "GOOGLE_CLOUD_PROJECT", "GCE_METADATA_ROOT", "GCE_METADATA_HOST", "MLFLOW_TRACKING_URI")


@pytest.fixture(scope="module")
def gcs():
    """One emulator, with the test bucket, for the module."""
    with gcs_emulator() as server:
        server.client().create_bucket(BUCKET)
        yield server


@pytest.fixture()
def gcs_env(gcs, monkeypatch):
    """The emulator's endpoint and a service-account key in this process's environment, only for the test."""
    for k in GCS_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in gcs.env().items():
        monkeypatch.setenv(k, v)
    return gcs


def test_a_reachable_bucket_validates_and_the_write_check_leaves_nothing(tmp_path, capsys, gcs_env):
    path = _write(tmp_path, f"gs://{BUCKET}/ok")
    assert main(["validate", path]) == 0, capsys.readouterr().err
    assert "ok (" in capsys.readouterr().out
    assert [k for k in gcs_env.keys(BUCKET, "ok") if ".kdray-write-check-" in k] == []


def test_an_unreachable_endpoint_is_one_line_in_seconds(tmp_path, capsys, gcs_env, monkeypatch):
    nowhere = f"http://127.0.0.1:{_free_port()}"      # nothing listens here
    monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", nowhere)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", nowhere)
    path = _write(tmp_path, f"gs://{BUCKET}/kdray")
    t0 = time.time()
    rc = main(["validate", path])
    err = _one_line(capsys, rc, f"{path}: storage: gs://{BUCKET}/kdray", nowhere, "does not answer",
                    "CLOUD_STORAGE_EMULATOR_ENDPOINT", "STORAGE_EMULATOR_HOST")
    assert "AWS_" not in err
    assert time.time() - t0 < 30


def test_a_missing_bucket_is_one_line(tmp_path, capsys, gcs_env):
    path = _write(tmp_path, "gs://no-such-bucket/kdray")
    _one_line(capsys, main(["validate", path]), "storage:", "bucket 'no-such-bucket' does not exist",
              gcs_env.endpoint, "gcloud storage buckets create gs://no-such-bucket")
    assert "no-such-bucket" not in [b.name for b in gcs_env.client().list_buckets()]


def test_no_credentials_are_one_line(tmp_path, capsys, gcs_env, monkeypatch):
    """The emulator needs none, but pyarrow's client does: without a key it asks the GCE metadata
    server for a token (pointed here at a local port where nothing listens)."""
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS")
    monkeypatch.setenv("GCE_METADATA_ROOT", f"127.0.0.1:{_free_port()}")
    path = _write(tmp_path, f"gs://{BUCKET}/kdray")
    t0 = time.time()
    _one_line(capsys, main(["validate", path]), "storage:", "found no credentials for endpoint", gcs_env.endpoint,
              "GOOGLE_APPLICATION_CREDENTIALS")
    assert time.time() - t0 < 30


def test_a_sweep_on_gcs_storage_writes_and_reports(local_ray, gcs_env, tmp_path, capsys, monkeypatch):
    path, plan, keys, client, runs = sweep_into_bucket(gcs_env, "gs", "CLOUD_STORAGE_EMULATOR_ENDPOINT", tmp_path,
                                                       capsys, monkeypatch)

    # The report reads the runs back and logs itself to MLflow (its artifacts: into the bucket).
    assert main(["report", path, "--jobs", "1", "--out", str(tmp_path / "report")]) == 0, capsys.readouterr().err
    assert "logged to MLflow" in capsys.readouterr().out
    assert (tmp_path / "report").is_dir() and any((tmp_path / "report").iterdir())
    assert len(set(gcs_env.keys(BUCKET, "e2e/mlartifacts/objs/"))) > len(
        [k for k in keys if k.startswith("e2e/mlartifacts/objs/")]), "the report logged no artifact to the bucket"


def test_mlflow_artifacts_under_a_gcs_scheme_storage_use_gs():
    """pyarrow opens gcs:// and gs:// alike, MLflow's artifact store only gs://: a sweep tracked in
    sqlite with ``storage: gcs://...`` keeps its MLflow artifacts at the gs:// spelling of the same place."""
    from kdray.objectstore import artifact_root

    assert artifact_root("gcs://bkt/pre/", "sw", "sqlite:///m.db") == "gs://bkt/pre/mlartifacts/sw"
    assert artifact_root("gs://bkt/pre", "sw", "sqlite:///m.db") == "gs://bkt/pre/mlartifacts/sw"
    assert artifact_root("gcs://bkt/pre", "sw", "http://tracking:5000") is None
