"""What on-policy GKD (``gkd``, kdray/conditions/gkd.py) costs per training step at this reproduction's scale.

Times kdray's own training step, as ``run_trial`` takes it (the condition's ``on_policy`` swap,
``kdray.recipe._forward``, the objective, backward, Adam), on the reproduction's data and models:
BPE TinyShakespeare (512 tokens, block 64), a GPT-2 2x64 teacher and a 2x32 student (random
weights: the cost does not depend on them), batch 16, one torch thread (a Ray worker's
``cpu: 1``).  For ``gjsd`` and ``gkd`` at lambda 0, 0.5 and 1 (alpha 0.5, beta 0.5, prompt
16: a sampled step generates 49 tokens per row, re-reading the prefix each token), it prints
the mean milliseconds per step over ``STEPS`` steps (after 3 warm-up steps) and how many of
them were on-policy.  Evaluation is not included.

Run: ``KDRAY_DATA=$PWD/data python analysis/reproductions/tinyshakespeare_bpe_gpt2/onpolicy_cost.py [STEPS]``
"""
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kdray import conditions  # noqa: E402
from kdray.data import load_dataset  # noqa: E402
from kdray.models import build_model  # noqa: E402
from kdray.recipe import _forward  # noqa: E402

GPT2 = {"model_type": "gpt2", "n_layer": 2, "n_head": 2}
RUNS = [("gjsd", {}), ("gkd", {"lmbda": 0.0}), ("gkd", {"lmbda": 0.5}), ("gkd", {"lmbda": 1.0})]


def time_steps(method: str, extra: dict, bundle, teacher, steps: int) -> tuple[float, int]:
    """(mean seconds per step, on-policy steps) of ``steps`` steps after 3 warm-up steps."""
    cond = conditions.get(method)
    params = cond.full_params({"alpha": 0.5, "beta": 0.5, "prompt": 16, **extra})
    objective, swap_of = cond.objective(params), cond.on_policy(params) if cond.on_policy else None
    torch.manual_seed(1)
    student = build_model("hf_causal_lm", bundle.num_classes, bundle.input_shape, config={**GPT2, "n_embd": 32})
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(0)
    on, t0 = 0, None
    for step, (xb, yb) in enumerate(bundle.train_batches(16, steps + 3, order)):
        if step == 3:
            t0, on = time.perf_counter(), 0
        swap = swap_of(student, xb, 7, step) if swap_of else None
        if swap is not None:
            (xb, yb), on = swap, on + 1
        batch = _forward(student, teacher, cond, params, xb, yb, 0, step)
        batch.sampled = swap is not None
        loss = objective(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps, on


def main(steps: int = 40) -> None:
    torch.set_num_threads(1)
    bundle = load_dataset("text_bpe", os.environ.get("KDRAY_DATA", "data"), vocab_size=512, block_size=64)
    torch.manual_seed(0)
    teacher = build_model("hf_causal_lm", bundle.num_classes, bundle.input_shape, config={**GPT2, "n_embd": 64})
    teacher.eval().requires_grad_(False)
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    base = None
    for method, extra in RUNS:
        s, on = time_steps(method, extra, bundle, teacher, steps)
        base = base or s
        name = method + (f" lambda {extra['lmbda']:g}" if extra else "")
        print(f"{name:16s} {s * 1000:7.1f} ms/step ({s / base:.1f}x gjsd), {on}/{steps} steps on-policy")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:]))
