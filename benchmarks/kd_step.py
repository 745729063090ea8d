"""Benchmark 3: the cost of a KD training step vs a SIDDO step (the teacher's forward pass).

A KD student needs the frozen teacher's logits for every training batch; SIDDO
(plain CE) does not.  kdray caches the teacher's training-set logits (computed
once by the teacher trial, ``train_logits.npy``) and looks them up per batch
when the inputs are never augmented (``DataBundle.train_inputs_are_fixed``);
otherwise it runs the teacher's forward (eval mode, no grad) on every batch.

Measured through ``run_trial`` with the same student seed (same data order,
same initial weights), per epoch from the ``report`` callback, first epoch of
every run dropped, the variants alternating (A B C D A B C D), medians:

* SIDDO;
* KD without the cache (``no_train_cache``: every data set made to look
  augmented, so the teacher runs on each batch) -- the issue's "no-cache ratio";
* KD as kdray runs it (the cache, on these non-augmented sets);
* the teacher's forward alone over one epoch's preprocessed batches, as a share
  of the no-cache KD epoch (what a cache can at most save, give or take cache
  effects of running two models in one step).

The cache's one-off cost (the teacher's forward over the training set) is
reported too.
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from typing import Optional

import torch

from benchmarks.common import interleaved, median, now, result, sync, torch_threads
from benchmarks.train_step import cases as step_cases
from benchmarks.train_step import kdray_epochs, plan_for

NAME = "kd_step"
TITLE = "KD step vs SIDDO step (teacher forward per step), without and with the train-output cache"
ALPHA = 0.5


def teacher_forward_epoch(spec, store, device: str) -> float:
    """Seconds for the frozen teacher's forward over one epoch of preprocessed training batches."""
    from kdray.data import load_dataset
    from kdray.recipe import derive_seed, load_teacher
    from kdray.sweep import Recipe

    r = Recipe(**spec.recipe)
    bundle = load_dataset(spec.dataset, spec.data_root, **spec.dataset_args)
    teacher, _ = load_teacher(spec, store, bundle, device)
    order = torch.Generator().manual_seed(derive_seed(spec.data_seed, "order"))
    augment = torch.Generator().manual_seed(derive_seed(spec.data_seed, "augment"))
    batches = [bundle.preprocess(xb.to(device), True, augment)
               for xb, _ in bundle.train_batches(r.batch_size, bundle.steps_per_epoch(r.batch_size), order)]
    with torch.no_grad():
        teacher(batches[0])                        # warm-up
        sync(device)
        t = now()
        for x in batches:
            teacher(x)
        sync(device)
    return now() - t


@contextmanager
def no_train_cache():
    """Make every data set look augmented, so KD runs the teacher's forward on each batch (kdray's
    cache of the teacher's training-set logits is used only for inputs that are never augmented)."""
    from kdray.data.bundle import DataBundle

    orig = getattr(DataBundle, "train_inputs_are_fixed", None)
    DataBundle.train_inputs_are_fixed = lambda self: False
    try:
        yield
    finally:
        if orig is None:
            del DataBundle.train_inputs_are_fixed
        else:
            DataBundle.train_inputs_are_fixed = orig


def kd_nocache_epochs(spec, store, device: str) -> list[float]:
    with no_train_cache():
        return kdray_epochs(spec, store, device)


def cache_build_seconds(spec, store, device: str) -> float:
    """The one-off cost of the cache: the teacher's forward over the training set (done by the teacher trial)."""
    from kdray.data import load_dataset
    from kdray.recipe import load_teacher, training_set_logits
    from kdray.sweep import Recipe

    r = Recipe(**spec.recipe)
    bundle = load_dataset(spec.dataset, spec.data_root, **spec.dataset_args)
    teacher, _ = load_teacher(spec, store, bundle, device)
    t = now()
    training_set_logits(teacher, bundle, device, r.eval_batch_size)
    sync(device)
    return now() - t


