"""Benchmark: packed students (kdray/packing.py) vs the same students trained one at a time.

K students (one teacher, K student seeds, SIDDO) of a CNN on digits and a GPT
on TinyShakespeare, each at a tiny size (per-operation overhead dominates a
step) and a small one (arithmetic dominates on a CPU), trained by ``run_pack``
(one process, the students' parameters stacked, one forward for all: the
model family's stacked forward from kdray/stacked, or vmap) and by
``run_trial`` one after another, alternated (packed, loop, packed, loop),
medians.  Students/s = K / wall seconds, both including model init, data,
training, final evaluation, functional metrics and artefacts.  The teacher is
trained once beforehand and not timed.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional

import torch

from benchmarks.common import interleaved, median, now, result, sync, torch_threads

NAME = "packing"
TITLE = "packed students (torch.func, one process) vs one-at-a-time, students/s"
ROOT = Path(__file__).resolve().parents[1]

# "tiny": sizes where per-operation overhead dominates a step, the case packing is for; "small": sizes
# whose CPU steps are bound by arithmetic (convolutions and matmuls near one core's peak,
# docs/benchmarks.md, "Packed trials").  Each trains for long enough that most of a student's time
# is training, as in real sweeps (the quickstart trains 345 steps, the paper's GPTs 5,000); the
# "-short" case is a tiny GPT whose 60 steps cost less than its final evaluation and metrics,
# which packed and one-at-a-time students pay alike.
CASES = {
    "cnn-tiny": {"dataset": {"name": "digits"},
                 "teacher": {"arch": "small_cnn", "args": {"channels": 4, "dropout": 0.0, "batch_norm": False}},
                 "recipe": {"epochs": 5, "batch_size": 32, "lr": 0.01}},
    "gpt-tiny": {"dataset": {"name": "tinyshakespeare", "args": {"block_size": 16, "max_chars": 60000}},
                 "teacher": {"arch": "pico_gpt", "args": {"n_embd": 16, "n_head": 2, "n_layer": 1, "dropout": 0.0}},
                 "recipe": {"iterations": 300, "log_every": 100, "batch_size": 8, "lr": 0.003}},
    "cnn-small": {"dataset": {"name": "digits"},
                  "teacher": {"arch": "small_cnn", "args": {"channels": 8, "dropout": 0.0, "batch_norm": False}},
                  "recipe": {"epochs": 5, "batch_size": 64, "lr": 0.01}},
    "gpt-small": {"dataset": {"name": "tinyshakespeare", "args": {"block_size": 32, "max_chars": 60000}},
                  "teacher": {"arch": "pico_gpt", "args": {"n_embd": 32, "n_head": 2, "n_layer": 2, "dropout": 0.0}},
                  "recipe": {"iterations": 150, "log_every": 50, "batch_size": 16, "lr": 0.003}},
    "gpt-tiny-short": {"dataset": {"name": "tinyshakespeare", "args": {"block_size": 16, "max_chars": 60000}},
                       "teacher": {"arch": "pico_gpt", "args": {"n_embd": 16, "n_head": 2, "n_layer": 1,
                                                                "dropout": 0.0}},
                       "recipe": {"iterations": 60, "log_every": 60, "batch_size": 8, "lr": 0.003}},
}
HEADLINE = ("cnn-tiny", "gpt-tiny")     # the target: >= 3x students/s at K = 16 for the tiny models

# On a GPU only (--device cuda): a reduced Nano-GPT (the paper's 6 layers and 6 heads at a quarter of the
# width and a quarter of the context), for students per GPU (peak memory per packed student) and per-model
# GPU time packed vs one at a time.  Not measured yet: no GPU was lent to the work that added it.
GPU_CASES = {
    "nano-gpt-reduced": {"dataset": {"name": "tinyshakespeare", "args": {"block_size": 64}},
                         "teacher": {"arch": "nano_gpt", "args": {"n_embd": 96, "n_head": 6, "n_layer": 6,
                                                                  "dropout": 0.0}},
                         "recipe": {"iterations": 300, "log_every": 100, "batch_size": 64, "lr": 3e-4}},
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
    """Packed and one-at-a-time alternated ``reps`` times after one untimed round of each
    (first calls pay one-time costs: lazy imports, allocator growth); medians."""
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

        def packed() -> float:
            _clear(store, students)
            if torch.device(device).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = now(); run_pack(students, store, device=device); sync(device)
            return now() - t

        def loop() -> float:
            _clear(store, students)
            t = now()
            for s in students:
                run_trial(s, store, device=device)
            sync(device)
            return now() - t

        times = interleaved({"packed": packed, "loop": loop}, reps + 1)
        peak = torch.cuda.max_memory_allocated() if torch.device(device).type == "cuda" else None
    p, lp = median(times["packed"][1:]), median(times["loop"][1:])
    out = {"k": k, "params_per_student": n_params, "packed_s": round(p, 3), "loop_s": round(lp, 3),
           "packed_students_per_s": round(k / p, 2), "loop_students_per_s": round(k / lp, 2),
           "speedup": round(lp / p, 2), "speedups_per_rep": [round(b / a, 2) for a, b in
                                                              zip(times["packed"][1:], times["loop"][1:])]}
    if peak is not None:     # since the last packed round began: its peak (a loop round holds one student)
        out["packed_peak_gpu_mb_per_student"] = round(peak / k / 2 ** 20, 1)
    return out


def run(quick: bool = False, device: str = "cpu", ks: Optional[tuple[int, ...]] = None,
        cases: Optional[dict] = None) -> dict:
    t0 = now()
    ks = ks or ((4, 16) if quick else (4, 16, 64))
    reps = 1 if quick else 3
    meas = {}
    cases = cases or (CASES | GPU_CASES if torch.device(device).type == "cuda" else CASES)
    with torch_threads(1):
        for name, case in cases.items():
            for k in ks if name in HEADLINE or name in GPU_CASES else [k for k in ks if k == 16] or ks[:1]:
                meas[f"{name} K={k}"] = measure(case, k, device, reps)
    at16 = [v["speedup"] for key, v in meas.items() if v["k"] == 16 and key.split(" ")[0] in HEADLINE]
    ratio = min(at16) if at16 else None
    return result(NAME, TITLE, ratio, f"min over the tiny models ({', '.join(HEADLINE)}) of packed/one-at-a-time "
                  "students/s at K=16", ">= 3", None if ratio is None else ratio >= 3, meas,
                  {"quick": quick, "device": device, "ks": list(ks), "reps": reps, "threads": 1},
                  ["one torch thread; the loop is run_trial per student in the same process (no Ray, no MLflow); "
                   "both include model init, data, training, final evaluation, functional metrics and artefacts",
                   "medians of the alternated repetitions after one untimed round of each side; "
                   "speedups_per_rep lists each repetition's ratio",
                   "the small and -short cases are measured at K=16 only: the small ones are bound by arithmetic on "
                   "a CPU, the short one by its final evaluation (docs/benchmarks.md, 'Packed trials')"],
                  now() - t0)
