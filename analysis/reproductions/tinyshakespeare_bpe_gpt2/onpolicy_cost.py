"""What on-policy distillation (GKD's lambda) would cost per step at this reproduction's scale.

GKD trains on the student's own samples: each on-policy step generates the batch's
continuations with the student (autoregressively, with a KV cache), scores them with the
teacher, and then takes the same forward/backward as an off-policy KD step.  This measures,
on the reproduction's models (GPT-2 2x64 teacher, 2x32 student, BPE 512, batch 16 x 64
tokens, one torch thread), the median seconds of (a) a KD training step on corpus windows,
(b) sampling 64 new tokens for 16 prompts of 1 token with the student, (c) the teacher's
forward on the result.  Run: ``python analysis/reproductions/tinyshakespeare_bpe_gpt2/onpolicy_cost.py``
"""
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kdray.conditions import build_objective  # noqa: E402
from kdray.losses import Batch  # noqa: E402
from kdray.models import build_model  # noqa: E402


def median_s(fn, reps=7):
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    V, B, T = 512, 16, 64
    teacher = build_model("hf_causal_lm", V, (T,), config={"model_type": "gpt2", "n_layer": 2, "n_embd": 64,
                                                           "n_head": 2}).eval().requires_grad_(False)
    student = build_model("hf_causal_lm", V, (T,), config={"model_type": "gpt2", "n_layer": 2, "n_embd": 32,
                                                           "n_head": 2})
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    loss_fn = build_objective("gjsd", {"alpha": 0.5, "beta": 0.5})
    x = torch.randint(0, V, (B, T))

    def kd_step():
        with torch.no_grad():
            zt = teacher(x)
        loss = loss_fn(Batch(student(x), x, zt))
        opt.zero_grad()
        loss.backward()
        opt.step()

    def sample():
        with torch.no_grad():
            return student.hf.generate(x[:, :1], max_new_tokens=T, do_sample=True, min_new_tokens=T,
                                       pad_token_id=0, use_cache=True)

    gen = sample()

    def score():
        with torch.no_grad():
            teacher(gen[:, :T])

    step, gen_s, score_s = median_s(kd_step), median_s(sample), median_s(score)
    print(f"KD step (off-policy): {step * 1000:.0f} ms; sampling {T} tokens x {B}: {gen_s * 1000:.0f} ms; "
          f"teacher scoring: {score_s * 1000:.0f} ms; an on-policy step ~ {(step + gen_s + score_s) / step:.1f}x "
          f"an off-policy one")


if __name__ == "__main__":
    main()
