"""Benchmark 5: every functional metric (``kdray.functional.functional_metrics``) for 70
students against one teacher on 10,000 x 200 outputs, vs a per-sample loop.

The data: teacher logits ``N(0, 3^2)`` of shape ``[n, k]``, each student the
teacher's logits plus independent ``N(0, 1.5^2)`` noise (so they agree on
most, not all, predictions), labels equal to the teacher's argmax on 80% of
the rows and random elsewhere (so both correct and incorrect agreement are
defined).  float32, as the recipe passes them.

The loop version (``loop_metrics``) is what one writes without vectorising:
for each test input, softmax of both rows (float64 numpy), L2 distance, JS
divergence, a stable descending argsort of each row for the rank
disagreement, argmaxes, and the running column sums and ``K x K``
cross-products for the Procrustes distance; the label entropies of the
variation of information from counts at the end.  It is checked against
``functional_metrics`` on the rows it times, then timed on ``loop_rows``
rows of ``loop_students`` students and extrapolated linearly to all rows and
students (its cost per row does not depend on the row count, except for the
``K x K`` SVD at the end, done once per student and timed with it).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from benchmarks.common import cpu_count, interleaved, median, now, result, torch_threads

NAME = "functional"
TITLE = "Functional metrics: 70 students x 10,000 x 200 outputs, vectorised vs a per-sample loop"


def make_outputs(n: int, k: int, students: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    teacher = (rng.normal(0, 3, size=(n, k))).astype(np.float32)
    labels = teacher.argmax(1)
    flip = rng.random(n) < 0.2
    labels[flip] = rng.integers(0, k, size=int(flip.sum()))
    studs = [(teacher + rng.normal(0, 1.5, size=(n, k))).astype(np.float32) for _ in range(students)]
    return torch.from_numpy(teacher), [torch.from_numpy(s) for s in studs], torch.from_numpy(labels.astype(np.int64))


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


def loop_metrics(teacher, student, labels) -> dict:
    """The metrics of docs/protocol.md §4, one test input at a time."""
    t, c, y = np.asarray(teacher, np.float64), np.asarray(student, np.float64), np.asarray(labels)
    n, k = t.shape
    act = js = 0.0
    rank_diff = agree = agree_right = n_right = 0
    sum_p, sum_q = np.zeros(k), np.zeros(k)
    cross = np.zeros((k, k))
    ss_p = ss_q = 0.0
    pairs: dict = {}
    ca: dict = {}
    cb: dict = {}
    for i in range(n):
        p, q = _softmax(t[i]), _softmax(c[i])
        act += math.sqrt(float(((p - q) ** 2).sum()))
        m = 0.5 * (p + q)
        kl_p = float(np.sum(np.where(p > 0, p * (np.log(p) - np.log(m)), 0.0)))
        kl_q = float(np.sum(np.where(q > 0, q * (np.log(q) - np.log(m)), 0.0)))
        js += min(max(0.5 * (kl_p + kl_q), 0.0), math.log(2))
        rp, rq = np.argsort(-p, kind="stable"), np.argsort(-q, kind="stable")
        rank_diff += int((rp != rq).sum())
        a, b = int(rp[0]), int(rq[0])
        right = a == int(y[i])
        n_right += right
        agree += a == b
        agree_right += (a == b) and right
        pairs[(a, b)] = pairs.get((a, b), 0) + 1
        ca[a] = ca.get(a, 0) + 1
        cb[b] = cb.get(b, 0) + 1
        sum_p += p
        sum_q += q
        cross += np.outer(p, q)
        ss_p += float(p @ p)
        ss_q += float(q @ q)

    def ent(counts: dict) -> float:
        f = np.array(list(counts.values()), dtype=np.float64) / n
        return float(-(f * np.log(f)).sum())

    mp, mq = sum_p / n, sum_q / n
    cov = cross - n * np.outer(mp, mq)
    norm_p, norm_q = math.sqrt(max(ss_p - n * mp @ mp, 0.0)), math.sqrt(max(ss_q - n * mq @ mq, 0.0))
    nuclear = float(np.linalg.svd(cov, compute_uv=False).sum())
    n_wrong = n - n_right
    return {"activation_distance": act / n, "js_divergence": js / n, "rank_disagreement": rank_diff / (n * k),
            "prediction_disagreement": (n - agree) / n, "prediction_agreement": agree / n,
            "correct_agreement": agree_right / n_right if n_right else float("nan"),
            "incorrect_agreement": (agree - agree_right) / n_wrong if n_wrong else float("nan"),
            "variation_of_information": max(0.0, 2 * ent(pairs) - ent(ca) - ent(cb)),
            "procrustes_distance": min(2.0, max(0.0, 2 - 2 * nuclear / (norm_p * norm_q)))}


def max_abs_diff(a: dict, b: dict) -> float:
    return max(abs(a[k] - b[k]) for k in a if not (math.isnan(a[k]) and math.isnan(b[k])))


def run(quick: bool = False, device: str = "cpu", n: int = 10000, k: int = 200, students: int = 70,
        loop_rows: Optional[int] = None, loop_students: int = 2, reps: Optional[int] = None,
        threads: Optional[int] = 1) -> dict:
    from kdray.functional import functional_metrics

    t0 = now()
    loop_rows = min(n, loop_rows or (500 if quick else 2000))
    reps = reps or (1 if quick else 2)
    threads = threads or cpu_count()      # default 1: as inside a trial (finish_trial), one thread
    teacher, studs, labels = make_outputs(n, k, students)
    dev = torch.device(device)
    teacher_d, labels_d = teacher.to(dev), labels.to(dev)
    studs_d = [s.to(dev) for s in studs]

    def vectorised() -> float:
        t = now()
        out = [functional_metrics(teacher_d, s, labels_d) for s in studs_d]
        assert len(out) == students
        return now() - t

    def loop() -> float:
        t = now()
        for s in studs[:loop_students]:
            loop_metrics(teacher[:loop_rows].numpy(), s[:loop_rows].numpy(), labels[:loop_rows].numpy())
        return now() - t

    with torch_threads(threads):
        check = max(max_abs_diff(loop_metrics(teacher[:loop_rows].numpy(), s[:loop_rows].numpy(),
                                              labels[:loop_rows].numpy()),
                                 functional_metrics(teacher[:loop_rows], s[:loop_rows], labels[:loop_rows]))
                    for s in studs[:1])
        functional_metrics(teacher_d[:100], studs_d[0][:100], labels_d[:100])       # warm-up
        runs = interleaved({"vectorised": vectorised, "loop": loop}, reps)
    vec = median(runs["vectorised"])
    loop_sub = median(runs["loop"])
    loop_full = loop_sub * (n / loop_rows) * (students / loop_students)
    ratio = loop_full / vec
    meas = {"kdray functional_metrics, all 70 students s": vec,
            "kdray per student s": vec / students,
            f"loop s on {loop_rows} rows x {loop_students} students (measured)": loop_sub,
            "loop s for all rows and students (extrapolated)": loop_full,
            "speed-up kdray vs loop": ratio,
            "max |loop - kdray| on the checked rows": check}
    notes = [f"Outputs {n} x {k}, {students} students, float32, on {device}; torch threads {threads}; "
             f"{reps} interleaved repetitions, medians.",
             f"The loop is timed on {loop_rows} of {n} rows and {loop_students} of {students} students and "
             f"extrapolated linearly (x {n / loop_rows:g} x {students / loop_students:g}); its result is checked "
             "against functional_metrics on those rows."]
    return result(NAME, TITLE, ratio, "per-sample loop seconds (extrapolated) / kdray seconds",
                  "report (no target): seconds and the speed-up", None, meas,
                  {"quick": quick, "device": device, "n": n, "k": k, "students": students, "loop_rows": loop_rows,
                   "loop_students": loop_students, "reps": reps, "threads": threads}, notes,
                  now() - t0) | {"ratio_text": f"{vec:.1f} s for {students} students"}
