"""Benchmark 2: kdray's training loop (``run_trial``) vs a minimal hand-written PyTorch loop.

Same model (``init_model``: identical initial weights), same data tensors (the
``DataBundle`` kdray loads), same batch size, optimiser (Adam) and loss (CE),
same device and torch threads.  The hand-written loop is what one would write
without kdray::

    for epoch: perm = randperm(n); for each batch: x = train_x[idx].to(dev).float()/255 ...;
               loss = F.cross_entropy(model(x), y); zero_grad; backward; step

kdray's epoch additionally does what the engine needs: ``bundle.train_batches``
and ``bundle.preprocess``, the objective registry, a LambdaLR step, on-device
loss/accuracy accumulation, one host sync and a ``report`` call per epoch.
Epoch times come from the ``report`` callback (kdray) and from the loop's own
clock; the first epoch of every run is dropped (warm-up), runs alternate
kdray / hand-written (A B A B), and the medians are compared.
Throughput = training samples per second.
"""
from __future__ import annotations

import tempfile
from typing import Optional

import torch
import torch.nn.functional as F

from benchmarks.common import SYNTHETIC_SVHN, interleaved, median, now, register_synthetic_svhn, result, sync, \
    torch_threads

NAME = "train_step"
TITLE = "Training step: kdray run_trial vs a minimal hand-written PyTorch loop"
TARGET = 0.95     # kdray throughput >= 0.95 x the hand-written loop's


def cases(device: str, quick: bool = False) -> dict[str, dict]:
    """Model x data x batch: the quickstart's, and an SVHN-shaped one (bigger on a GPU)."""
    out = {
        "digits small_cnn(16) b64": dict(dataset={"name": "digits"},
                                         teacher={"arch": "small_cnn", "args": {"channels": 16, "dropout": 0.1}},
                                         recipe={"optimizer": "adam", "lr": 0.002, "batch_size": 64},
                                         epochs=5 if quick else 8, reps=3 if quick else 5),
        "svhn-shaped small_cnn(8) b256": dict(
            dataset={"name": SYNTHETIC_SVHN, "args": {"n_train": 2560, "n_test": 512}},
            teacher={"arch": "small_cnn", "args": {"channels": 8}},
            recipe={"optimizer": "adam", "lr": 0.001, "batch_size": 256}, epochs=3 if quick else 4,
            reps=2 if quick else 3),
    }
    if torch.device(device).type == "cuda":
        out["svhn-shaped resnet18 b256"] = dict(
            dataset={"name": SYNTHETIC_SVHN, "args": {"n_train": 20000, "n_test": 2000}},
            teacher={"arch": "resnet18", "args": {}}, recipe={"optimizer": "adam", "lr": 0.001, "batch_size": 256},
            epochs=4, reps=3)
    return out


def tiny_case() -> dict:
    return dict(dataset={"name": SYNTHETIC_SVHN, "args": {"n_train": 256, "n_test": 64}},
                teacher={"arch": "mlp", "args": {"hidden": 16}}, recipe={"optimizer": "adam", "lr": 0.001,
                                                                        "batch_size": 64}, epochs=3, reps=1)


def plan_for(case: dict, storage: str, conditions: Optional[dict] = None):
    """The TrialSpecs of a one-teacher, one-student-seed sweep over ``case``."""
    from kdray.plan import build_plan
    from kdray.sweep import parse_sweep

    register_synthetic_svhn()
    recipe = dict(case["recipe"], epochs=case["epochs"], eval_every=0, checkpoint_every=0)
    d = {"name": "bench", "storage": storage, "tracking_uri": f"sqlite:///{storage}/mlflow.db",
         "setups": [{"name": "bench", "dataset": case["dataset"], "teacher": case["teacher"], "recipe": recipe,
                     "teacher_seeds": [0], "student_seeds": [10],
                     "conditions": conditions or {"siddo": True, "kd": None, "rcd": None}}]}
    return build_plan(parse_sweep(d, "<benchmark>"))


def kdray_epochs(spec, store, device: str) -> list[float]:
    """Seconds of every epoch after the first, from run_trial's per-epoch report callback."""
    from kdray.recipe import run_trial

    stamps: list[float] = []

    def report(metrics: dict, state=None) -> None:
        if not metrics.get("final"):
            stamps.append(now())

    run_trial(spec, store, report, device=device)
    return [b - a for a, b in zip(stamps, stamps[1:])]


