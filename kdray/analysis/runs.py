"""MLflow runs -> one pandas row per trial: the single source of truth for reports.

The sweep engine (kdray/tracking.py) logs one child run per trial with the
flattened TrialSpec as string params, tags naming the trial, and per-epoch
metrics whose latest value is the final one.  ``load_runs`` turns that into a
typed table; ``resolve_experiment`` finds the experiment a report is about.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from kdray import conditions
from kdray.analysis import sqlruns
from kdray.contracts import (KIND_SWEEP, KIND_TRIAL, TAG_CHECKPOINT, TAG_CONDITION, TAG_DATA_SHA, TAG_FAILURE,
                             TAG_FINGERPRINT, TAG_FINGERPRINT_JSON, TAG_KIND, TAG_METHOD, TAG_METRICS_STREAMED,
                             TAG_PLUGINS, TAG_ROLE, TAG_SETUP, TAG_TEACHER_KEY, TAG_TRIAL_KEY, parse_condition)
from kdray.sweep import DEFAULT_STORAGE, SweepError, default_tracking_uri, read_yaml
from kdray.tracking import TrackingError, check_sqlite_store

# Columns every frame from load_runs has, in this order; metric columns follow.  ``params`` holds
# each run's condition parameters as a dict of typed values.
ID_COLUMNS = ("run_id", "status", "failure", "start_time", "trial_key", "teacher_key", "setup", "role",
              "method", "params", "width", "teacher_seed", "student_seed", "variant", "fingerprint",
              "fingerprint_json", "data_sha256", "checkpoint", "metrics_streamed")
# Flattened spec params that say what a student is apart from its seeds and condition (its
# data, model and recipe): runs that differ in them are different questions (``variant``).
VARIANT_PREFIXES = ("dataset_args.", "arch_args.", "recipe.")
VARIANT_PARAMS = ("dataset", "arch", "evals", "teacher_arch")
# Where runs logged before the condition tag existed kept their condition's parameters.
LEGACY_PARAM_COLUMNS = ("alpha", "temperature", "block")


class ReportError(RuntimeError):
    """A user-facing problem (missing experiment, empty sweep); the message is one line."""


# ------------------------------------------------------------------ resolving

def resolve_experiment(tracking_uri: str | None, name_or_path: str) -> tuple[str, str, str]:
    """(tracking URI, experiment name, storage) for a sweep name or a sweep YAML file.

    A YAML path contributes its ``name``, ``storage`` and ``tracking_uri`` keys
    (read directly, not validated: a report needs no data roots).  The URI is,
    in order: the explicit argument, the file's ``tracking_uri``,
    $MLFLOW_TRACKING_URI, then ``sqlite:///<storage>/mlflow.db`` with storage
    defaulting to ./results -- the same order the sweep engine uses.
    """
    storage, uri_in_file, name = DEFAULT_STORAGE, None, name_or_path
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        try:
            data = read_yaml(path) or {}
        except SweepError as e:   # not a file, not UTF-8, bad YAML: one line
            raise ReportError(str(e)) from None
        if not isinstance(data, dict) or not data.get("name"):
            raise ReportError(f"{path}: the sweep file has no name")
        name = str(data["name"])
        storage = str(data.get("storage") or DEFAULT_STORAGE)
        uri_in_file = data.get("tracking_uri")
    try:
        uri = tracking_uri or uri_in_file or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(storage)
    except SweepError as e:  # an object store with no tracking server named
        raise ReportError(str(e)) from None
    return uri, name, storage


def get_experiment(tracking_uri: str, experiment: str):
    """The MLflow experiment, or a ReportError that says how to create it.

    A sqlite file that does not exist is reported rather than created empty.
    """
    from mlflow import MlflowClient

    missing = ReportError(f"no MLflow experiment {experiment!r} at {tracking_uri}; run `kdray sweep` first")
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri.removeprefix("sqlite:///")).is_file():
        raise missing
    try:
        check_sqlite_store(tracking_uri)   # read-only: a damaged or empty file is reported, not written
    except TrackingError as e:
        raise ReportError(str(e)) from None
    exp = sqlruns.experiment(tracking_uri, experiment)
    if exp is None:                        # not readable directly: MLflow's client
        exp = MlflowClient(tracking_uri).get_experiment_by_name(experiment)
    if not exp or exp.lifecycle_stage == "deleted":
        raise missing
    return exp


def sweep_plugins(tracking_uri: str, experiment_id: str) -> tuple[str, ...]:
    """The plug-in modules the sweep's trials imported (its sweep run's tag), so a report can label
    and test plug-in conditions as the sweep declared them."""
    text = sqlruns.sweep_tag(tracking_uri, experiment_id, TAG_PLUGINS)
    if text is None:                       # not readable directly: MLflow's client
        from mlflow import MlflowClient

        runs = MlflowClient(tracking_uri).search_runs([experiment_id], f"tags.`{TAG_KIND}` = '{KIND_SWEEP}'",
                                                      max_results=1)
        text = runs[0].data.tags.get(TAG_PLUGINS, "") if runs else ""
    return tuple(m for m in text.split(",") if m)


# ------------------------------------------------------------------ loading

def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):  # None, "None", ""
        return np.nan


def _none(v):
    return None if v in (None, "None", "") else v


def legacy_params(method: str, values: dict) -> dict:
    """A condition's params from the fields older runs stored them in (alpha, temperature, block),
    typed by the condition's declaration; {} for a method no installed module declares."""
    decl = conditions.find(method)
    out = {}
    for p in decl.params if decl is not None else ():
        v = _num(values.get(p.legacy)) if p.legacy else np.nan
        out[p.name] = p.default if np.isnan(v) else p.type(v)
    return out


