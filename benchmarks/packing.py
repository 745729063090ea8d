"""Benchmark: packed students (kdray/packing.py) vs the same students trained one at a time.

K students (one teacher, K student seeds, SIDDO) of a CNN on digits and a GPT
on TinyShakespeare, each at a tiny size (per-operation overhead dominates a
step) and a small one (arithmetic dominates on a CPU), trained by ``run_pack`` (one process, stacked
parameters under vmap) and by ``run_trial`` one after another, alternated
(packed, loop, packed, loop), medians.  Students/s = K / wall seconds, both
including model init, data, training, final evaluation and artefacts.  The
teacher is trained once beforehand and not timed.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

from benchmarks.common import median, now, result, sync, torch_threads

NAME = "packing"
TITLE = "packed students (torch.func, one process) vs one-at-a-time, students/s"
ROOT = Path(__file__).resolve().parents[1]

# "small": the sizes first measured, whose CPU steps turned out bound by arithmetic (convolutions and
# matmuls near one core's peak); "tiny": sizes where per-operation overhead dominates a step, the case
# packing is for (docs/benchmarks.md, "Packed trials").
CASES = {
    "cnn-tiny": {"dataset": {"name": "digits"},
                 "teacher": {"arch": "small_cnn", "args": {"channels": 4, "dropout": 0.0, "batch_norm": False}},
                 "recipe": {"epochs": 2, "batch_size": 32, "lr": 0.01}},
    "gpt-tiny": {"dataset": {"name": "tinyshakespeare", "args": {"block_size": 16, "max_chars": 60000}},
                 "teacher": {"arch": "pico_gpt", "args": {"n_embd": 16, "n_head": 2, "n_layer": 1, "dropout": 0.0}},
                 "recipe": {"iterations": 60, "log_every": 60, "batch_size": 8, "lr": 0.003}},
    "cnn": {"dataset": {"name": "digits"},
            "teacher": {"arch": "small_cnn", "args": {"channels": 8, "dropout": 0.0, "batch_norm": False}},
            "recipe": {"epochs": 2, "batch_size": 64, "lr": 0.01}},
    "gpt": {"dataset": {"name": "tinyshakespeare", "args": {"block_size": 32, "max_chars": 60000}},
            "teacher": {"arch": "pico_gpt", "args": {"n_embd": 32, "n_head": 2, "n_layer": 2, "dropout": 0.0}},
            "recipe": {"iterations": 30, "log_every": 30, "batch_size": 16, "lr": 0.003}},
}


def plan_for(case: dict, storage: str, k: int):
    from kdray.plan import build_plan
    from kdray.sweep import parse_sweep

    d = {"name": f"pack{k}", "storage": storage, "data_root": os.environ.get("KDRAY_DATA", str(ROOT / "data")),
         "setups": [{"name": "b", "dataset": case["dataset"], "teacher": case["teacher"],
                     "recipe": dict(case["recipe"], eval_every=0, checkpoint_every=0),
                     "teacher_seeds": [0], "student_seeds": list(range(10, 10 + k)),
                     "conditions": {"siddo": True, "kd": None, "rcd": None}}]}
    return build_plan(parse_sweep(d, "<benchmark>"))


def _clear(store, specs) -> None:
    for s in specs:
        p = store.local_dir(s.trial_key)
        if p is not None and (Path(p) / "result.json").exists():
            (Path(p) / "result.json").unlink()


def measure(case: dict, k: int, device: str, reps: int) -> dict:
    from kdray.data import load_dataset
    from kdray.packing import run_pack
    from kdray.recipe import init_model, run_trial
    from kdray.storage import Store

    with tempfile.TemporaryDirectory() as tmp:
        plan = plan_for(case, tmp, k)
        store = Store(plan.sweep.storage, plan.sweep.name)
        run_trial(plan.teachers[0], store, device=device)
        students = plan.students
        n_params = sum(p.numel() for p in init_model(students[0], load_dataset(
            students[0].dataset, students[0].data_root, **students[0].dataset_args)).parameters())
        times = {"packed": [], "loop": []}
        for _ in range(reps):
            _clear(store, students)
            t = now(); run_pack(students, store, device=device); sync(device); times["packed"].append(now() - t)
            _clear(store, students)
            t = now()
            for s in students:
                run_trial(s, store, device=device)
            sync(device); times["loop"].append(now() - t)
    p, lp = median(times["packed"]), median(times["loop"])
    return {"k": k, "params_per_student": n_params, "packed_s": round(p, 3), "loop_s": round(lp, 3), "packed_students_per_s": round(k / p, 2),
            "loop_students_per_s": round(k / lp, 2), "speedup": round(lp / p, 2)}


def run(quick: bool = False, device: str = "cpu", ks: Optional[tuple[int, ...]] = None,
        cases: Optional[dict] = None) -> dict:
    t0 = now()
    ks = ks or ((4, 16) if quick else (4, 16, 64))
    reps = 1 if quick else 2
    meas = {}
    with torch_threads(1):
        for name, case in (cases or CASES).items():
            for k in ks:
                meas[f"{name} K={k}"] = measure(case, k, device, reps)
    at16 = [v["speedup"] for key, v in meas.items() if v["k"] == 16]
    ratio = min(at16) if at16 else None
    return result(NAME, TITLE, ratio, "min over models of packed/one-at-a-time students/s at K=16", ">= 3",
                  None if ratio is None else ratio >= 3, meas, {"quick": quick, "device": device, "ks": list(ks),
                                                                "reps": reps, "threads": 1},
                  ["one torch thread; the loop is run_trial per student in the same process (no Ray, no MLflow)"],
                  now() - t0)
