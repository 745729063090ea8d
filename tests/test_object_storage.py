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


def _no_ray():
    import ray
    assert not ray.is_initialized(), "Ray started before the storage was checked"


def test_a_reachable_bucket_validates_and_the_write_check_leaves_nothing(tmp_path, capsys, s3_env):
    path = _write(tmp_path, f"s3://{BUCKET}/ok")
    assert main(["validate", path]) == 0, capsys.readouterr().err
    assert "ok (" in capsys.readouterr().out
    # The marker object was written and deleted; pyarrow keeps the emptied prefix as a folder
    # marker ("ok/"), where the sweep would write anyway.
    assert s3_env.keys(BUCKET, "ok") in ([], ["ok/"])


@pytest.mark.parametrize("command", ["validate", "sweep"])
def test_an_unreachable_endpoint_is_one_line_in_seconds(tmp_path, capsys, s3_env, monkeypatch, command):
    port = _free_port()      # nothing listens here
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    path = _write(tmp_path, f"s3://{BUCKET}/kdray")
    t0 = time.time()
    rc = main([command, path])
    _one_line(capsys, rc, f"{path}: storage: s3://{BUCKET}/kdray", f"127.0.0.1:{port}", "does not answer",
              "AWS_ENDPOINT_URL")
    assert time.time() - t0 < 30
    _no_ray()


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


def test_the_server_really_refuses_wrong_credentials(s3):
    """The credential test above is meaningful only if moto checks keys: it does (IAM enforced)."""
    from botocore.exceptions import ClientError
    with pytest.raises(ClientError):
        s3.client(secret="not-the-right-one").list_objects_v2(Bucket=BUCKET)
    s3.client().list_objects_v2(Bucket=BUCKET)


@pytest.mark.parametrize("command", ["validate", "sweep"])
def test_object_storage_without_a_tracking_uri_is_one_line(tmp_path, capsys, s3_env, command):
    path = _write(tmp_path, f"s3://{BUCKET}/kdray", tracking=None)
    _one_line(capsys, main([command, path]), "storage:", "cannot hold the MLflow database", "tracking_uri",
              "MLFLOW_TRACKING_URI")
    _no_ray()


def test_an_unknown_scheme_is_one_line(tmp_path, capsys):
    path = _write(tmp_path, "ftp://host/kdray")
    _one_line(capsys, main(["validate", path]), "storage:", "unknown scheme", "s3://BUCKET/PREFIX")


def test_the_storage_override_is_checked_too(tmp_path, capsys, s3_env):
    path = _write(tmp_path, str(tmp_path / "results"))
    _one_line(capsys, main(["sweep", path, "--storage", "s3://no-such-bucket/x"]), "no-such-bucket")
    _no_ray()
