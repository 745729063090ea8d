"""Benchmark 10: a kdray LM trial (``run_trial``, ``hf_causal_lm`` on ``text_bpe``) vs a plain
``transformers`` training loop on the same model (needs kdray[lm]).

Same model (``init_model``: identical initial weights), same token stream (the ``DataBundle``
kdray loads: BPE TinyShakespeare), same batch size, block size, optimiser (Adam) and
per-token cross-entropy.  The plain loop is what one writes with transformers alone::

    for step: starts = randint(...); x = stream[starts + arange(T)]
              loss = model(input_ids=x, labels=x).loss; zero_grad; backward; step

(``labels=x``: transformers shifts them inside, so its loss sees T-1 positions per
window; kdray's windows carry their own next-token targets, T per window.)
kdray's step additionally does what the engine needs (``train_draws``/``take``, the
objective registry, a LambdaLR step, on-device loss/accuracy sums, one host sync and a
``report`` call per logged "epoch" of ``log_every`` steps).  Times are those of the
logged epochs after the first (warm-up), runs alternate kdray / plain (A B A B), medians
compared.  Throughput = training tokens per second (batch x block size per step).
"""
from __future__ import annotations

import tempfile
from typing import Optional

import torch

from benchmarks.common import interleaved, median, now, result, sync, torch_threads
from benchmarks.train_step import kdray_epochs   # seconds per logged epoch, from run_trial's report

NAME = "lm_step"
TITLE = "LM training step: kdray run_trial (hf_causal_lm) vs a plain transformers loop"
TARGET = 0.9      # kdray tokens/s >= 0.9 x the plain transformers loop's


def cases(device: str, quick: bool = False) -> dict[str, dict]:
    """A tiny GPT-2 (2 layers, 64 wide) on 512-token BPE TinyShakespeare; bigger on a GPU."""
    out = {"gpt2 2x64 bpe512 b16x64": dict(
        config={"model_type": "gpt2", "n_layer": 2, "n_embd": 64, "n_head": 2},
        dataset={"vocab_size": 512, "block_size": 64, "max_chars": 200_000}, batch_size=16,
        steps_per_epoch=10 if quick else 20, epochs=4 if quick else 5, reps=2 if quick else 3)}
    if torch.device(device).type == "cuda":
        out["gpt2 6x384 bpe512 b64x256"] = dict(
            config={"model_type": "gpt2", "n_layer": 6, "n_embd": 384, "n_head": 6},
            dataset={"vocab_size": 512, "block_size": 256}, batch_size=64, steps_per_epoch=20, epochs=5, reps=3)
    return out


