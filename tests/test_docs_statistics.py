"""docs/statistics.md's numbers, regenerated: each is computed by brute-force enumeration (or
statsmodels) and by kdray's code, and must appear in the page exactly as written there."""
from __future__ import annotations

from fractions import Fraction
from itertools import permutations
from pathlib import Path

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from kdray.analysis import corrections, effects
from kdray.analysis.stats import signed_rank_test, wilcoxon_one_sided
from test_stats_round2 import CONSTRUCTED_X, CONSTRUCTED_Y, brute, f32

DOC = (Path(__file__).resolve().parents[1] / "docs" / "statistics.md").read_text()
TEXT = " ".join(DOC.split())           # line breaks as spaces


def doc_has(phrase: str) -> None:
    assert phrase in TEXT, f"docs/statistics.md should say: {phrase}"


def frac(p: float, denom: int) -> Fraction:
    """p as k/denom (the numerator is what the page writes), checked to be exactly that."""
    k = round(p * denom)
    assert k / denom == pytest.approx(p, abs=1e-15)
    return Fraction(k, 1)


def test_tied_worked_example():
    d = np.array([-2, 2, -1, -2, -1, -1]) / 360
    p = brute(d, "less")
    assert signed_rank_test(d, "less")[0] == pytest.approx(p)
    doc_has(f"P(R+ <= 5) = {frac(p, 64).numerator}/64 = {p:g}")
    # untied: the +2 takes rank 4, 5 or 6 of 6, depending on the float noise
    untied = set()
    for noise in permutations([1e-12, 2e-12, 3e-12]):
        twos = np.array([-1, 1, -1]) * (2 + np.array(noise))       # |d| of the three 2s in every order
        dd = np.array([twos[0], twos[1], -1 - 1e-12, twos[2], -1 - 2e-12, -1 - 3e-12])
        untied.add(frac(brute(dd, "less"), 64).numerator)
    doc_has("rank 4, 5 or 6 and gives " + ", ".join(f"{k}/64" for k in sorted(untied)[:-1])
            + f" or {sorted(untied)[-1]}/64")


def test_float32_worked_examples():
    p = brute(CONSTRUCTED_X - CONSTRUCTED_Y, "greater")
    assert wilcoxon_one_sided(f32(CONSTRUCTED_X), f32(CONSTRUCTED_Y), "higher") == pytest.approx(p)
    doc_has(f"p = P(at least 6 of 8 signs positive) = {frac(p, 256).numerator}/256 = {p:.4g}")
    doc_has(f"at float32 resolution it gives {p:.4g}")
    old = effects.F32_RTOL
    try:
        effects.F32_RTOL = effects.TIE_RTOL            # what ranking the float32 noise at 1e-9 gave
        noisy = wilcoxon_one_sided(f32(CONSTRUCTED_X), f32(CONSTRUCTED_Y), "higher")
    finally:
        effects.F32_RTOL = old
    doc_has(f"the noise gave p = {noisy:.4g} (significant)")
    q = brute(np.array([1, 0, 0, 1, -1, -1]), "greater")
    doc_has(f"p = {frac(q, 16).numerator}/16 = {q:g}")


def test_interval_worked_example():
    d = np.array([1] + [-1] * 9) / 360
    p = brute(d, "less")
    assert signed_rank_test(d, "less")[0] == pytest.approx(p)
    doc_has(f"One-sided (lower) p = {frac(p, 1024).numerator}/1024 = {p:.4g}, significant")
    hi = effects.upper_bound(d)
    assert hi == pytest.approx(-1 / 360)
    doc_has(f"is -1/360 = {hi:.4g}")


def test_asymmetry_worked_example():
    p = brute(np.array([1, 1, 1, 1, 1, 0]), "two-sided")
    doc_has(f"two-sided p = {frac(p, 32).numerator}/32 = {p:g}")


def test_smallest_p_table(holm_without_gc):
    """Every row of the smallest-attainable-p table against statsmodels' multipletests."""
    for n in (5, 6, 7):
        raw = np.full(4, 2.0 ** -n)
        cells = [f"{2.0 ** -n:.4g}"] + [f"{multipletests(raw, method=m)[1].min():.3g}" for m in ("fdr_by", "holm")]
        for method, cell in zip(("bh", "by", "holm"), cells):
            assert float(cell) == pytest.approx(corrections.min_adjusted_p(n, method), rel=5e-3)
        doc_has(f"| {n} | {cells[0]} | {cells[1]} | {cells[2]} |")


def test_operating_characteristics_tables():
    """~10 s: 12 decision-rule cells and 12 coverage cells of 20000 simulated studies each."""
    from kdray.analysis import operating

    rates = operating.decision_rates()
    for name in operating.PATTERNS:
        doc_has(f"| {name} | " + " | ".join(f"{rates[(name, n)]:.4f}" for n in operating.SEEDS) + " |")
    for t in (2, 3, 5):
        for n in (5, 6, 8, 10):
            drawn, like = operating.pooled_coverage(t, n)
            doc_has(f"| {t} | {n} | {drawn:.3f} | {like:.3f} |" if t >= 3 else f"| {t} | {n} | {drawn:.3f} | n/a |")
            assert 0.94 <= drawn <= 0.96 and (t < 3 or 0.94 <= like <= 0.96)
    assert rates[("global null", 10)] <= 0.05


def test_sesoi_table():
    """The default SESOIs the page states are the code's, and 1% of each metric's range (by hand)."""
    import math

    from kdray.analysis.sizing import SESOI

    assert SESOI["activation_distance"] == pytest.approx(0.01 * math.sqrt(2), abs=5e-5)
    assert SESOI["js_divergence"] == pytest.approx(0.01 * math.log(2), abs=5e-5)
    doc_has(f"| activation_distance (L2 between softmax vectors) | [0, sqrt 2] | {SESOI['activation_distance']:g} |")
    doc_has(f"| js_divergence (nats) | [0, ln 2] | {SESOI['js_divergence']:g} |")
    for m in ("prediction_disagreement", "rank_disagreement", "correct_agreement", "asymmetry"):
        assert SESOI[m] == 0.01
    doc_has("| prediction_disagreement, rank_disagreement, prediction/correct/incorrect agreement | [0, 1] | 0.01 |")
