"""Benchmark 6: ``kdray report`` end to end over a synthetic MLflow experiment of 4,189 runs (sqlite).

The experiment is laid out as the sweep engine logs one (kdray/tracking.py):
a sweep parent run, and one child run per trial with the same tags
(``kdray.kind``, trial key, stage, role, setup, method, teacher key, version,
git sha, parent), the trial's flattened ``TrialSpec`` as params and its final
metrics.  The trials come from a real ``build_plan``: 19 self-distillation
setups x 3 teacher seeds x (1 teacher + 10 SIDDO + 30 KD + 30 RCD) = 4,047
runs, plus one setup with 2 teacher seeds (142): 4,189, the paper's count.
Metrics are drawn per (setup, teacher seed, student seed) with KD at alpha 0.9
more similar to its teacher than the controls, so the analysis has real work.
Per-epoch metric histories are not logged (the report reads final values
only); creation uses one ``create_run``, one ``log_batch`` (params + metrics)
and one ``set_terminated`` per run, and is timed separately.

Then ``kdray report EXPERIMENT --tracking-uri sqlite:///... --out DIR`` runs as
a subprocess (interpreter start, imports, loading the runs, the analysis,
tables, figures, HTML, logging the report back to MLflow) and its wall time is
the measurement.  An in-process breakdown (``load_runs``, ``build_report``)
follows.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from benchmarks.common import now, result

NAME = "report"
TITLE = "kdray report over a synthetic MLflow experiment of 4,189 runs (sqlite)"
TARGET_S = 30.0
PAPER_RUNS = 4189


def sweep_dict(n_runs: int) -> dict:
    """A sweep whose plan has exactly ``n_runs`` trials when n_runs = 213 * a + 71 * b (b < 3)."""
    full, rest = divmod(n_runs, 213)
    extra_seeds, rem = divmod(rest, 71)
    if rem:
        raise ValueError(f"{n_runs} runs is not 213 * a + 71 * b")
    setups = []
    for i in range(full + (1 if extra_seeds else 0)):
        seeds = [0, 1, 2] if i < full else list(range(extra_seeds))
        setups.append({"name": f"setup{i:02d}", "dataset": {"name": "digits"},
                       "teacher": {"arch": "small_cnn", "args": {"channels": 8 + i}},   # distinct teachers
                       "recipe": {"optimizer": "adam", "lr": 0.001, "batch_size": 256, "epochs": 100},
                       "teacher_seeds": seeds, "student_seeds": list(range(10, 20)),
                       "conditions": {"siddo": True, "kd": {"alphas": [0.1, 0.5, 0.9]},
                                      "rcd": {"alphas": [0.1, 0.5, 0.9]}}})
    return {"name": "bench-report", "storage": "/nonexistent", "setups": setups}


def _metrics(spec, rng: np.random.Generator, base: dict) -> dict:
    m = {"epoch": 100.0, "train_seconds": float(rng.uniform(1500, 2000)), "final": 1.0}
    if spec.role == "teacher":
        m.update(test_acc=0.95 + rng.normal(0, 0.003), test_loss=0.38 + rng.normal(0, 0.01),
                 train_acc=0.9998, train_loss=0.0006)
        return m
    gain = (spec.params["alpha"] if spec.method == "kd" else 0.0) * 0.02
    noise = lambda s=0.002: rng.normal(0, s)  # noqa: E731
    m.update(test_acc=base["acc"] + noise(), test_loss=base["loss"] + noise(0.01),
             train_acc=0.999 + noise(0.0003), train_loss=0.002 + noise(0.0003),
             activation_distance=base["act"] - gain + noise(), js_divergence=base["js"] - gain / 4 + noise(0.0005),
             rank_disagreement=base["rank"] - gain + noise(), prediction_disagreement=base["pd"] - gain + noise(),
             correct_agreement=base["ca"] + gain / 4 + noise(), incorrect_agreement=base["ia"] + gain * 3 + noise(),
             variation_of_information=base["vi"] - gain + noise(), procrustes_distance=base["pr"] - gain + noise())
    m["prediction_agreement"] = 1.0 - m["prediction_disagreement"]
    return m


def base_metrics(rng: np.random.Generator) -> dict:
    """One (setup, teacher seed, student seed)'s metric levels, shared by its conditions."""
    return dict(acc=0.95 + rng.normal(0, 0.003), loss=0.35 + rng.normal(0, 0.01), act=0.12 + rng.normal(0, 0.005),
                js=0.02 + rng.normal(0, 0.001), rank=0.30 + rng.normal(0, 0.005), pd=0.05 + rng.normal(0, 0.003),
                ca=0.97 + rng.normal(0, 0.003), ia=0.30 + rng.normal(0, 0.01), vi=0.30 + rng.normal(0, 0.01),
                pr=0.10 + rng.normal(0, 0.005))


def start_experiment(uri: str, n_runs: int, artifact_root: str):
    """The synthetic sweep's plan, its MLflow experiment and sweep run: (sweep dict, plan, client,
    experiment id, sweep run id)."""
    from mlflow import MlflowClient

    from kdray import __version__
    from kdray.contracts import KIND_SWEEP, TAG_KIND, TAG_VERSION
    from kdray.plan import build_plan
    from kdray.sweep import parse_sweep

    d = sweep_dict(n_runs)
    plan = build_plan(parse_sweep(d, "<benchmark>"))
    assert len(plan.all) == n_runs, len(plan.all)
    client = MlflowClient(uri)
    exp = client.create_experiment(d["name"], artifact_location=Path(artifact_root).resolve().as_uri())
    parent = client.create_run(exp, run_name=f"sweep {d['name']}",
                               tags={TAG_KIND: KIND_SWEEP, TAG_VERSION: __version__}).info.run_id
    return d, plan, client, exp, parent


