"""Planted sweeps for the analysis tests, written to MLflow the way kdray/tracking.py does.

Each run is a plain dict (``run(...)``); ``write_experiment`` turns a list of
them into one experiment with a sweep parent run and one child run per trial
(tags, string params, final metrics, FINISHED/FAILED status), and
``as_frame`` gives the frame ``load_runs`` would return without MLflow.

``planted_runs()`` is the fixture sweep, one setup per case:

- ``errors`` (teacher seeds 0, 1, 2): KD alpha 0.9 copies only the teacher's
  errors (incorrect agreement +0.15, correct agreement equal to every
  control's, the four functional metrics clearly better) -> supported and
  negatively asymmetric.  Teacher seed 1 gets a prediction-agreement gain of
  0.005 (marginal at threshold 0.01); teacher seed 2 gets no activation-distance
  gain (tick table "✓✓–").  KD alpha 0.1 is drawn like the controls -> not
  supported.  RCD alpha 0.1 has the best accuracy.
- ``same``: KD drawn from the controls' distribution -> not supported.
- ``ties``: KD equal to SIDDO in every metric (all-zero differences) and tied
  +-1/64 differences against RCD.
- ``broken``: controls rise steeply with the seed, KD is slightly better at
  every seed; the KD run of seed 12 FAILED (with misleadingly good metrics)
  and the RCD run of seed 15 has a NaN activation distance.  Pairing by
  position instead of by seed would make KD look worse.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

SEEDS = tuple(range(10, 20))
FUNCTIONAL = ("activation_distance", "js_divergence", "rank_disagreement", "prediction_disagreement")
BASE = dict(activation_distance=0.30, js_divergence=0.05, rank_disagreement=0.20, prediction_disagreement=0.15,
            correct_agreement=0.90, incorrect_agreement=0.30, test_acc=0.80, test_loss=0.70,
            train_acc=0.95, train_loss=0.20)


def _key(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


def run(setup: str, method: str, teacher_seed: int, student_seed: int | None = None, alpha: float = 0.0,
        temperature: float = 1.0, block: int | None = None, width: float = 1.0, metrics: dict | None = None,
        status: str = "FINISHED", failure: str | None = None) -> dict:
    role = "teacher" if method == "teacher" else "student"
    key = _key(setup, method, teacher_seed, student_seed, alpha, temperature, block, width)
    return dict(setup=setup, method=method, role=role, teacher_seed=teacher_seed, student_seed=student_seed,
                alpha=alpha, temperature=temperature, block=block, width=width, metrics=dict(metrics or {}),
                status=status, failure=failure, trial_key=key,
                teacher_key=None if role == "teacher" else _key(setup, "teacher", teacher_seed, None, 0.0, 1.0, None, 1.0))


def _params(r: dict) -> dict:
    return {"setup": r["setup"], "role": r["role"], "method": r["method"], "dataset": "synthetic", "arch": "mlp",
            "teacher_seed": r["teacher_seed"], "student_seed": r["student_seed"],
            "init_seed": r["teacher_seed"], "data_seed": r["student_seed"] or r["teacher_seed"],
            "alpha": r["alpha"], "temperature": r["temperature"], "block": r["block"], "width": r["width"],
            "trial_key": r["trial_key"], "teacher_key": r["teacher_key"], "teacher_arch": "mlp",
            "recipe.lr": 0.001, "arch_args.hidden": 32}


def write_experiment(tracking_uri: str, name: str, runs: list[dict], artifact_root: str | Path) -> str:
    """Create the experiment, its sweep parent run and one child run per dict; return the experiment id."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    client = MlflowClient(tracking_uri)
    exp = client.create_experiment(name, artifact_location=Path(artifact_root).resolve().as_uri())
    parent = client.create_run(exp, tags={"kdray.kind": "sweep"}, run_name=f"sweep {name}").info.run_id
    for r in runs:
        tags = {"kdray.kind": "trial", "kdray.trial_key": r["trial_key"], "kdray.stage": r["role"],
                "kdray.role": r["role"], "kdray.setup": r["setup"], "kdray.method": r["method"],
                "kdray.teacher_key": str(r["teacher_key"]), "mlflow.parentRunId": parent}
        if r["failure"]:
            tags["kdray.failure"] = r["failure"]
        rid = client.create_run(exp, tags=tags, run_name=r["trial_key"]).info.run_id
        client.log_batch(rid, params=[Param(k, "None" if v is None else str(v)) for k, v in _params(r).items()],
                         metrics=[Metric(k, float(v), 0, 0) for k, v in r["metrics"].items()])
        client.set_terminated(rid, r["status"])
    client.set_terminated(parent, "FINISHED")
    return exp


