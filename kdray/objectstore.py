"""Object storage (``s3://``, ``gs://``) checked before Ray starts, in a few seconds.

pyarrow opens a bucket lazily and retries for long: an unreachable endpoint, a missing
bucket or refused credentials would otherwise surface mid-sweep as a long traceback from
Ray Tune or a trial.  ``check_storage`` opens the store as the sweep will (the same
``FileSystem.from_uri``, so the same endpoint override and credentials), then with short
timeouts and one attempt: looks up the bucket, lists the prefix, and writes and deletes a
small marker under it.  Each failure is one ``SweepError`` line with the fix.

S3-compatible servers (MinIO, Ceph, moto, ...) are reached through the standard AWS
variables: ``AWS_ENDPOINT_URL`` (pyarrow, so Ray Tune and kdray's trials, and boto3),
``MLFLOW_S3_ENDPOINT_URL`` (MLflow's artifact client, which otherwise also uses
``AWS_ENDPOINT_URL``), ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` and
``AWS_DEFAULT_REGION``.  Google Cloud Storage is reached with Google's default credentials
(``GOOGLE_APPLICATION_CREDENTIALS``, or a node's own), a GCS emulator through
``CLOUD_STORAGE_EMULATOR_ENDPOINT`` (pyarrow) and ``STORAGE_EMULATOR_HOST`` (MLflow's
client, google-cloud-storage).  ``carried_to_trials`` hands the endpoint and region
variables to Tune's trial actors, which Tune does not do itself (it carries only the AWS keys).
"""
from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from datetime import timedelta

from kdray.sweep import SweepError

TIMEOUT_S = 5.0
GCS_RETRY_S = 2.0      # google-cloud-cpp retries a refused connection until this; one request may take longer
SCHEMES = ("s3", "gs", "gcs")
# Variables a trial on another node needs to find the same S3-compatible server or GCS
# emulator; Tune's trial actors get AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and
# AWS_SESSION_TOKEN already, not GOOGLE_APPLICATION_CREDENTIALS (a key file's path, which
# must then exist on every node).  The last one is kdray/streamed.py's ENV: where a trial's
# metrics stream must not depend on its node.
CARRIED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION",
               "MLFLOW_S3_ENDPOINT_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT", "STORAGE_EMULATOR_HOST",
               "GOOGLE_APPLICATION_CREDENTIALS", "KDRAY_METRICS_MEMORY_BYTES")
GCS_EMULATOR_ENV = "CLOUD_STORAGE_EMULATOR_ENDPOINT"


def _is_gcs(uri: str) -> bool:
    return uri.split("://", 1)[0].lower() in ("gs", "gcs")


def _fixes(uri: str) -> dict[str, str]:
    """What to set for this store: its endpoint (a local server), its credentials, a new bucket."""
    if _is_gcs(uri):
        return {"endpoint": f"set {GCS_EMULATOR_ENV} (pyarrow) and STORAGE_EMULATOR_HOST (MLflow) to "
                            "http://HOST:PORT for a GCS emulator",
                "credentials": "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file (any key for an "
                               "emulator), or run where Google's default credentials are found",
                "create": "gcloud storage buckets create"}
    return {"endpoint": "set AWS_ENDPOINT_URL=http(s)://HOST:PORT for an S3-compatible server",
            "credentials": "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            "create": "aws s3 mb"}


def is_object_store(storage: str) -> bool:
    return "://" in storage and not storage.startswith("file://")


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:240] or type(e).__name__


def _kind(text: str) -> str:
    """What an S3/GCS error says went wrong: nocredentials, unreachable, denied, missing or other."""
    t = text.upper()
    if "ACCESS TOKEN" in t:     # google-cloud-cpp found no credentials (its error also says UNAVAILABLE)
        return "nocredentials"
    if any(w in t for w in ("NETWORK_CONNECTION", "COULD NOT CONNECT", "COULD NOT RESOLVE", "TIMEOUT", "TIMED OUT",
                            "CONNECTION REFUSED", "UNAVAILABLE")):
        return "unreachable"
    if any(w in t for w in ("ACCESS_DENIED", "ACCESSDENIED", "SIGNATURE_DOES_NOT_MATCH", "INVALID_ACCESS_KEY",
                            "INVALIDACCESSKEYID", "FORBIDDEN", "PERMISSION", "UNAUTHENTICATED", "CREDENTIAL",
                            "EXPIRED_TOKEN", "EXPIREDTOKEN")):
        return "denied"
    if any(w in t for w in ("NO_SUCH_BUCKET", "NOSUCHBUCKET", "RESOURCE_NOT_FOUND", "NOT_FOUND")):
        return "missing"
    return "other"


