"""MLflow bookkeeping, done from the driver only.

Trials never talk to MLflow: the engine's Tune callback receives every
epoch's result and logs it here.  One writer means no "database is locked"
with sqlite, and a cluster's workers need no MLflow credentials.  Every call
is retried with back-off, so a tracking server that blips does not end a sweep.
"""
from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, TypeVar

from kdray import __version__, testhook
from kdray.contracts import (EPOCH, EXPERIMENT_KIND, FINAL, KIND_SWEEP, KIND_TRIAL, TAG_EXPERIMENT_KIND, TAG_FAILURE,
                             TAG_KIND, TAG_PLUGINS, TAG_SWEEP_SHA, TAG_TRIAL_KEY, TAG_VERSION, trial_tags)
from kdray.spec import TrialSpec

log = logging.getLogger(__name__)
R = TypeVar("R")


class TrackingError(RuntimeError):
    """MLflow cannot be reached or used; the message names the URI."""


PATIENCE_ENV = "KDRAY_TRACKING_PATIENCE_S"
DEFAULT_PATIENCE_S = 300.0
# MLflow's own client retries a refused connection for about 4 minutes per call, on top of ours;
# the driver turns them off so that ``KDRAY_TRACKING_PATIENCE_S`` is the one budget (see engine).
MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
# Answers that another attempt cannot change: retrying them only delays the error.
PERMANENT = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
                       "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED",
                       "FEATURE_DISABLED", "ENDPOINT_NOT_FOUND"})


def patience_s() -> float:
    """How long the driver keeps retrying one MLflow call before the sweep stops (``$KDRAY_TRACKING_PATIENCE_S``)."""
    raw = os.environ.get(PATIENCE_ENV, "")
    if not raw:
        return DEFAULT_PATIENCE_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise TrackingError(f"{PATIENCE_ENV}={raw!r} is not a number of seconds >= 0")
    return value


# What a failed HTTP call's long message comes down to (MLflow wraps urllib3's in its own).
_CAUSES = (("Connection refused", "connection refused"), ("timed out", "timed out"),
           ("Name or service not known", "unknown host"), ("Temporary failure in name resolution", "unknown host"),
           ("Max retries exceeded", "no connection"), ("Connection reset", "connection reset"))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for needle, said in _CAUSES:
        if needle in text:
            return said
    return f"{type(e).__name__}: {text.splitlines()[0][:160]}" if text else type(e).__name__


def retry(fn: Callable[[], R], what: str, uri: str = "", patience: Optional[float] = None, delay: float = 0.5) -> R:
    """``fn()``, retried with back-off (0.5 s doubling, at most 30 s apart) for up to ``patience`` seconds
    (default ``patience_s()``); then a one-line TrackingError naming the URI and the call."""
    budget = patience_s() if patience is None else patience
    start, i = time.monotonic(), 0
    while True:
        try:
            return fn()
        except Exception as e:  # transient: locked sqlite, dropped connection, 5xx
            if getattr(e, "error_code", None) in PERMANENT:
                raise
            waited = time.monotonic() - start
            if waited >= budget:
                raise TrackingError(f"MLflow tracking at {uri or 'the tracking URI'} did not answer for "
                                    f"{waited:.0f} s ({what}: {_first_line(e)})") from e
            if i == 0:   # once per outage: later attempts of the same call are quiet
                log.warning("kdray: MLflow tracking at %s did not answer (%s: %s); retrying for up to %.0f s",
                            uri or "the tracking URI", what, _first_line(e), budget)
            time.sleep(min(delay * 2 ** min(i, 10), 30.0, max(budget - waited, 0.01)))
            i += 1


def probe(uri: str, timeout: float = 5.0) -> None:
    """Fail fast when a tracking server is down (MLflow's own client retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as e:
        raise TrackingError(f"MLflow tracking at {uri} is unreachable: {type(e).__name__}") from None


SQLITE_HEADER = b"SQLite format 3\x00"
MLFLOW_TABLES = {"alembic_version", "experiments", "runs"}


def sqlite_path(uri: str) -> Optional[Path]:
    """The file of a ``sqlite:///`` tracking URI (None for a server or another database)."""
    return Path(uri.removeprefix("sqlite:///")).expanduser() if uri.startswith("sqlite:///") else None


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdray"