def as_frame(runs: list[dict]):
    """The frame load_runs would return for these runs, without MLflow."""
    from kdray.analysis.runs import runs_frame

    return runs_frame([dict(run_id=f"r{i}", status=r["status"], failure=r["failure"], start_time=i,
                            trial_key=r["trial_key"], teacher_key=r["teacher_key"], setup=r["setup"],
                            role=r["role"], method=r["method"], alpha=r["alpha"], temperature=r["temperature"],
                            block=r["block"], width=r["width"], teacher_seed=r["teacher_seed"],
                            student_seed=r["student_seed"], **r["metrics"]) for i, r in enumerate(runs)])


# ------------------------------------------------------------------ the planted sweep

def _noisy(rng, scale=0.002, **over) -> dict:
    return {k: v + rng.normal(0, scale) for k, v in {**BASE, **over}.items()}


def errors_setup(rng) -> list[dict]:
    out = []
    for ts in (0, 1, 2):
        out.append(run("errors", "teacher", ts, metrics=dict(test_acc=0.81, test_loss=0.6, tha_count_a=40, tha_count_e=5)))
        for s in SEEDS:
            base = _noisy(rng)                        # this seed's shared starting point
            def control(acc: float) -> dict:
                m = {k: v + rng.normal(0, 0.001) for k, v in base.items()}
                m["correct_agreement"] = base["correct_agreement"]   # every condition shares it
                m.update(test_acc=acc + rng.normal(0, 0.001), tha_count_a=5 + s % 3, tha_count_e=40 - s % 3)
                return m
            out.append(run("errors", "siddo", ts, s, metrics=control(0.80)))
            out.append(run("errors", "rcd", ts, s, alpha=0.1, metrics=control(0.81)))
            out.append(run("errors", "rcd", ts, s, alpha=0.9, metrics=control(0.78)))
            out.append(run("errors", "kd", ts, s, alpha=0.1, metrics=control(0.80)))
            kd = control(0.79)
            kd["incorrect_agreement"] = base["incorrect_agreement"] + 0.15
            kd["correct_agreement"] = base["correct_agreement"]
            gains = dict(activation_distance=0.05, js_divergence=0.01, rank_disagreement=0.03,
                         prediction_disagreement=0.005 if ts == 1 else 0.03)
            if ts == 2:
                gains["activation_distance"] = 0.0
            for k, g in gains.items():
                kd[k] = base[k] - g + rng.normal(0, 0.0005)
            kd.update(tha_count_a=30, tha_count_e=15)
            out.append(run("errors", "kd", ts, s, alpha=0.9, metrics=kd))
    return out


def same_setup(rng) -> list[dict]:
    out = [run("same", "teacher", 0, metrics=dict(test_acc=0.8))]
    for s in SEEDS:
        for method, alpha in (("siddo", 0.0), ("rcd", 0.5), ("kd", 0.5)):
            out.append(run("same", method, 0, s, alpha=alpha, metrics=_noisy(rng, 0.01)))
    return out


def ties_setup() -> list[dict]:
    out = [run("ties", "teacher", 0, metrics=dict(test_acc=0.8))]
    for s in SEEDS:
        base = {k: round(v * 64) / 64 for k, v in BASE.items()}          # exact in binary
        sign = 1 if s < 16 else -1
        out.append(run("ties", "siddo", 0, s, metrics=base))
        out.append(run("ties", "kd", 0, s, alpha=0.5, metrics=base))
        out.append(run("ties", "rcd", 0, s, alpha=0.5, metrics={k: v + sign / 64 for k, v in base.items()}))
    return out


def broken_setup() -> list[dict]:
    out = [run("broken", "teacher", 0, metrics=dict(test_acc=0.8))]
    for s in SEEDS:
        base = {k: v + 0.05 * (s - 10) for k, v in BASE.items()}      # steep in the seed
        better = {k: v + (0.01 if k in ("test_acc", "correct_agreement", "incorrect_agreement") else -0.01)
                  for k, v in base.items()}
        out.append(run("broken", "siddo", 0, s, metrics=base))
        rcd = dict(base, activation_distance=float("nan")) if s == 15 else base
        out.append(run("broken", "rcd", 0, s, alpha=0.5, metrics=rcd))
        if s == 12:
            out.append(run("broken", "kd", 0, s, alpha=0.5, status="FAILED", failure="RuntimeError: CUDA out of memory",
                           metrics={k: 0.0 for k in base}))
        else:
            out.append(run("broken", "kd", 0, s, alpha=0.5, metrics=better))
    return out


def planted_runs(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return errors_setup(rng) + same_setup(rng) + ties_setup() + broken_setup()


def rate(k: int, n: int = 360) -> float:
    """A rate k/n the way a trial computes it: the mean of a boolean vector with k hits."""
    hits = np.zeros(n, bool)
    hits[:k] = True
    return float(np.mean(hits))