def _bounded(fs):
    """The same filesystem with short timeouts and a single attempt (pyarrow's own retry for minutes)."""
    import pyarrow.fs as pafs

    kwargs = dict(fs.__reduce__()[1][0])
    if isinstance(fs, pafs.S3FileSystem):
        kwargs.update(connect_timeout=TIMEOUT_S, request_timeout=TIMEOUT_S,
                      retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        return pafs.S3FileSystem(**kwargs)
    if isinstance(fs, getattr(pafs, "GcsFileSystem", ())):
        kwargs.update(retry_time_limit=timedelta(seconds=GCS_RETRY_S))
        return pafs.GcsFileSystem(**kwargs)
    return fs


def _endpoint(fs, gcs: bool) -> str:
    try:
        kwargs = fs.__reduce__()[1][0]
    except Exception:
        return "its endpoint"
    if kwargs.get("endpoint_override"):
        return f"endpoint {kwargs['endpoint_override']}"
    if gcs:
        emulator = os.environ.get(GCS_EMULATOR_ENV)
        return f"endpoint {emulator}" if emulator else f"Google Cloud Storage (no {GCS_EMULATOR_ENV})"
    return f"the provider's endpoint{' in ' + kwargs['region'] if kwargs.get('region') else ''} (no AWS_ENDPOINT_URL)"


def check_storage(uri: str, where: str) -> None:
    """SweepError (one line, ``where: uri: why (fix)``) unless the bucket answers, exists and takes a write."""
    import pyarrow.fs as pafs

    scheme = uri.split("://", 1)[0].lower()
    if scheme not in SCHEMES:
        raise SweepError(f"{where}: {uri}: unknown scheme {scheme + '://'!r}; give a local folder, file:///PATH, "
                         "s3://BUCKET/PREFIX or gs://BUCKET/PREFIX")
    fixes = _fixes(uri)
    try:
        fs, root = pafs.FileSystem.from_uri(uri)
    except Exception as e:     # pyarrow resolves an S3 bucket's region here when none is configured
        why = _first_line(e)
        fix = {"unreachable": f"check the network, or {fixes['endpoint']}",
               "denied": fixes["credentials"], "nocredentials": fixes["credentials"],
               "missing": "create the bucket or fix the URI"}.get(_kind(why), f"fix the URI, or {fixes['endpoint']}")
        raise SweepError(f"{where}: {uri}: cannot open the object store ({why}); {fix}") from None
    root = root.rstrip("/")
    bucket = root.split("/", 1)[0]
    if not bucket:
        raise SweepError(f"{where}: {uri}: names no bucket; give {scheme}://BUCKET/PREFIX")
    fs = _bounded(fs)
    at = _endpoint(fs, _is_gcs(uri))

    def fail(step: str, e: BaseException):
        why = _first_line(e)
        kind = _kind(why)
        if kind == "unreachable":
            msg = f"{at} does not answer ({why}); start the server or {fixes['endpoint']}"
        elif kind == "nocredentials":
            msg = f"found no credentials for {at} while {step} ({why}); {fixes['credentials']}"
        elif kind == "denied":
            msg = (f"{at} refused the credentials while {step} ({why}); {fixes['credentials']} (or the "
                   f"bucket's policy: kdray lists, writes and deletes under the prefix)")
        elif kind == "missing":
            msg = f"bucket {bucket!r} does not exist at {at}; create it or fix the URI"
        else:
            msg = f"{step} failed at {at} ({why})"
        return SweepError(f"{where}: {uri}: {msg}")

    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise fail("looking up the bucket", e) from None
    if info.type == pafs.FileType.NotFound:
        raise SweepError(f"{where}: {uri}: bucket {bucket!r} does not exist at {at}; create it "
                         f"(e.g. {fixes['create']} {scheme}://{bucket}) or fix the URI")
    try:
        fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError as e:
        raise fail("listing the prefix", e) from None
    marker = f"{root}/.kdray-write-check-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(marker) as f:
            f.write(b"kdray checks that it can write here; this object is deleted at once\n")
    except OSError as e:
        raise fail("writing a marker object", e) from None
    try:
        fs.delete_file(marker)
    except OSError as e:
        raise fail(f"deleting its marker object {marker}", e) from None


def artifact_client_missing(uri: str) -> str:
    """The package MLflow needs to write artifacts to this object store, when it is not installed ('' if it is)."""
    import importlib.util

    need = {"s3": "boto3", "gs": "google.cloud.storage", "gcs": "google.cloud.storage"}.get(uri.split("://", 1)[0].lower())
    if need is None:
        return ""
    try:
        found = importlib.util.find_spec(need) is not None
    except ModuleNotFoundError:     # google not installed at all
        found = False
    return "" if found else {"boto3": "boto3", "google.cloud.storage": "google-cloud-storage"}[need]


@contextmanager
def carried_to_trials():
    """Tune's trial actors get the driver's endpoint and region variables (``CARRIED_ENV``).

    Tune builds each trainable actor's runtime environment from a fixed list of variables
    (the AWS keys, not the endpoint); on a cluster whose nodes were started without
    ``AWS_ENDPOINT_URL`` the trials would otherwise look for the bucket at AWS.  Only
    variables set in the driver are carried; the list is restored on exit."""
    try:
        from ray.tune.execution import class_cache
        carried = class_cache.ENV_VARS_TO_PROPAGATE
    except (ImportError, AttributeError):     # another Ray: nothing to do
        carried = None
    if not isinstance(carried, set):
        yield
        return
    added = set(CARRIED_ENV) - carried
    carried |= added
    try:
        yield
    finally:
        carried -= added


def artifact_root(storage: str, sweep_name: str, tracking_uri: str):
    """Where MLflow keeps the artifacts of a sweep tracked in sqlite: ``<storage>/mlartifacts/<sweep>``,
    in the bucket when storage is an object store (None: a tracking server decides)."""
    if not tracking_uri.startswith("sqlite"):
        return None
    if is_object_store(storage):
        root = storage.rstrip("/")
        if root.lower().startswith("gcs://"):      # pyarrow takes both names; MLflow's artifact store only gs://
            root = "gs://" + root[len("gcs://"):]
        return f"{root}/mlartifacts/{sweep_name}"
    from kdray.sweep import local_storage
    return str(local_storage(storage) / "mlartifacts" / sweep_name)