def seed_sqlite_store(uri: str) -> bool:
    """A new sqlite tracking file starts as a copy of an empty MLflow database made once per MLflow
    version (creating the schema runs MLflow's ~60 migrations: about 4 s of every fresh sweep's
    start).  Returns whether it copied; on any trouble MLflow creates the schema itself, as before."""
    path = sqlite_path(uri)
    if path is None or path.exists():
        return False
    import mlflow

    template = _cache_dir() / f"mlflow-{mlflow.__version__}-empty.db"
    try:
        if not template.exists():
            _write_empty_store(template)
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            shutil.copyfile(template, part)
            os.link(part, path)   # never a half-copied file under the real name, never over one just made
        except FileExistsError:   # another sweep made it first: use that one
            return False
        finally:
            part.unlink(missing_ok=True)
    except Exception as e:   # a read-only cache, a full disk, SQLAlchemy's own errors: never fatal here
        log.debug("no MLflow schema template (%s); MLflow creates the schema", e)
        return False
    return True


def _write_empty_store(template: Path) -> None:
    """An MLflow sqlite database with the schema and no experiment: MLflow adds its Default
    experiment (with an artifact root where the copy lives) when it first opens the copy."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    template.parent.mkdir(parents=True, exist_ok=True)
    part = template.with_name(f".{template.name}.{os.getpid()}.part")
    part.unlink(missing_ok=True)
    try:
        store = SqlAlchemyStore(f"sqlite:///{part}", str(template.parent / "mlruns"))
        store.engine.dispose()
        con = sqlite3.connect(part)
        try:
            with con:
                con.execute("delete from experiment_tags")
                con.execute("delete from experiments")
        finally:
            con.close()
        os.replace(part, template)
    finally:
        part.unlink(missing_ok=True)


def check_sqlite_store(uri: str) -> None:
    """A sqlite tracking file that exists must be an intact MLflow database.

    Checked read-only before MLflow opens it: MLflow would write its schema into an
    empty file, or fail deep inside SQLAlchemy (after Ray has started) on a damaged one.
    """
    path = sqlite_path(uri)
    if path is None or not path.exists():
        return
    fix = "restore it from a backup, or move it away and point --tracking-uri elsewhere"
    if path.is_dir():
        raise TrackingError(f"{path}: the MLflow database is a folder, not a file; {fix}")
    if path.stat().st_size == 0:
        raise TrackingError(f"{path}: the MLflow database is an empty file (0 bytes); delete it to start afresh, or {fix}")
    with open(path, "rb") as f:
        if f.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            raise TrackingError(f"{path}: not a SQLite database (the MLflow database is damaged or another file); {fix}")
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            check = con.execute("PRAGMA quick_check").fetchone()[0]
            tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as e:
        raise TrackingError(f"{path}: the MLflow database is damaged ({e}); {fix}") from None
    if check != "ok":
        raise TrackingError(f"{path}: the MLflow database is damaged (integrity check: {check[:200]}); {fix}")
    if not MLFLOW_TABLES <= tables:
        raise TrackingError(f"{path}: a SQLite database, but not MLflow's (no {', '.join(sorted(MLFLOW_TABLES - tables))} "
                            f"table); {fix}")


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _fmt(v) -> str:
    return "None" if v is None else str(v)


class Tracker:
    """One MLflow experiment per sweep, a parent run for the sweep, a child run per trial."""

    def __init__(self, uri: str, experiment: str, artifact_root: Optional[str] = None, description: str = "",
                 plugins: tuple = ()):
        from mlflow.tracking import MlflowClient

        self.uri = uri
        # MLflow prints a "View run ... at" line per ended run on a tracking server: thousands of
        # lines in a sweep, where kdray's progress says what happened (a user's own setting wins).
        os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
        probe(uri)
        seed_sqlite_store(uri)
        self.client = MlflowClient(tracking_uri=uri)
        try:   # the probe found it up: a short wait is enough here
            exp = self._call(lambda: self.client.get_experiment_by_name(experiment), "connect",
                             patience=min(patience_s(), 10.0))
        except TrackingError:
            raise
        except Exception as e:
            raise TrackingError(f"MLflow tracking at {uri} is unreachable: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        if exp is None:
            loc = artifact_root and (artifact_root if "://" in artifact_root else Path(artifact_root).resolve().as_uri())
            tags = {TAG_EXPERIMENT_KIND: EXPERIMENT_KIND, **({"mlflow.note.content": description} if description else {})}
            exp_id = self._call(lambda: self.client.create_experiment(experiment, artifact_location=loc, tags=tags),
                                "create_experiment")
        else:
            if exp.lifecycle_stage == "deleted":
                self._call(lambda: self.client.restore_experiment(exp.experiment_id), "restore_experiment")
            exp_id = exp.experiment_id
            if TAG_EXPERIMENT_KIND not in exp.tags:   # experiments made before kdray set it
                self._call(lambda: self.client.set_experiment_tag(exp_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND), "set_tag")
        self.experiment_id = exp_id
        self.experiment = experiment
        self._params: dict[str, list] = {}         # run id -> params not yet logged (see start_trial)
        self._held: dict[str, list] = {}           # run id -> metrics held for the run's end (see log_epochs)
        self._artifact_uris: dict[str, str] = {}   # run id -> artifact URI, for the runs started here
        self.parent_id = self._parent_run()
        if plugins:   # the report imports them too, to label and test plug-in conditions
            self.set_tag(self.parent_id, TAG_PLUGINS, ",".join(plugins))
        self.sha = git_sha()
        self.sweep_sha256 = ""

    def use_sweep_file(self, sha256: str) -> None:
        """The SHA-256 of the sweep file this run comes from: tagged on the sweep's run and on every
        trial run it starts (provenance: which version of the file asked for a result)."""
        self.sweep_sha256 = sha256
        if sha256:
            self.set_tag(self.parent_id, TAG_SWEEP_SHA, sha256)

    def _call(self, fn: Callable[[], R], what: str, patience: Optional[float] = None) -> R:
        """Every MLflow call: retried with back-off; a server gone for longer is a TrackingError naming it."""
        return retry(fn, what, self.uri, patience)

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.set_tags(run_id, {key: value})

    def _parent_run(self) -> str:
        runs = self._call(lambda: self.client.search_runs([self.experiment_id], f"tags.`{TAG_KIND}` = '{KIND_SWEEP}'",
                                                          max_results=1), "search")
        if runs:
            return runs[0].info.run_id
        run = self._call(lambda: self.client.create_run(self.experiment_id, run_name=f"sweep {self.experiment}",
                                                        tags={TAG_KIND: KIND_SWEEP, TAG_VERSION: __version__}),
                         "create_run")
        return run.info.run_id

    # ----------------------------------------------------------- resume
    def trial_runs(self) -> list:
        out, token = [], None
        while True:
            page = self._call(lambda: self.client.search_runs([self.experiment_id], f"tags.`{TAG_KIND}` = '{KIND_TRIAL}'",
                                                         max_results=5000, page_token=token), "search")
            out += list(page)
            token = page.token
            if not token:
                return out

    def finished_keys(self) -> set[str]:
        return {r.data.tags.get(TAG_TRIAL_KEY) for r in self.trial_runs() if r.info.status == "FINISHED"}

    def discard_unfinished(self, keys: Iterable[str]) -> int:
        """Delete non-finished runs of trials about to run again, so each trial has one run."""
        keys = set(keys)
        n = 0
        for r in self.trial_runs():
            if r.info.status != "FINISHED" and r.data.tags.get(TAG_TRIAL_KEY) in keys:
                self._call(lambda: self.client.delete_run(r.info.run_id), "delete")
                n += 1
        return n

    # ----------------------------------------------------------- trials
    def start_trial(self, spec: TrialSpec) -> str:
        """The trial's run, with its tags.  Its params go with the first batch later logged to the run
        (epochs, tags or its end): one MLflow call per trial fewer (issue 29, item 6)."""
        from mlflow.entities import Param

        tags = trial_tags(spec, self.parent_id, __version__, self.sha)
        if self.sweep_sha256:
            tags[TAG_SWEEP_SHA] = self.sweep_sha256
        run = self._call(lambda: self.client.create_run(self.experiment_id, run_name=spec.label, tags=tags), "create_run")
        run_id = run.info.run_id
        self._params[run_id] = [Param(k, _fmt(v)[:6000]) for k, v in spec.flat_params().items()]
        self._artifact_uris[run_id] = run.info.artifact_uri
        return run_id

    def _log_batch(self, run_id: str, what: str, metrics: list = (), tags: list = ()) -> None:
        """``metrics`` and ``tags``, with the run's params not yet logged and its held metrics, in as few
        log_batch calls as MLflow's limits allow (100 params, 100 tags, 1,000 entries in all per call)."""
        params, tags = list(self._params.get(run_id, ())), list(tags)
        metrics = self._held.get(run_id, []) + list(metrics)
        while params or metrics or tags:
            p, t = params[:100], tags[:100]
            m = metrics[:1000 - len(p) - len(t)]
            params, tags, metrics = params[len(p):], tags[len(t):], metrics[len(m):]
            testhook.maybe_hold_driver()
            self._call(lambda: self.client.log_batch(run_id, metrics=m, params=p, tags=t), what)
        self._params.pop(run_id, None)
        self._held.pop(run_id, None)

    def _unlogged(self, run_id: str) -> bool:
        return bool(self._params.get(run_id) or self._held.get(run_id))

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        """Several tags in one call."""
        from mlflow.entities import RunTag

        if tags or self._unlogged(run_id):
            self._log_batch(run_id, "set_tags", tags=[RunTag(k, str(v)[:8000]) for k, v in tags.items()])

    def log_metrics(self, run_id: str, metrics: dict, step: int) -> None:
        self.log_epochs(run_id, [{**metrics, EPOCH: step}])

    def log_epochs(self, run_id: str, epochs: list[dict], hold: bool = False) -> None:
        """Every numeric value of every record at step ``record["epoch"]``, in as few calls as MLflow allows.
        ``hold``: the run ends next (its final record is among them): they go in one call with the
        next batch logged to the run (end_trial's tags), not in one of their own."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, int(m.get(EPOCH, 0))) for m in epochs for k, v in m.items()
              if isinstance(v, (int, float)) and k not in (EPOCH, FINAL)]
        if hold:
            self._held.setdefault(run_id, []).extend(ms)
        else:
            self._log_batch(run_id, "log_metrics", metrics=ms)

    def log_artifact(self, run_id: str, path: Path) -> None:
        self.log_artifacts(run_id, [path])

    def log_artifacts(self, run_id: str, paths: Iterable[Path]) -> None:
        """Files into the run's artifact root.  A run this tracker started writes through the artifact
        repository of the URI create_run returned: MLflow's client would read the whole run back
        (one more database query) to find it."""
        uri = self._artifact_uris.get(run_id)
        if uri is None:
            for path in paths:
                self._call(lambda: self.client.log_artifact(run_id, str(path)), "log_artifact")
            return
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
        from mlflow.utils.uri import add_databricks_profile_info_to_artifact_uri

        repo = get_artifact_repository(add_databricks_profile_info_to_artifact_uri(uri, self.uri), tracking_uri=self.uri)
        for path in paths:
            self._call(lambda: repo.log_artifact(str(path)), "log_artifact")

    def end_trial(self, run_id: str, ok: bool, reason: str = "", status: str = "FAILED",
                  tags: Optional[dict[str, str]] = None) -> None:
        """FINISHED when ``ok``; else ``status`` (FAILED, or KILLED for an interrupted trial) and why.
        ``tags`` (and the failure's reason) are logged in one call with the params and metrics not yet logged."""
        tags = {**(tags or {}), **({} if ok else {TAG_FAILURE: reason[:5000] or "unknown"})}
        self.set_tags(run_id, tags)
        self._call(lambda: self.client.set_terminated(run_id, "FINISHED" if ok else status), "terminate")
        self._artifact_uris.pop(run_id, None)

    def end_sweep(self, summary: dict, status: str = "FINISHED", patience: Optional[float] = None) -> None:
        """The sweep's run ends FINISHED only when every planned trial did; FAILED or KILLED otherwise."""
        if summary:
            self.log_metrics(self.parent_id, summary, 0)
        self._call(lambda: self.client.set_terminated(self.parent_id, status), "terminate", patience)