def create_experiment(uri: str, n_runs: int, artifact_root: str, seed: int = 0) -> dict:
    """Write the synthetic sweep's runs; return counts and seconds."""
    from mlflow.entities import Metric, Param

    from kdray import __version__
    from kdray.contracts import trial_tags

    t0 = now()
    d, plan, client, exp, parent = start_experiment(uri, n_runs, artifact_root)
    rng = np.random.default_rng(seed)
    bases: dict = {}
    t_plan = now() - t0
    for spec in plan.all:
        key = (spec.setup, spec.teacher_seed, spec.student_seed)
        if key not in bases:
            bases[key] = base_metrics(rng)
        tags = trial_tags(spec, parent, __version__, "benchmark")
        run_id = client.create_run(exp, run_name=spec.label, tags=tags).info.run_id
        params = [Param(k, "None" if v is None else str(v)[:6000]) for k, v in spec.flat_params().items()]
        metrics = [Metric(k, float(v), 0, 100) for k, v in _metrics(spec, rng, bases[key]).items()
                   if k not in ("epoch", "final")]
        for i in range(0, len(params), 100):
            client.log_batch(run_id, params=params[i:i + 100], metrics=metrics if i == 0 else [])
        client.set_terminated(run_id, "FINISHED")
    client.set_terminated(parent, "FINISHED")
    return {"runs": len(plan.all), "seconds": now() - t0, "plan_seconds": t_plan,
            "params_per_run": len(plan.all[-1].flat_params()), "experiment": d["name"]}


def kdray_command() -> list[str]:
    exe = Path(sys.executable).with_name("kdray")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("kdray")
    return [found] if found else [sys.executable, "-m", "kdray.cli"]


def run(quick: bool = False, device: str = "cpu", n_runs: Optional[int] = None, breakdown: bool = True,
        subprocess_cli: bool = True) -> dict:
    """``subprocess_cli=False`` calls ``run_report`` in this process instead (no interpreter start; tests)."""
    from kdray.analysis.report import build_report, report_pool, run_report
    from kdray.analysis.runs import load_runs

    t0 = now()
    n_runs = n_runs or (426 if quick else PAPER_RUNS)
    with tempfile.TemporaryDirectory(prefix="kdray-bench-report-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        made = create_experiment(uri, n_runs, f"{tmp}/artifacts")
        cmd = kdray_command() + ["report", made["experiment"], "--tracking-uri", uri, "--out", f"{tmp}/report"]
        env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
        t = now()
        if subprocess_cli:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            code, err = proc.returncode, proc.stderr
        else:
            code, err = run_report(made["experiment"], f"{tmp}/report", uri), ""
        e2e = now() - t
        if code != 0:
            raise RuntimeError(f"kdray report failed ({code}): {err[-2000:]}")
        files = sum(1 for p in Path(f"{tmp}/report").rglob("*") if p.is_file())
        progress = [ln for ln in err.splitlines() if "runs loaded in" in ln]
        meas = {"runs": made["runs"], "create runs s (MlflowClient, sqlite)": made["seconds"],
                "create per run ms": 1000 * made["seconds"] / made["runs"],
                "params per run": made["params_per_run"],
                f"kdray report end to end s ({'subprocess' if subprocess_cli else 'in process'})": e2e,
                "report files written": files,
                "kdray report's own phase times (its stderr)": progress[-1].split(": ", 1)[-1] if progress else "n/a",
                "db size MB": Path(f"{tmp}/mlflow.db").stat().st_size / 1e6}
        if breakdown:   # the CLI's steps again, in this process, with the same worker pool
            with report_pool() as pool:
                t = now()
                df = load_runs(uri, made["experiment"], pool)
                meas["breakdown: load_runs s"] = now() - t
                t = now()
                built = build_report(df, f"{tmp}/report2", pool=pool)
                meas["breakdown: build_report s (analysis, tables, figures, HTML)"] = now() - t
            for phase, sec in built.seconds.items():
                meas[f"breakdown: build_report {phase} s"] = sec
            meas["breakdown: rest (interpreter, imports, MLflow logging of the report) s"] = (
                e2e - meas["breakdown: load_runs s"] - meas["breakdown: build_report s (analysis, tables, figures, HTML)"])
            meas["worker processes"] = os.cpu_count()
    notes = ["Report timed once (end to end, a fresh process), the breakdown once in this process after it "
             "(figures are drawn while the tables are written, so 'figures' is what remained after the tables).",
             f"Command: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd[:3]))} "
             "--tracking-uri sqlite:///<tmp>/mlflow.db --out <tmp>/report"]
    return result(NAME, TITLE, e2e / TARGET_S, f"kdray report seconds / {TARGET_S:g} s target",
                  f"< {TARGET_S:g} s end to end (ratio < 1)", e2e < TARGET_S, meas,
                  {"quick": quick, "runs": made["runs"], "subprocess_cli": subprocess_cli}, notes,
                  now() - t0) | {"ratio_text": f"{e2e:.0f} s for {made['runs']} runs"}
