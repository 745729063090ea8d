"""Statistics, round two (ties of float32 rates, intervals that agree with their tests, asymmetry with
its evidence, equivalence, power at a smallest effect of interest, the pooled interval), each checked
against an independent computation: brute-force sign-flip enumeration, statsmodels, hand-computed
values or a direct simulation, never the call the code makes."""
from __future__ import annotations

from fractions import Fraction
from itertools import product
from pathlib import Path

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


# ------------------------------------------------------------------ 2. intervals that agree with their tests

def random_differences(rng, n: int, kind: int) -> np.ndarray:
    """Tied rate differences (counts of 360), small-integer ties with zeros, or continuous ones."""
    if kind == 0:
        return effects.snap_ties(rng.integers(-3, 5, n) / 360)
    if kind == 1:
        return rng.integers(-1, 3, n).astype(float)
    return rng.normal(0.3, 1, n)


@pytest.mark.parametrize("sizes", [range(1, 13), range(21, 31)])   # every candidate scanned; bisection
def test_a_significant_one_sided_test_never_shows_an_interval_covering_0(sizes):
    """Property: over random tied and untied data, brute-force p <= 0.05 one-sided => that side's bound
    excludes 0 (and the interval is the one test_stats reports)."""
    rng = np.random.default_rng(11)
    significant = 0
    for it in range(400):
        n = int(rng.choice(list(sizes)))
        d = random_differences(rng, n, it % 3)
        iv = effects.test_interval(d)
        for alt in ("greater", "less"):
            p = brute(d, alt) if n <= 12 else stats.signed_rank_test(d, alt)[0]
            if p <= 0.05:
                significant += 1
                assert (iv.low > 0) if alt == "greater" else (iv.high < 0), (d, alt, p, iv)
    assert significant >= 30


def test_bounds_invert_the_brute_force_test():
    """Every shift below the lower bound is rejected by the enumerated one-sided test, the bound (or
    the open stretch just above it) is not; likewise the upper bound."""
    rng = np.random.default_rng(3)
    for it in range(60):
        d = random_differences(rng, int(rng.integers(5, 11)), it % 3)
        lo, hi = effects.lower_bound(d), effects.upper_bound(d)
        grid = np.linspace(d.min() - 1, d.max() + 1, 41)
        p_gt = lambda t: brute(effects.snap_ties(d - t), "greater")   # noqa: E731
        p_lt = lambda t: brute(effects.snap_ties(d - t), "less")      # noqa: E731
        assert all(p_gt(t) <= 0.05 for t in grid if t < lo)
        assert all(p_lt(t) <= 0.05 for t in grid if t > hi)
        w = np.unique(np.round([(a + b) / 2 for a in d for b in d], 12))
        eps = np.diff(w).min() / 4 if w.size > 1 else 0.1          # inside the stretch next to a Walsh average
        if np.isfinite(lo):
            assert p_gt(lo) > 0.05 or p_gt(lo + eps) > 0.05
        if np.isfinite(hi):
            assert p_lt(hi) > 0.05 or p_lt(hi - eps) > 0.05


def test_the_issues_tied_case_and_zeros():
    """d = [+1, -1 x 9]/360: one-sided p = 11/1024 = 0.0107 (by hand: at most one positive sign of 10
    equal ranks); the upper bound is -1/360 (every shift in (-1/360, 0] still leaves 9 of 10 below),
    not the two-sided 95% interval [-1/360, 0] that covered 0."""
    d = np.array([1] + [-1] * 9) / 360
    assert brute(d, "less") == pytest.approx(11 / 1024)
    assert effects.upper_bound(d) == pytest.approx(-1 / 360) and effects.upper_bound(d) < 0
    # five zeros and five +1: p = 1/32 at 0, but just above 0 the zeros are small negatives and the
    # test no longer rejects (P = 112/1024 by hand), so the bound is the float just above 0
    d = np.array([0.0] * 5 + [1.0] * 5)
    assert brute(d, "greater") == 1 / 32 and brute(d - 1e-6, "greater") == pytest.approx(112 / 1024)
    assert 0 < effects.lower_bound(d) < 1e-300


def test_too_few_pairs_have_no_bound():
    assert effects.test_interval(np.array([0.1, 0.2, 0.3, 0.4])) == (-np.inf, np.inf, 0.9)   # min p 1/16


