"""MLflow bookkeeping, done from the driver only.

Trials never talk to MLflow: the engine's Tune callback receives every
epoch's result and logs it here.  One writer means no "database is locked"
with sqlite, and a cluster's workers need no MLflow credentials.  Every call
is retried with back-off, so a tracking server that blips does not end a sweep.
"""
from __future__ import annotations

import logging
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterable, Optional, TypeVar

from kdray import __version__
from kdray.contracts import (EPOCH, FINAL, KIND_SWEEP, KIND_TRIAL, TAG_FAILURE, TAG_KIND, TAG_PLUGINS, TAG_TRIAL_KEY,
                             TAG_VERSION, trial_tags)
from kdray.spec import TrialSpec

log = logging.getLogger(__name__)
R = TypeVar("R")


class TrackingError(RuntimeError):
    """MLflow cannot be reached or used; the message names the URI."""


def retry(fn: Callable[[], R], what: str, attempts: int = 5, delay: float = 0.5) -> R:
    for i in range(attempts):
        try:
            return fn()
        except Exception as e:  # transient: locked sqlite, dropped connection, 5xx
            if i == attempts - 1:
                raise
            log.warning("MLflow %s failed (%s); retrying", what, e)
            time.sleep(delay * 2 ** i)
    raise AssertionError("unreachable")


def probe(uri: str, timeout: float = 5.0) -> None:
    """Fail fast when a tracking server is down (MLflow's own client retries for minutes)."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as e:
        raise TrackingError(f"MLflow tracking at {uri} is unreachable: {type(e).__name__}") from None


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
        probe(uri)
        self.client = MlflowClient(tracking_uri=uri)
        try:
            exp = retry(lambda: self.client.get_experiment_by_name(experiment), "connect", attempts=3)
        except Exception as e:
            raise TrackingError(f"MLflow tracking at {uri} is unreachable: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
        if exp is None:
            loc = artifact_root and f"{Path(artifact_root).resolve().as_uri()}"
            exp_id = self.client.create_experiment(experiment, artifact_location=loc,
                                                   tags={"mlflow.note.content": description} if description else None)
        else:
            if exp.lifecycle_stage == "deleted":
                self.client.restore_experiment(exp.experiment_id)
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        self.experiment = experiment
        self.parent_id = self._parent_run()
        if plugins:   # the report imports them too, to label and test plug-in conditions
            retry(lambda: self.client.set_tag(self.parent_id, TAG_PLUGINS, ",".join(plugins)), "set_tag")
        self.sha = git_sha()

    def _parent_run(self) -> str:
        runs = self.client.search_runs([self.experiment_id], f"tags.`{TAG_KIND}` = '{KIND_SWEEP}'", max_results=1)
        if runs:
            return runs[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=f"sweep {self.experiment}",
                                     tags={TAG_KIND: KIND_SWEEP, TAG_VERSION: __version__})
        return run.info.run_id

    # ----------------------------------------------------------- resume
    def trial_runs(self) -> list:
        out, token = [], None
        while True:
            page = retry(lambda: self.client.search_runs([self.experiment_id], f"tags.`{TAG_KIND}` = '{KIND_TRIAL}'",
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
                retry(lambda: self.client.delete_run(r.info.run_id), "delete")
                n += 1
        return n

    # ----------------------------------------------------------- trials
    def start_trial(self, spec: TrialSpec) -> str:
        from mlflow.entities import Param

        tags = trial_tags(spec, self.parent_id, __version__, self.sha)
        run = retry(lambda: self.client.create_run(self.experiment_id, run_name=spec.label, tags=tags), "create_run")
        params = [Param(k, _fmt(v)[:6000]) for k, v in spec.flat_params().items()]
        for i in range(0, len(params), 100):
            retry(lambda: self.client.log_batch(run.info.run_id, params=params[i:i + 100]), "log_params")
        return run.info.run_id

    def log_metrics(self, run_id: str, metrics: dict, step: int) -> None:
        self.log_epochs(run_id, [{**metrics, EPOCH: step}])

    def log_epochs(self, run_id: str, epochs: list[dict]) -> None:
        """Every numeric value of every record at step ``record["epoch"]``, in as few calls as MLflow allows."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        ms = [Metric(k, float(v), now, int(m.get(EPOCH, 0))) for m in epochs for k, v in m.items()
              if isinstance(v, (int, float)) and k not in (EPOCH, FINAL)]
        for i in range(0, len(ms), 1000):  # MLflow's per-batch limit
            retry(lambda: self.client.log_batch(run_id, metrics=ms[i:i + 1000]), "log_metrics")

    def log_artifact(self, run_id: str, path: Path) -> None:
        retry(lambda: self.client.log_artifact(run_id, str(path)), "log_artifact")

    def end_trial(self, run_id: str, ok: bool, reason: str = "") -> None:
        if not ok:
            retry(lambda: self.client.set_tag(run_id, TAG_FAILURE, reason[:5000] or "unknown"), "set_tag")
        retry(lambda: self.client.set_terminated(run_id, "FINISHED" if ok else "FAILED"), "terminate")

    def end_sweep(self, summary: dict) -> None:
        self.log_metrics(self.parent_id, summary, 0)
        retry(lambda: self.client.set_terminated(self.parent_id, "FINISHED"), "terminate")
