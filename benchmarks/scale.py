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


def _check_logged(uri: str, experiment: str, trials: int) -> None:
    """Every trial of the sweep has one FINISHED run in ``experiment`` on the server (else raise)."""
    from mlflow.tracking import MlflowClient

    from kdray.contracts import TAG_TRIAL_KEY

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [x for x in (client.search_runs([exp.experiment_id], max_results=50000) if exp else [])
            if TAG_TRIAL_KEY in x.data.tags]
    finished = {x.data.tags[TAG_TRIAL_KEY] for x in runs if x.info.status == "FINISHED"}
    if len(runs) != trials or len(finished) != trials:
        raise RuntimeError(f"{experiment}: {len(runs)} runs, {len(finished)} finished trials on {uri}; "
                           f"{trials} planned")


def _sweep(teachers: int, students: int, pack: int, device: str, tracking_uri: Optional[str] = None) -> dict:
    """One sweep of the grid (run_kdray's record), its own experiment; on a server, checked there."""
    d = grid(teachers, students, pack)
    d["name"] = f"scale-{teachers}x{students}-pack{pack}"
    r = run_kdray(d, device, tracking_uri=tracking_uri)
    if tracking_uri:
        _check_logged(tracking_uri, d["name"], r["trials"])
    return r


def fit(ns: list[float], ys: list[float]) -> tuple[float, float]:
    """(a, b) of y = a * n^b, least squares in log-log."""
    b, log_a = np.polyfit(np.log(ns), np.log(ys), 1)
    return float(math.exp(log_a)), float(b)


def run(quick: bool = False, device: str = "cpu", sizes: Optional[tuple] = None, packs: tuple = (1, 16)) -> dict:
    return measure(NAME, TITLE, quick, device, sizes, packs)


def measure(name: str, title: str, quick: bool, device: str, sizes: Optional[tuple], packs: tuple = (1, 16),
            tracking_uri: Optional[str] = None, notes: tuple[str, ...] = ()) -> dict:
    """The sweeps, unpacked and packed, at each size; into a fresh sqlite store each, or into
    ``tracking_uri`` (each sweep its own experiment there, checked to hold every trial's run)."""
    t0 = now()
    sizes = sizes or SIZES["quick" if quick else "full"]
    rows, measurements = {}, {}
    for pack in packs:
        label = "unpacked" if pack == 1 else f"packed {pack}"
        for teachers, students in sizes:
            r = _sweep(teachers, students, pack, device, tracking_uri)
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
             "epochs, tags, artefact copies, ending runs), per trial.", *notes]
    return result(name, title, fits["unpacked"], "exponent b of driver CPU seconds ~ trials^b (unpacked)",
                  f"<= {TARGET_EXPONENT}", met, measurements, {"quick": quick, "device": device, "sizes": list(sizes)},
                  notes, now() - t0)


def one_size(teachers: int, students: int, packs: tuple = (1, 16), device: str = "cpu",
             tracking_uri: Optional[str] = None) -> dict:
    """Driver CPU and MLflow ms per trial at one size (no fit): the full mode's largest point alone."""
    out = {}
    for pack in packs:
        r = _sweep(teachers, students, pack, device, tracking_uri)
        n = r["trials"]
        out[f"pack {pack}, {n} trials"] = {"driver CPU ms/trial": round(1000 * r["driver_cpu_s"] / n, 2),
                                          "MLflow calls ms/trial": round(1000 * r["mlflow_driver_s"] / n, 2),
                                          "sweep wall s": round(r["wall_s"], 1), "load": r["load_avg_1m"]}
    return out


def main(argv: list[str], tracking_uri: Optional[str] = None) -> None:
    """``20x69 [--packs 1,16]``: one size at a time, printed, docs untouched."""
    import json

    packs = (1, 16)
    if "--packs" in argv:
        i = argv.index("--packs")
        packs, argv = tuple(int(p) for p in argv[i + 1].split(",")), argv[:i] + argv[i + 2:]
    for size in argv or ["20x69"]:
        t, s = map(int, size.split("x"))
        print(json.dumps(one_size(t, s, packs, tracking_uri=tracking_uri), indent=1), flush=True)


if __name__ == "__main__":   # python -m benchmarks.scale 20x69 [--packs 1]
    import sys

    main(sys.argv[1:])