def variant_of(params: dict) -> str:
    """A short hash of what a run trained apart from its seeds and condition (data set, model,
    recipe, evaluations, and whether it started from the teacher's weights): two runs of one
    setup, teacher seed, condition and seed with different variants answer different questions."""
    import hashlib
    import json

    picked = {k: v for k, v in params.items() if k.startswith(VARIANT_PREFIXES) or k in VARIANT_PARAMS}
    picked["init_from_teacher"] = params.get("init_seed") == params.get("teacher_seed")
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:8]


def _row(run) -> dict:
    p, t = run.data.params, run.data.tags
    method = t.get(TAG_METHOD, p.get("method"))
    cond = parse_condition(t.get(TAG_CONDITION))
    row = dict(
        run_id=run.info.run_id, status=run.info.status, failure=t.get(TAG_FAILURE),
        start_time=run.info.start_time, trial_key=t.get(TAG_TRIAL_KEY, p.get("trial_key")),
        teacher_key=_none(t.get(TAG_TEACHER_KEY, p.get("teacher_key"))),
        setup=t.get(TAG_SETUP, p.get("setup")), role=t.get(TAG_ROLE, p.get("role")), method=method,
        params=cond["params"] if cond else legacy_params(method, p),
        width=cond["width"] if cond else _num(p.get("width")), teacher_seed=_num(p.get("teacher_seed")),
        student_seed=_num(p.get("student_seed")), variant=variant_of(p),
        fingerprint=t.get(TAG_FINGERPRINT), fingerprint_json=t.get(TAG_FINGERPRINT_JSON),
        data_sha256=t.get(TAG_DATA_SHA), checkpoint=t.get(TAG_CHECKPOINT) or _none(p.get("checkpoint_sha256")),
        metrics_streamed=t.get(TAG_METRICS_STREAMED),
    )
    row.update(run.data.metrics)  # latest value per metric = the final one
    return row