def hand_epochs(spec, device: str) -> list[float]:
    """The minimal loop over the same bundle, model init and recipe; seconds of epochs 2..E."""
    from kdray.data import load_dataset
    from kdray.recipe import init_model
    from kdray.sweep import Recipe

    r = Recipe(**spec.recipe)
    bundle = load_dataset(spec.dataset, spec.data_root, **spec.dataset_args)
    model = init_model(spec, bundle).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=r.lr)
    gen = torch.Generator().manual_seed(0)
    x_all, y_all = bundle.train_x, bundle.train_y
    n, bs = len(x_all), r.batch_size
    times = []
    for _ in range(r.epochs):
        t = now()
        model.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            x = x_all[idx].to(device, non_blocking=True).float().div_(255).sub_(0.5).div_(0.5)
            y = y_all[idx].to(device, non_blocking=True)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        times.append(now() - t)
    return times[1:]


def measure_case(case: dict, device: str, reps: int, threads: Optional[int]) -> dict:
    from kdray.data import load_dataset
    from kdray.storage import Store

    with tempfile.TemporaryDirectory(prefix="kdray-bench-step-") as tmp, torch_threads(threads):
        plan = plan_for(case, tmp)
        spec = plan.teachers[0]
        store = Store(tmp, "bench")
        bundle = load_dataset(spec.dataset, spec.data_root, **spec.dataset_args)    # loaded once, shared
        runs = interleaved({"kdray": lambda: kdray_epochs(spec, store, device),
                            "hand": lambda: hand_epochs(spec, device)}, reps)
    k = median([t for run in runs["kdray"] for t in run])
    h = median([t for run in runs["hand"] for t in run])
    n = len(bundle.train_x)
    return {"samples_per_epoch": n, "batch_size": spec.recipe["batch_size"], "kdray_epoch_s": k, "hand_epoch_s": h,
            "kdray_samples_per_s": n / k, "hand_samples_per_s": n / h, "ratio": h / k,
            "kdray_epochs_s": runs["kdray"], "hand_epochs_s": runs["hand"]}


def run(quick: bool = False, device: str = "cpu", case_list: Optional[dict[str, dict]] = None,
        reps: Optional[int] = None, threads: Optional[int] = 1) -> dict:
    t0 = now()
    case_list = case_list or cases(device, quick)
    per = {name: measure_case(c, device, reps or c.get("reps", 3), threads) for name, c in case_list.items()}
    meas = {}
    for name, m in per.items():
        meas[f"{name}: kdray samples/s"] = m["kdray_samples_per_s"]
        meas[f"{name}: hand-written samples/s"] = m["hand_samples_per_s"]
        meas[f"{name}: ratio kdray / hand-written"] = m["ratio"]
        meas[f"{name}: median epoch s (kdray, hand)"] = f"{m['kdray_epoch_s']:.3f}, {m['hand_epoch_s']:.3f}"
    ratio = min(m["ratio"] for m in per.values())
    notes = [f"Interleaved runs per side (A B A B; reps per case in params), epochs 2..E of each, medians; torch threads = "
             f"{threads or torch.get_num_threads()} on both sides (one per trial, as `kdray sweep` packs trials "
             f"on a CPU).",
             "Headline ratio: the worst case over the models (kdray throughput / hand-written throughput).",
             "Both sides move each batch from the CPU-resident data set to the device, as run_trial does."]
    return result(NAME, TITLE, ratio, "kdray samples/s / hand-written loop samples/s (worst case)",
                  f">= {TARGET}", ratio >= TARGET, meas,
                  {"quick": quick, "device": device, "threads": threads,
                   "cases": {k: {"epochs": c["epochs"], "reps": reps or c.get("reps", 3), **c["recipe"],
                                 "dataset": c["dataset"],
                                 "model": c["teacher"]} for k, c in case_list.items()}},
                  notes, now() - t0) | {"cases": per, "ratio_text": "; ".join(
                      f"{k.split(' ')[0]} {m['ratio']:.2f}" for k, m in per.items())}
