"""Statistics, round two (ties of float32 rates, intervals that agree with their tests, asymmetry with
its evidence, equivalence, power at a smallest effect of interest, the pooled interval), each checked
against an independent computation: brute-force sign-flip enumeration, statsmodels, hand-computed
values or a direct simulation, never the call the code makes."""
from __future__ import annotations

from fractions import Fraction
from itertools import product

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from kdray.analysis import effects, stats
from kdray.analysis.stats import analyse, wilcoxon_one_sided
from synthetic_runs import SEEDS, as_frame, run


def brute(d, alternative: str) -> float:
    """The signed-rank p by enumerating every sign pattern of the non-zero |d| (mid-ranks), exact fractions."""
    d = [x for x in d if x != 0]
    r = rankdata(np.abs(d))                                  # mid-ranks, halves at most
    r2 = [int(round(2 * v)) for v in r]
    obs = sum(v for v, x in zip(r2, d) if x > 0)
    null = [sum(v for v, s in zip(r2, signs) if s) for signs in product((0, 1), repeat=len(d))]
    lo = Fraction(sum(t <= obs for t in null), len(null))
    hi = Fraction(sum(t >= obs for t in null), len(null))
    return float({"less": lo, "greater": hi}.get(alternative, min(1, 2 * min(lo, hi))))


# ------------------------------------------------------------------ 1. accuracy ties

QUICKSTART_X = np.array([301, 296, 310, 288, 305, 299])          # correct answers of 360, KD
QUICKSTART_D = np.array([+1, 0, 0, +1, -1, -1])                   # KD - RCD, as in the quickstart
CONSTRUCTED_X = np.array([319, 338, 335, 322, 346, 325, 327, 317])
CONSTRUCTED_Y = np.array([318, 337, 334, 321, 345, 324, 328, 318])


def f32(counts, n=360) -> np.ndarray:
    """Accuracy as kdray stored it before: the float32 mean of a boolean vector."""
    out = []
    for k in counts:
        hits = torch.zeros(n)
        hits[:k] = 1
        out.append(float(hits.mean()))
    return np.array(out)


def test_float32_accuracies_tie_like_their_counts():
    x, y = QUICKSTART_X, QUICKSTART_X - QUICKSTART_D
    d32 = f32(x) - f32(y)
    assert np.unique(np.abs(d32[d32 != 0])).size > 1                 # the float32 noise the issue found
    assert brute(x - y, "greater") == 0.6875                          # 11/16 by enumeration
    assert wilcoxon_one_sided(f32(x), f32(y), "higher") == 0.6875
    assert brute(CONSTRUCTED_X - CONSTRUCTED_Y, "greater") == pytest.approx(37 / 256)
    assert wilcoxon_one_sided(f32(CONSTRUCTED_X), f32(CONSTRUCTED_Y), "higher") == pytest.approx(37 / 256)
    # and as float64 k/n, the way trials now store it
    assert wilcoxon_one_sided(CONSTRUCTED_X / 360, CONSTRUCTED_Y / 360, "higher") == pytest.approx(37 / 256)


def test_float32_accuracies_in_the_report_tests():
    """The same counts as test_acc of KD and RCD runs: the report's test_acc p is the tie-aware one."""
    runs = []
    for s, (kx, ky) in enumerate(zip(CONSTRUCTED_X, CONSTRUCTED_Y)):
        base = dict(activation_distance=0.3, js_divergence=0.05, rank_disagreement=0.2, prediction_disagreement=0.15,
                    test_loss=0.7)
        runs += [run("q", "siddo", 0, s, metrics=dict(base, test_acc=0.5)),
                 run("q", "rcd", 0, s, alpha=0.9, metrics=dict(base, test_acc=f32([ky])[0])),
                 run("q", "kd", 0, s, alpha=0.9, metrics=dict(base, test_acc=f32([kx])[0]))]
    a = analyse(as_frame(runs), power_draws=0)
    t = a.tests[(a.tests["metric"] == "test_acc") & (a.tests["control"].map(lambda c: c.method) == "rcd")].iloc[0]
    assert t.p == pytest.approx(brute(CONSTRUCTED_X - CONSTRUCTED_Y, "greater")) and t.null == "exact-ties"
    assert not t.significant


def test_trials_store_accuracy_as_exact_k_over_n():
    from kdray.recipe import loss_and_accuracy

    torch.manual_seed(0)
    logits = torch.randn(361, 7)
    y = torch.randint(0, 7, (361,))
    k = int((logits.argmax(-1) == y).sum())
    _, acc = loss_and_accuracy(logits, y)
    assert type(acc) is float and acc == k / 361 and Fraction(acc) == Fraction(k / 361)


def test_prediction_agreement_is_k_over_n():
    from kdray.functional import functional_metrics

    torch.manual_seed(1)
    t, c = torch.randn(997, 5), torch.randn(997, 5)
    y = torch.randint(0, 5, (997,))
    k = int((t.argmax(-1) == c.argmax(-1)).sum())
    m = functional_metrics(t, c, y)
    assert m["prediction_agreement"] == k / 997 and m["prediction_disagreement"] == (997 - k) / 997