def search_trial_runs(client, experiment_id: str, where: str = "") -> list:
    """Every active trial run (``where``: more conditions), paged (50,000 per page: one page for the
    paper's 4,189 models)."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], f"tags.`{TAG_KIND}` = '{KIND_TRIAL}'" + where,
                                  max_results=50000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def runs_frame(rows: list[dict]) -> pd.DataFrame:
    """Typed frame from row dicts (also used by tests to skip MLflow); rows may give a condition's
    params in the legacy columns instead of ``params``."""
    rows = [r if "params" in r else {**{k: v for k, v in r.items() if k not in LEGACY_PARAM_COLUMNS},
                                     "params": legacy_params(r.get("method"), r)} for r in rows]
    df = pd.DataFrame(rows)
    for col in ID_COLUMNS:
        if col not in df:
            df[col] = np.nan
    metrics = sorted(c for c in df.columns if c not in ID_COLUMNS)
    df = df[list(ID_COLUMNS) + metrics]
    df["params"] = [v if isinstance(v, dict) else {} for v in df["params"]]
    for col in ("width", *metrics):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    for col in ("teacher_seed", "student_seed"):
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    df["failure"] = df["failure"].where(df["failure"].notna(), None)
    return df.reset_index(drop=True)


def load_runs(tracking_uri: str, experiment: str, pool=None, direct: bool = True, exp=None,
              plugin_modules: tuple = ()) -> pd.DataFrame:
    """One row per trial run of a sweep's experiment, with every final metric as a column.

    Params are strings in MLflow; they come back typed: alpha, temperature and
    width as floats, block, teacher_seed and student_seed as nullable ints
    (<NA> where the spec had None).  Failed runs stay in (status, failure):
    the analysis reports them rather than silently losing them.  Rows are in
    MLflow's order (newest first).

    A SQL tracking store (sqlite, PostgreSQL, ...) is read straight from its
    tables (kdray/analysis/sqlruns.py; ``direct=False`` asks MLflow's client
    instead), with a process ``pool`` a range of run ids per worker
    (sqlruns.PARTS).  Through the client, MLflow turns every run, param and metric
    into objects (~2.5 ms a run), so with a ``pool`` the runs are fetched in slices
    of start time, one slice per task (see kdray.analysis.report.report_pool).  ``exp``: the
    experiment when the caller has it (get_experiment); ``plugin_modules``: what the pool's workers
    import first (a legacy run's condition parameters are typed by its declaration).
    """
    if direct and sqlruns.is_sql(tracking_uri):
        exp = exp or get_experiment(tracking_uri, experiment)
        if pool is None:
            found = _sql_rows(tracking_uri, exp.experiment_id)
        else:                              # each worker reads and shapes a range of run ids
            parts = list(pool.map(_sql_rows, *zip(*[(tracking_uri, exp.experiment_id, low, high, plugin_modules)
                                                    for low, high in sqlruns.PARTS])))
            found = None if None in parts else [row for part in parts for row in part]
        if found is not None:
            return _in_mlflow_order(runs_frame(found))
    if pool is None:
        from mlflow import MlflowClient

        exp = get_experiment(tracking_uri, experiment)
        rows = [_row(r) for r in search_trial_runs(MlflowClient(tracking_uri), exp.experiment_id)]
        return _in_mlflow_order(runs_frame(rows))
    exp_id, first, last = pool.submit(_time_span, tracking_uri, experiment).result()
    if first is None:
        return runs_frame([])
    parts = 4 * (os.cpu_count() or 1)        # more slices than workers: they finish unevenly
    edges = np.unique(np.linspace(first, last + 1, parts + 1).astype(np.int64))
    slices = pool.map(_rows_between, [tracking_uri] * (len(edges) - 1), [exp_id] * (len(edges) - 1),
                      edges[:-1].tolist(), edges[1:].tolist())
    return _in_mlflow_order(runs_frame([row for part in slices for row in part]))


def _sql_rows(tracking_uri: str, experiment_id: str, low=None, high=None, plugin_modules: tuple = ()):
    """The rows of the trial runs with ids in [low, high) read from the SQL tables (None: not readable)."""
    from kdray import plugins

    plugins.load(plugin_modules)
    found = sqlruns.trial_runs(tracking_uri, experiment_id, low, high)
    return None if found is None else [_row(r) for r in found]


def _in_mlflow_order(df: pd.DataFrame) -> pd.DataFrame:
    """Newest first, ties by run id: MLflow's search order, whichever way the rows were fetched."""
    if df.empty:
        return df
    return df.sort_values(["start_time", "run_id"], ascending=[False, True], kind="stable").reset_index(drop=True)


def _time_span(tracking_uri: str, experiment: str) -> tuple[str, int | None, int | None]:
    """(experiment id, first and last start time of its trial runs); runs in a report worker."""
    from mlflow import MlflowClient

    exp = get_experiment(tracking_uri, experiment)
    client = MlflowClient(tracking_uri)
    ends = [client.search_runs([exp.experiment_id], f"tags.`{TAG_KIND}` = '{KIND_TRIAL}'", max_results=1,
                               order_by=[f"attributes.start_time {o}"])
            for o in ("ASC", "DESC")]
    if not ends[0]:
        return exp.experiment_id, None, None
    return exp.experiment_id, ends[0][0].info.start_time, ends[1][0].info.start_time


def _rows_between(tracking_uri: str, experiment_id: str, start: int, stop: int) -> list[dict]:
    """Rows of the trial runs that started in [start, stop) (ms); runs in a report worker."""
    from mlflow import MlflowClient

    where = f" and attributes.start_time >= {start} and attributes.start_time < {stop}"
    return [_row(r) for r in search_trial_runs(MlflowClient(tracking_uri), experiment_id, where)]