def measure_case(case: dict, device: str, reps: int, threads: Optional[int]) -> dict:
    from kdray.data import load_dataset
    from kdray.recipe import run_trial
    from kdray.storage import Store

    with tempfile.TemporaryDirectory(prefix="kdray-bench-kd-") as tmp, torch_threads(threads):
        plan = plan_for(case, tmp,
                        {"siddo": True, "kd": {"alphas": [ALPHA]}, "rcd": None})
        store = Store(tmp, "bench")
        # A one-epoch teacher is enough to load (its weights do not change the cost); the
        # students are re-pointed at it (the teacher's key includes its recipe).
        t1 = plan.teachers[0].with_(recipe=dict(plan.teachers[0].recipe, epochs=1))
        run_trial(t1, store, device=device)
        by = {s.method: s.with_(teacher=t1) for s in plan.students}
        siddo, kd = by["siddo"], by["kd"]
        bundle = load_dataset(kd.dataset, kd.data_root, **kd.dataset_args)
        cache_used = bool(getattr(bundle, "train_inputs_are_fixed", lambda: False)())
        runs = interleaved({"siddo": lambda: kdray_epochs(siddo, store, device),
                            "kd_nocache": lambda: kd_nocache_epochs(kd, store, device),
                            "kd_cached": lambda: kdray_epochs(kd, store, device),
                            "teacher_fwd": lambda: teacher_forward_epoch(kd, store, device)}, reps)
        build = cache_build_seconds(kd, store, device) if cache_used else float("nan")
    s = median([t for run in runs["siddo"] for t in run])
    k = median([t for run in runs["kd_nocache"] for t in run])
    c = median([t for run in runs["kd_cached"] for t in run])
    f = median(runs["teacher_fwd"])
    return {"siddo_epoch_s": s, "kd_epoch_s": k, "kd_cached_epoch_s": c, "teacher_forward_epoch_s": f,
            "cache_used": cache_used, "cache_build_s": build,
            "ratio": k / s, "ratio_cached": c / s, "cache_saving_share": (k - c) / k,
            "kd_extra_share": (k - s) / k, "teacher_forward_share": f / k,
            "siddo_epochs_s": runs["siddo"], "kd_epochs_s": runs["kd_nocache"],
            "kd_cached_epochs_s": runs["kd_cached"], "teacher_fwd_s": runs["teacher_fwd"]}


def run(quick: bool = False, device: str = "cpu", case_list: Optional[dict[str, dict]] = None,
        reps: Optional[int] = None, threads: Optional[int] = 1) -> dict:
    t0 = now()
    case_list = case_list or step_cases(device, quick)
    per = {name: measure_case(c, device, reps or c.get("reps", 3), threads) for name, c in case_list.items()}
    meas = {}
    for name, m in per.items():
        meas[f"{name}: median epoch s SIDDO"] = m["siddo_epoch_s"]
        meas[f"{name}: median epoch s KD a{ALPHA}, no cache (teacher forward per step)"] = m["kd_epoch_s"]
        meas[f"{name}: ratio KD (no cache) / SIDDO"] = m["ratio"]
        meas[f"{name}: median epoch s KD a{ALPHA} with kdray's train-output cache"] = m["kd_cached_epoch_s"]
        meas[f"{name}: cache used by run_trial (inputs not augmented)"] = m["cache_used"]
        meas[f"{name}: ratio KD (cache) / SIDDO"] = m["ratio_cached"]
        meas[f"{name}: share of a KD epoch the cache saves (no cache - cache) / no cache"] = m["cache_saving_share"]
        meas[f"{name}: cache build s, once per teacher (teacher forward over the train set)"] = m["cache_build_s"]
        meas[f"{name}: teacher forward s per epoch, timed alone"] = m["teacher_forward_epoch_s"]
        meas[f"{name}: teacher forward alone / KD epoch"] = m["teacher_forward_share"]
        meas[f"{name}: (KD - SIDDO) / KD"] = m["kd_extra_share"]
    last = list(per.values())[-1]
    notes = ["Self-distillation: the teacher has the student's architecture, so its forward is a large share "
             "of a step (forward + backward + optimiser).",
             "Headline ratio: KD / SIDDO epoch time of the last (largest) model; every model is listed.",
             f"Torch threads = {threads or torch.get_num_threads()}; reps per case in params; SIDDO, KD and "
             "the teacher-forward timing alternate."]
    return result(NAME, TITLE, last["ratio"], "KD epoch time (no cache) / SIDDO epoch time",
                  "report (no target); and what the cache saves", None, meas,
                  {"quick": quick, "device": device, "threads": threads, "alpha": ALPHA,
                   "cases": {k: {"epochs": c["epochs"], "reps": reps or c.get("reps", 3), **c["recipe"],
                                 "dataset": c["dataset"], "model": c["teacher"]} for k, c in case_list.items()}},
                  notes, now() - t0) | {"cases": per, "ratio_text": "; ".join(
                      f"{k.split(' ')[0]}: no cache {m['ratio']:.2f}, cache {m['ratio_cached']:.2f} "
                      f"(saves {100 * m['cache_saving_share']:.0f} %)" for k, m in per.items())}