# ------------------------------------------------------------------ 7. asymmetry with its evidence

def asymmetry_runs(inc_extra, n_seeds=6):
    """KD clearly better than SIDDO and RCD on the four functional metrics; its incorrect-agreement count
    (of 120 teacher mistakes) exceeds the controls' by inc_extra[seed], correct agreement equal."""
    out = []
    for s in range(n_seeds):
        base = dict(activation_distance=0.3 + s / 50, js_divergence=0.05 + s / 50, rank_disagreement=0.2 + s / 50,
                    prediction_disagreement=(40 + 3 * s) / 360, correct_agreement=(200 + s) / 240,
                    incorrect_agreement=(30 + s) / 120, test_acc=0.8, test_loss=0.7)
        kd = {m: v - 0.01 - s / 1000 for m, v in base.items() if m in ("activation_distance", "js_divergence",
                                                                           "rank_disagreement")}
        kd |= dict(prediction_disagreement=(38 + 3 * s - s % 2) / 360, correct_agreement=base["correct_agreement"],
                   incorrect_agreement=(30 + s + inc_extra[s]) / 120, test_acc=0.8, test_loss=0.7)
        out += [run("z", "siddo", 0, s, metrics=dict(base, test_acc=0.81)),
                run("z", "rcd", 0, s, alpha=0.5, metrics=dict(base, test_acc=0.79)),
                run("z", "kd", 0, s, alpha=0.5, metrics=kd)]
    return out


def test_a_direction_without_a_significant_test_is_not_named():
    """Δincorrect - Δcorrect = +1/120 on 5 seeds and 0 on one: two-sided p = 2/32 = 0.0625 by enumeration,
    so the summary says 'direction negative, not significant', never 'negative'."""
    from kdray.analysis.report import ReportResult
    from kdray.audit import answer_lines

    a = analyse(as_frame(asymmetry_runs([1, 1, 1, 1, 1, 0])), power_draws=0)
    r = a.decisions.iloc[0]
    assert r.supported and r.delta_incorrect > r.delta_correct
    assert r.p_asymmetry == pytest.approx(brute(np.array([1, 1, 1, 1, 1, 0]), "two-sided")) == pytest.approx(0.0625)
    assert r.asymmetry == "negative, n.s." and r.asymmetry_seeds >= 6
    line = [ln for ln in ReportResult(Path("out"), a).summary_text().splitlines() if ln.startswith("z:")][0]
    assert "t0 direction negative, not significant (p 0.0625; " in line and "negative asymmetry" not in line
    words = "\n".join(answer_lines(a))
    assert "direction negative, not significant (p 0.0625" in words and "copied more of" not in words

    a = analyse(as_frame(asymmetry_runs([1, 2, 1, 3, 1, 2])), power_draws=0)   # 6 of 6 positive: p = 2/64
    r = a.decisions.iloc[0]
    assert r.asymmetry == "negative" and r.p_asymmetry == pytest.approx(brute(np.array([1, 2, 1, 3, 1, 2]), "two-sided"))
    line = [ln for ln in ReportResult(Path("out"), a).summary_text().splitlines() if ln.startswith("z:")][0]
    assert "; negative asymmetry]" in line
    assert "the student copied more of the teacher's mistakes" in "\n".join(answer_lines(a))


def test_signed_rank_power_against_scipy_simulation():
    """sizing's vectorised power against a plain loop of scipy's exact test on fresh normal draws."""
    from scipy.stats import wilcoxon

    from kdray.analysis import sizing

    rng = np.random.default_rng(4)
    for n, ratio, two in ((8, 0.8, False), (12, 0.5, True)):
        alt = "two-sided" if two else "greater"
        hits = [wilcoxon(rng.normal(ratio, 1, n), alternative=alt, method="exact").pvalue <= 0.05 for _ in range(2000)]
        want = np.mean(hits)
        got = sizing.signed_rank_power(n, ratio, 1.0, 0.05, two)
        assert abs(got - want) < 4 * np.sqrt(want * (1 - want) * (1 / 2000 + 1 / sizing.DRAWS)), (n, got, want)
    n = sizing.seeds_needed(0.5, 1.0)
    assert sizing.signed_rank_power(int(n), 0.5, 1.0) >= 0.8 > sizing.signed_rank_power(int(n) - 3, 0.5, 1.0)
