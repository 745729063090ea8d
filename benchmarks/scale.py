"""Benchmark: the driver's cost per trial as a sweep grows (issue 29, item 6).

Sweeps of a near-zero-work model (digits, a 16-unit MLP, two epochs: tens of milliseconds) at growing trial counts
(245, 1,000 and 4,160 in full mode, about an hour and a half on 2 cores; 245 and 1,000
with --quick), unpacked and packed 16
per trial, through ``run_sweep`` exactly as ``kdray sweep`` runs them (local Ray, MLflow on
sqlite).  Measured per sweep: the driver process's CPU seconds (Tune bookkeeping, the MLflow
callback, progress, packing and ended-trial sets, the MLflow calls) and the seconds spent in
MLflow calls, both per trial.  The growth is fitted as driver seconds = a * trials^b on the
sizes measured: b near 1 is linear; b > 1.1 would show a super-linear term.  Targets: b <= 1.1
and at most 50 ms of driver CPU per trial at the largest size.  The ratio reported is the
exponent b of the unpacked sweeps.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from benchmarks.common import now, result
from benchmarks.sweep import run_kdray

NAME = "scale"
TITLE = "driver cost per trial as a sweep grows (near-zero-work trials, sqlite)"
TARGET_EXPONENT = 1.1
TARGET_MS_PER_TRIAL = 50.0
# (teacher seeds, student seeds): trials = T * (1 + 3 * S) with SIDDO, KD 0.5 and RCD 0.5
SIZES = {"full": ((5, 16), (10, 33), (20, 69)), "quick": ((5, 16), (10, 33))}


def grid(teachers: int, students: int, pack: int) -> dict:
    return {"name": "scale", "setups": [{
        "name": "tiny", "dataset": {"name": "digits"}, "teacher": {"arch": "mlp", "args": {"hidden": 16}},
        "recipe": {"epochs": 2, "batch_size": 128, "lr": 0.01}, "teacher_seeds": list(range(teachers)),
        "student_seeds": list(range(100, 100 + students)),
        "conditions": {"siddo": True, "kd": {"alphas": [0.5]}, "rcd": {"alphas": [0.5]}},
        "resources": {"student": {"pack": pack}}}], "report_every_s": 10, "progress_every_s": 3600}


def fit(ns: list[float], ys: list[float]) -> tuple[float, float]:
    """(a, b) of y = a * n^b, least squares in log-log."""
    b, log_a = np.polyfit(np.log(ns), np.log(ys), 1)
    return float(math.exp(log_a)), float(b)


def run(quick: bool = False, device: str = "cpu", sizes: Optional[tuple] = None) -> dict:
    t0 = now()
    sizes = sizes or SIZES["quick" if quick else "full"]
    rows, measurements = {}, {}
    for pack in (1, 16):
        label = "unpacked" if pack == 1 else f"packed {pack}"
        for teachers, students in sizes:
            r = run_kdray(grid(teachers, students, pack), device)
            n = r["trials"]
            rows.setdefault(label, []).append((n, r["driver_cpu_s"], r["mlflow_driver_s"], r["wall_s"]))
            measurements[f"{label}, {n} trials: driver CPU ms/trial"] = round(1000 * r["driver_cpu_s"] / n, 2)
            measurements[f"{label}, {n} trials: MLflow calls ms/trial"] = round(1000 * r["mlflow_driver_s"] / n, 2)
            measurements[f"{label}, {n} trials: sweep wall s"] = round(r["wall_s"], 1)
    fits = {}
    for label, pts in rows.items():
        a, b = fit([p[0] for p in pts], [p[1] for p in pts])
        fits[label] = b
        measurements[f"{label}: driver CPU s = {a:.3g} x trials^b, b"] = round(b, 3)
    largest = rows["unpacked"][-1]
    ms = 1000 * largest[1] / largest[0]
    met = fits["unpacked"] <= TARGET_EXPONENT and ms <= TARGET_MS_PER_TRIAL
    notes = [f"Sizes: trials = teacher seeds x (1 + 3 x student seeds) for {list(sizes)}; each sweep starts "
             "from empty storage and a fresh local Ray cluster; 2 trial slots.",
             f"Targets: exponent b <= {TARGET_EXPONENT} (no super-linear term) and <= {TARGET_MS_PER_TRIAL:g} ms of "
             f"driver CPU per trial at the largest size (measured {ms:.1f} ms).",
             "Driver CPU is the sweep driver process's user + system time during run_sweep (Ray's own "
             "processes and the trials' workers excluded).",
             "MLflow calls: wall seconds the driver spent in kdray's Tracker methods (creating runs, params, "
             "epochs, tags, artefact copies, ending runs), per trial."]
    return result(NAME, TITLE, fits["unpacked"], "exponent b of driver CPU seconds ~ trials^b (unpacked)",
                  f"<= {TARGET_EXPONENT}", met, measurements, {"quick": quick, "device": device, "sizes": list(sizes)},
                  notes, now() - t0)
