"""Benchmark: ``kdray report`` on 42,032 runs, ten times the paper's 4,189 (issue 29, item 6).

The experiment is benchmark 6's (benchmarks/report.py: the same tags, params and final
metrics per trial from a real ``build_plan``), with ten times the setups: 198 setups of
3 (one of 1) teacher seeds x (1 teacher + 10 SIDDO + 30 KD + 30 RCD) = 42,032 runs.
Creating that many runs through ``MlflowClient`` takes ~20 minutes here (30 ms a run),
so they are written in bulk into MLflow's own tables (its SQLAlchemy models, one
executemany per table) after MLflow created the schema, the experiment and the sweep
run; a sample of runs is then read back through ``MlflowClient`` and must equal what
was written, so the report reads a database MLflow itself would read the same way.

The measurement is ``kdray report EXPERIMENT --tracking-uri sqlite:///... --out DIR``
end to end as a subprocess; target: under 60 s on 2 cores.  ``--quick``: 4,189 runs.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import now, result
from benchmarks.report import _metrics, base_metrics, kdray_command, start_experiment

NAME = "report_scale"
TITLE = "kdray report on 42,032 runs (10x the paper; sqlite, runs written in bulk)"
TARGET_S = 60.0
RUNS = {"full": 42032, "quick": 4189}


def planned_rows(plan, exp_id: str, parent: str, artifact_root: str, seed: int = 0) -> dict[str, list[dict]]:
    """MLflow's table rows for every planned trial: a FINISHED run with kdray's tags, the flattened
    spec as params and the final metrics (in ``metrics`` and ``latest_metrics``)."""
    from kdray import __version__
    from kdray.contracts import trial_tags

    rng = np.random.default_rng(seed)
    bases: dict = {}
    rows: dict[str, list[dict]] = {t: [] for t in ("runs", "tags", "params", "metrics", "latest_metrics")}
    t0 = 1_790_000_000_000
    for i, spec in enumerate(plan.all):
        rid = hashlib.sha256(spec.trial_key.encode()).hexdigest()[:32]
        key = (spec.setup, spec.teacher_seed, spec.student_seed)
        bases.setdefault(key, base_metrics(rng))
        rows["runs"].append(dict(run_uuid=rid, name=spec.label, source_type="LOCAL", source_name="", entry_point_name="",
                                 user_id="benchmark", status="FINISHED", start_time=t0 + 10 * i, end_time=t0 + 10 * i + 5,
                                 source_version="", lifecycle_stage="active", experiment_id=int(exp_id),
                                 artifact_uri=f"{artifact_root}/{rid}/artifacts"))
        tags = {**trial_tags(spec, parent, __version__, "benchmark"), "mlflow.runName": spec.label}
        rows["tags"] += [dict(key=k, value=str(v), run_uuid=rid) for k, v in tags.items()]
        rows["params"] += [dict(key=k, value="None" if v is None else str(v)[:6000], run_uuid=rid)
                           for k, v in spec.flat_params().items()]
        for k, v in _metrics(spec, rng, bases[key]).items():
            if k not in ("epoch", "final"):
                m = dict(key=k, value=float(v), timestamp=t0 + 10 * i + 4, step=100, is_nan=False, run_uuid=rid)
                rows["metrics"].append(m)
                rows["latest_metrics"].append(m)
    return rows


def create_bulk(uri: str, n_runs: int, artifact_root: str, sample: int = 5) -> dict:
    """MLflow makes the schema, experiment and sweep run; the trial runs go in by executemany."""
    from sqlalchemy import create_engine, insert
    from mlflow.store.tracking.dbmodels import models

    t0 = now()
    d, plan, client, exp, parent = start_experiment(uri, n_runs, artifact_root)
    root = Path(artifact_root).resolve().as_uri()
    rows = planned_rows(plan, exp, parent, root)
    tables = {"runs": models.SqlRun, "tags": models.SqlTag, "params": models.SqlParam, "metrics": models.SqlMetric,
              "latest_metrics": models.SqlLatestMetric}
    engine = create_engine(uri)
    with engine.begin() as con:
        for name, model in tables.items():
            con.execute(insert(model.__table__), rows[name])
    engine.dispose()
    client.set_terminated(parent, "FINISHED")
    for r in rows["runs"][:: max(1, n_runs // sample)][:sample]:   # MLflow reads back what was written
        got = client.get_run(r["run_uuid"])
        rid = r["run_uuid"]
        assert got.info.status == "FINISHED" and got.info.experiment_id == exp
        assert got.data.params == {p["key"]: p["value"] for p in rows["params"] if p["run_uuid"] == rid}
        assert got.data.metrics == {m["key"]: m["value"] for m in rows["metrics"] if m["run_uuid"] == rid}
        assert {t["key"]: t["value"] for t in rows["tags"] if t["run_uuid"] == rid}.items() <= got.data.tags.items()
    return {"runs": n_runs, "seconds": now() - t0, "experiment": d["name"], "setups": len(d["setups"]),
            "rows": sum(len(v) for v in rows.values())}


def run(quick: bool = False, device: str = "cpu", n_runs: int = 0) -> dict:
    """``n_runs`` (213 a + 71 b) overrides the size (tests)."""
    t0 = now()
    n_runs = n_runs or RUNS["quick" if quick else "full"]
    with tempfile.TemporaryDirectory(prefix="kdray-bench-report-scale-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        made = create_bulk(uri, n_runs, f"{tmp}/artifacts")
        cmd = kdray_command() + ["report", made["experiment"], "--tracking-uri", uri, "--out", f"{tmp}/report"]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        t = now()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        e2e = now() - t
        if proc.returncode != 0:
            raise RuntimeError(f"kdray report failed ({proc.returncode}): {proc.stderr[-2000:]}")
        phases = [ln for ln in proc.stderr.splitlines() if "runs loaded in" in ln]
        meas = {"runs": made["runs"], "setups": made["setups"], "table rows written": made["rows"],
                "create runs s (bulk, plus MLflow read-back check)": made["seconds"],
                "kdray report end to end s (subprocess)": e2e,
                "kdray report's own phase times (its stderr)": phases[-1].split(": ", 1)[-1] if phases else "n/a",
                "report files written": sum(1 for p in Path(f"{tmp}/report").rglob("*") if p.is_file()),
                "db size MB": Path(f"{tmp}/mlflow.db").stat().st_size / 1e6, "cores": os.cpu_count()}
    notes = [f"Command: kdray report {made['experiment']} --tracking-uri sqlite:///<tmp>/mlflow.db --out <tmp>/report",
             "The runs were written into MLflow's tables in bulk (see the module docstring); a sample was read "
             "back through MlflowClient and equalled what was written."]
    return result(NAME, TITLE, e2e / TARGET_S, f"kdray report seconds / {TARGET_S:g} s target",
                  f"< {TARGET_S:g} s end to end (ratio < 1)", e2e < TARGET_S, meas,
                  {"quick": quick, "runs": n_runs}, notes, now() - t0) | {"ratio_text": f"{e2e:.0f} s for {n_runs} runs"}