def tiny_case() -> dict:
    return dict(config={"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2},
                dataset={"vocab_size": 300, "block_size": 16, "max_chars": 20_000}, batch_size=4,
                steps_per_epoch=2, epochs=3, reps=1)


def plan_for(case: dict, storage: str):
    from kdray.plan import build_plan
    from kdray.sweep import parse_sweep

    recipe = {"optimizer": "adam", "lr": 1e-3, "batch_size": case["batch_size"],
              "iterations": case["steps_per_epoch"] * case["epochs"], "log_every": case["steps_per_epoch"]}
    d = {"name": "bench", "storage": storage, "tracking_uri": f"sqlite:///{storage}/mlflow.db",
         "setups": [{"name": "bench", "dataset": {"name": "text_bpe", "args": case["dataset"]},
                     "teacher": {"arch": "hf_causal_lm", "args": {"config": case["config"]}}, "recipe": recipe,
                     "teacher_seeds": [0], "student_seeds": [10],
                     "conditions": {"siddo": True, "kd": None, "rcd": None}}]}
    return build_plan(parse_sweep(d, "<benchmark>"))


def plain_epochs(spec, device: str, steps_per_epoch: int) -> list[float]:
    """The transformers loop over the same stream and initial weights; seconds of epochs 2..E."""
    from kdray.data import load_dataset
    from kdray.recipe import init_model
    from kdray.sweep import Recipe

    r = Recipe(**spec.recipe)
    bundle = load_dataset(spec.dataset, spec.data_root, **spec.dataset_args)
    hf = init_model(spec, bundle).hf.to(device)
    opt = torch.optim.Adam(hf.parameters(), lr=r.lr)
    gen = torch.Generator().manual_seed(0)
    stream, T = bundle.train_x, bundle.block_size
    offsets = torch.arange(T)
    times = []
    for _ in range(r.iterations // steps_per_epoch):
        t = now()
        hf.train()
        for _ in range(steps_per_epoch):
            starts = torch.randint(len(stream) - T, (r.batch_size,), generator=gen)
            x = stream[starts[:, None] + offsets].to(device, non_blocking=True)
            loss = hf(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        times.append(now() - t)
    return times[1:]


def measure_case(case: dict, device: str, reps: int, threads: Optional[int]) -> dict:
    from kdray.storage import Store

    with tempfile.TemporaryDirectory(prefix="kdray-bench-lm-") as tmp, torch_threads(threads):
        spec = plan_for(case, tmp).teachers[0]
        store = Store(tmp, "bench")
        runs = interleaved({"kdray": lambda: kdray_epochs(spec, store, device),
                            "plain": lambda: plain_epochs(spec, device, case["steps_per_epoch"])}, reps)
    k = median([t for run in runs["kdray"] for t in run])
    p = median([t for run in runs["plain"] for t in run])
    tokens = case["steps_per_epoch"] * case["batch_size"] * case["dataset"]["block_size"]
    return {"tokens_per_epoch": tokens, "kdray_epoch_s": k, "plain_epoch_s": p, "kdray_tokens_per_s": tokens / k,
            "plain_tokens_per_s": tokens / p, "ratio": p / k, "kdray_epochs_s": runs["kdray"],
            "plain_epochs_s": runs["plain"]}


def run(quick: bool = False, device: str = "cpu", case_list: Optional[dict[str, dict]] = None,
        reps: Optional[int] = None, threads: Optional[int] = 1) -> dict:
    import os
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = now()
    case_list = case_list or cases(device, quick)
    per = {name: measure_case(c, device, reps or c.get("reps", 3), threads) for name, c in case_list.items()}
    meas = {}
    for name, m in per.items():
        meas[f"{name}: kdray tokens/s"] = m["kdray_tokens_per_s"]
        meas[f"{name}: plain transformers tokens/s"] = m["plain_tokens_per_s"]
        meas[f"{name}: ratio kdray / plain"] = m["ratio"]
        meas[f"{name}: median epoch s (kdray, plain)"] = f"{m['kdray_epoch_s']:.3f}, {m['plain_epoch_s']:.3f}"
    ratio = min(m["ratio"] for m in per.values())
    notes = [f"Interleaved runs per side (A B A B), logged epochs 2..E of each, medians; torch threads = "
             f"{threads or torch.get_num_threads()} on both sides.",
             "Headline ratio: the worst case (kdray tokens/s / plain transformers tokens/s).",
             "The plain loop uses the model's own loss (labels=input_ids, shifted inside transformers); kdray "
             "takes .logits and its registry's cross-entropy on the window's next-token targets."]
    return result(NAME, TITLE, ratio, "kdray tokens/s / plain transformers loop tokens/s (worst case)",
                  f">= {TARGET}", ratio >= TARGET, meas,
                  {"quick": quick, "device": device, "threads": threads,
                   "cases": {k: {kk: vv for kk, vv in c.items()} | {"reps": reps or c.get("reps", 3)}
                             for k, c in case_list.items()}},
                  notes, now() - t0) | {"cases": per, "ratio_text": "; ".join(
                      f"{k.split(' ')[0]} {m['ratio']:.2f}" for k, m in per.items())}
