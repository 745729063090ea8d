"""Ties, effect sizes, corrections and power, each against an independent computation
(hand-computed textbook values, brute-force enumeration, direct simulation), never the same call."""
import math
import statistics
from itertools import product

import numpy as np
import pytest
from scipy.stats import norm, rankdata, wilcoxon
from statsmodels.stats.multitest import multipletests

from kdray.analysis import corrections, effects, power, stats
from kdray.analysis.stats import signed_rank_test, wilcoxon_one_sided
from synthetic_runs import rate

def rate_pairs(counts):
    """(kd, control) rates from (k_kd, k_control) count pairs."""
    return np.array([rate(a) for a, _ in counts]), np.array([rate(b) for _, b in counts])


# ------------------------------------------------------------------ ties

# Prediction disagreement of 6 paired seeds, differences -2, +2, -1, -2, -1, -1 of 360, the counts chosen
# so that the float differences of equal counts are NOT bit-equal (as on a real quickstart sweep).
TIED = [(40, 42), (75, 73), (61, 62), (100, 102), (20, 21), (95, 96)]


def test_rate_differences_of_equal_counts_differ_in_the_last_bits():
    kd, ctrl = rate_pairs(TIED)
    d = kd - ctrl
    assert np.unique(np.abs(d)).size > 2                              # float noise: more than the 2 true values
    snapped = effects.snap_ties(d, max(kd.max(), ctrl.max()))
    assert np.unique(np.abs(snapped)).size == 2
    assert list(np.sign(snapped)) == [-1, 1, -1, -1, -1, -1]


def test_tied_rates_give_the_tie_aware_exact_p():
    """By hand: doubled mid-ranks |d|=1 -> 4 (x3), |d|=2 -> 10 (x3); R+ (doubled) = 10 from the +2.
    P(R+ <= 10) = #{10a + 4b <= 10} / 64 = (1 + 3 + 3 + 3) / 64 = 0.15625 (untied ranks: 8/64 = 0.125)."""
    kd, ctrl = rate_pairs(TIED)
    p, null = signed_rank_test(kd - ctrl, "less", max(kd.max(), ctrl.max()))
    assert (p, null) == (0.15625, "exact-ties")
    assert wilcoxon_one_sided(kd, ctrl, "lower") == 0.15625
    assert wilcoxon_one_sided(kd, ctrl, "higher") == 1 - 7 / 64       # P(R+ >= 10) = 1 - P(R+ <= 9)
    ints = np.array([a - b for a, b in TIED])                          # integers: no float noise
    assert p == pytest.approx(brute(ints, "less"))


def brute(d, alternative):
    d = np.asarray(d, float)
    d = d[d != 0]
    r = rankdata(np.abs(d))
    obs = r[d > 0].sum()
    null = np.array([np.dot(r, s) for s in product((0, 1), repeat=d.size)])
    lo, hi = np.mean(null <= obs), np.mean(null >= obs)
    return {"less": lo, "greater": hi}.get(alternative, min(1.0, 2 * min(lo, hi)))


def test_rate_ties_and_zeros_against_enumeration():
    rng = np.random.default_rng(5)
    for n in (5, 8, 12, 15):
        counts = [(int(a), int(a + rng.integers(-3, 4))) for a in rng.integers(20, 300, n)]
        kd, ctrl = rate_pairs(counts)
        ints = np.array([a - b for a, b in counts])
        if not ints.any():
            continue
        for direction, alt in (("lower", "less"), ("higher", "greater")):
            p, null = signed_rank_test(kd - ctrl, alt, max(kd.max(), ctrl.max()))
            assert null == "exact-ties" and p == pytest.approx(brute(ints, alt), rel=1e-12)


def test_untied_path_is_the_exact_one_and_rounding_zeros_are_zeros():
    d = np.array([0.3, -0.1, 0.25, 0.7, 0.05])
    assert signed_rank_test(d, "greater")[1] == "exact"
    x = np.array([0.1 + 0.2, 0.7, 0.4])
    y = np.array([0.3, 0.7 - 0.05 + 0.05, 0.4])                      # equal up to rounding
    assert signed_rank_test(x - y, "less", 0.7) == (1.0, "exact")


def test_normal_approximation_above_50_pairs_by_hand():
    """z = (R+ - n(n+1)/4) / sqrt(n(n+1)(2n+1)/24 - sum(t^3 - t)/48), p = Phi(z), mid-ranks, zeros dropped."""
    rng = np.random.default_rng(8)
    d = rng.integers(-6, 9, 70) / 100                                 # ties and zeros
    p, null = signed_rank_test(d, "less")
    assert null == "normal"
    nz = d[d != 0]
    n = nz.size
    a = np.round(np.abs(nz) * 100).astype(int)
    ranks = {v: (np.sum(a < v) + 1 + np.sum(a <= v)) / 2 for v in set(a)}
    r_plus = sum(ranks[v] for v, s in zip(a, nz) if s > 0)
    ties = sum(t ** 3 - t for t in np.unique(a, return_counts=True)[1])
    sd = math.sqrt(n * (n + 1) * (2 * n + 1) / 24 - ties / 48)
    z = (r_plus - n * (n + 1) / 4) / sd
    assert p == pytest.approx(0.5 * math.erfc(-z / math.sqrt(2)), rel=1e-9)


# ------------------------------------------------------------------ effect sizes

def test_hodges_lehmann_is_the_median_of_walsh_averages():
    rng = np.random.default_rng(1)
    for n in (1, 2, 5, 8, 13):
        d = rng.normal(0.2, 1, n)
        walsh = [(d[i] + d[j]) / 2 for i in range(n) for j in range(i, n)]
        assert effects.hodges_lehmann(d) == pytest.approx(statistics.median(walsh), rel=1e-12)


def test_hl_interval_inverts_scipys_exact_test():
    """Just inside each end the two-sided exact p (scipy) is above 0.05, just outside it is not."""
    rng = np.random.default_rng(2)
    for n in (6, 9, 15):
        d = rng.normal(0.5, 1, n)
        ci = effects.hl_interval(d)
        w = np.sort([(d[i] + d[j]) / 2 for i in range(n) for j in range(i, n)])
        k = int(np.searchsorted(w, ci.low))
        inside_lo, outside_lo = (w[k] + w[k + 1]) / 2, (w[k - 1] + w[k]) / 2 if k else w[0] - 1
        kk = int(np.searchsorted(w, ci.high))
        inside_hi, outside_hi = (w[kk - 1] + w[kk]) / 2, (w[kk] + w[kk + 1]) / 2 if kk + 1 < w.size else w[-1] + 1
        p = lambda t: wilcoxon(d - t, method="exact").pvalue  # noqa: E731
        assert p(inside_lo) > 0.05 and p(inside_hi) > 0.05
        assert p(outside_lo) <= 0.05 and p(outside_hi) <= 0.05
        assert ci.level >= 0.95


def test_hl_interval_widest_when_too_few_pairs():
    d = np.array([0.1, 0.3, -0.2, 0.4, 0.5])
    ci = effects.hl_interval(d)
    assert (ci.low, ci.high) == (d.min(), d.max()) and ci.level == pytest.approx(1 - 2 / 32)


def test_hl_interval_covers_the_planted_shift_95_percent():
    rng = np.random.default_rng(3)
    shift, n, reps = 0.3, 12, 2000
    hits = 0
    for _ in range(reps):
        ci = effects.hl_interval(rng.normal(shift, 1, n))
        hits += ci.low <= shift <= ci.high
    level = effects.hl_interval(np.arange(1.0, n + 1)).level       # the discrete interval's own level
    assert 0.95 <= level < 0.96
    assert abs(hits / reps - level) < 3 * math.sqrt(level * (1 - level) / reps)


def test_rank_biserial_and_superiority_by_hand():
    d = np.array([1.0, 2.0, -3.0, 4.0])                             # R+ = 1 + 2 + 4 = 7, R- = 3
    assert effects.rank_biserial(d, "higher") == pytest.approx((7 - 3) / 10)
    assert effects.rank_biserial(d, "lower") == pytest.approx(-0.4)
    assert effects.rank_biserial(np.array([0.0, -1, -1, -2]), "lower") == 1.0
    assert effects.superiority(np.array([1.0, 0.0, -1.0, 2.0]), "higher") == 0.625
    assert effects.superiority(np.array([1.0, 0.0, -1.0, 2.0]), "lower") == 0.375


def test_pooled_interval_is_welchs():
    """By hand: group means 2 and 12, variances 1 and 6 over 3 and 4 pairs; var = (1/3 + 6/4) / 4,
    Welch-Satterthwaite df = (1/3 + 1.5)^2 / ((1/3)^2 / 2 + 1.5^2 / 3)."""
    from scipy.stats import t

    groups = [np.array([1.0, 2.0, 3.0]), np.array([10.0, 10.0, 13.0, 15.0])]
    est, lo, hi = effects.pooled_interval(groups)
    v = 1 / 3 + np.var([10, 10, 13, 15], ddof=1) / 4
    df = v ** 2 / ((1 / 3) ** 2 / 2 + (np.var([10, 10, 13, 15], ddof=1) / 4) ** 2 / 3)
    assert est == 7 and hi - est == pytest.approx(t.ppf(0.975, df) * np.sqrt(v) / 2, rel=1e-12)
    assert est - lo == pytest.approx(hi - est)
    assert effects.pooled_interval([np.full(4, 0.5), np.full(3, 0.5)]) == (0.5, 0.5, 0.5)


# ------------------------------------------------------------------ corrections

P4 = [0.01, 0.04, 0.03, 0.005]


def test_corrections_on_a_hand_computed_family():
    """Sorted 0.005, 0.01, 0.03, 0.04.  BH: p*4/i = .02 .02 .04 .04 (cummin from the top); BY: BH * (1 + 1/2
    + 1/3 + 1/4) = BH * 25/12; Holm: p*(4 - i + 1) = .02 .03 .06 .04, cummax -> .02 .03 .06 .06."""
    np.testing.assert_allclose(corrections.adjust(P4, "bh"), [0.02, 0.04, 0.04, 0.02], rtol=1e-12)
    np.testing.assert_allclose(corrections.adjust(P4, "by"), np.array([0.02, 0.04, 0.04, 0.02]) * 25 / 12, rtol=1e-12)
    np.testing.assert_allclose(corrections.adjust(P4, "holm"), [0.03, 0.06, 0.06, 0.02], rtol=1e-12)
    np.testing.assert_allclose(corrections.adjust([0.3, 0.9], "holm"), [0.6, 0.9])
    assert corrections.adjust([0.8, 0.9, 0.95], "by").max() == 1.0   # clipped


def test_corrections_textbook_example():
    """Benjamini & Hochberg (1995), 15 p-values; at q = 0.05 BH rejects the 4 smallest, Holm/Bonferroni 3."""
    p = np.array([0.0001, 0.0004, 0.0019, 0.0095, 0.0201, 0.0278, 0.0298, 0.0344, 0.0459, 0.3240, 0.4262,
                  0.5719, 0.6528, 0.7590, 1.0000])
    assert (corrections.adjust(p, "bh") <= 0.05).sum() == 4
    assert (corrections.adjust(p, "holm") <= 0.05).sum() == 3
    assert corrections.adjust(p, "bh")[3] == pytest.approx(0.0095 * 15 / 4)


def test_vectorised_corrections_equal_statsmodels_row_by_row(holm_without_gc):
    rng = np.random.default_rng(6)
    p = rng.uniform(0, 0.2, (30, 4)) ** 2
    for method, sm in (("bh", "fdr_bh"), ("by", "fdr_by"), ("holm", "holm")):
        got = corrections.adjust(p, method)
        for row, g in zip(p, got):
            np.testing.assert_allclose(g, multipletests(row, method=sm)[1], rtol=1e-12)
    with_nan = corrections.adjust([0.01, np.nan, 0.02], "bh")
    assert math.isnan(with_nan[1]) and with_nan[0] == pytest.approx(0.02)


def test_rejected_families_equal_statsmodels_adjusted_p_at_the_level(holm_without_gc):
    """corrections.rejected (the power simulation's) is "adjusted p <= level" by statsmodels' multipletests,
    family by family, on p-values with many ties (dyadic, as exact signed-rank p are) and at the boundaries
    (50 families)."""
    rng = np.random.default_rng(11)
    p = rng.integers(1, 40, (50, 4)) / 256                          # ties within families
    p[0], p[1] = [0.0125, 0.025, 0.0375, 0.05], [0.0125, 0.05 / 3, 0.025, 0.05]   # BH's and Holm's boundaries
    for method, sm in (("bh", "fdr_bh"), ("by", "fdr_by"), ("holm", "holm")):
        adjusted = np.array([multipletests(row, method=sm)[1] for row in p])
        for level in (0.05, 0.1):
            got = corrections.rejected(p.reshape(5, 10, 4), method, level).reshape(50, 4)
            assert (got == (adjusted <= level)).all(), (method, level)
    assert corrections.rejected([0.01, np.nan, 0.02], "bh").tolist() == [True, False, True]


def test_cli_offers_exactly_the_corrections():
    from kdray import cli

    assert set(cli.CORRECTIONS) == set(corrections.CORRECTIONS) == set(corrections.SHORT)


def test_smallest_attainable_p_and_seeds_needed():
    assert corrections.min_adjusted_p(6, "bh") == 2 ** -6
    assert corrections.min_adjusted_p(6, "by") == pytest.approx(2 ** -6 * 25 / 12)
    assert corrections.min_adjusted_p(6, "holm") == 4 * 2 ** -6
    assert [corrections.seeds_needed(0.05, m) for m in ("bh", "by", "holm")] == [5, 6, 7]
    assert stats.significance_warning(6, correction="holm") is not None
    assert "7 student seeds" in stats.significance_warning(6, correction="holm")
    assert stats.significance_warning(6, correction="bh") is None
    assert "0.0625" in stats.smallest_p_text(6, "holm") and "0.01562" in stats.smallest_p_text(6, "bh")


# ------------------------------------------------------------------ power

def test_exact_greater_p_is_scipys():
    rng = np.random.default_rng(7)
    x = rng.normal(0.2, 1, (50, 9))
    np.testing.assert_allclose(power.exact_greater_p(x),
                               [wilcoxon(r, alternative="greater", method="exact").pvalue for r in x], rtol=1e-12)


def test_power_follows_the_correction_and_the_effect():
    quiet = np.random.default_rng(0).normal(0, 0.01, (2, 4, 8))     # noise far below the effect of 1
    assert power.power_at(quiet, 5, 1.0, "bh", draws=200) == 1.0     # 2^-5 <= 0.05
    assert power.power_at(quiet, 6, 1.0, "holm", draws=200) == 0.0   # Holm needs 4 * 2^-n <= 0.05: 7 seeds
    assert power.power_at(quiet, 7, 1.0, "holm", draws=200) == 1.0
    null = np.random.default_rng(1).normal(0, 1, (2, 4, 40))
    assert power.power_at(null, 20, 0.0, draws=500) < 0.03


def test_power_matches_direct_simulation():
    """A large pilot of independent unit noise, power at a stated effect of 0.6 sd, against drawing fresh
    normal studies and deciding each with scipy's exact test and statsmodels' BH (independent code, 400 draws)."""
    rng = np.random.default_rng(9)
    delta, n = 0.6, 12
    pilot = rng.normal(5.0, 1, (1, 4, 2000))                         # its own mean (effect) is not used
    got = power.power_at(pilot, n, delta, draws=2000)
    wins = 0
    for _ in range(400):
        ps = [wilcoxon(rng.normal(delta, 1, n), alternative="greater", method="exact").pvalue for _ in range(4)]
        wins += multipletests(ps, alpha=0.05, method="fdr_bh")[0].sum() >= 3
    assert abs(got - wins / 400) < 0.08


def test_w_plus_prefixes_are_rank_sums_of_every_prefix():
    """Tukey's identity, checked by brute force: W+ of the first n values = the sum of the ranks of |x|
    (scipy's rankdata) where x > 0, for every n."""
    from scipy.stats import rankdata

    from kdray.analysis import sizing

    x = np.random.default_rng(3).normal(0.1, 1, (7, 15))
    got = sizing.w_plus_prefixes(x)
    for row, w in zip(x, got):
        assert list(w) == [int(rankdata(np.abs(row[:n]))[row[:n] > 0].sum()) for n in range(1, 16)]


def test_a_power_curve_decides_each_n_on_the_first_n_seeds_of_one_set_of_studies():
    """support_curve against its own definition, decided by independent code: the same normal studies
    (drawn here with its documented seeding), each n decided on the first n seeds by scipy's exact test,
    statsmodels' BH per control, significant against both controls on >= 2 of 3 metrics.  And a one-n
    curve is support_rate."""
    from kdray.analysis import sizing

    cov = np.diag([1.0, 0.5, 2.0, 1.0, 1.0, 0.3])
    shift, ns, draws = np.array([0.5, 0.4, 0.9]), [3, 5, 8, 11], 60
    got = sizing.support_curve(cov, shift, ns, 2, 3, "bh", draws=draws, min_metrics=2, seed=4)
    rng = np.random.default_rng([4, 11])
    z = rng.standard_normal((draws, 11, 6)) @ (np.linalg.eigh(cov)[1] * np.sqrt(np.linalg.eigh(cov)[0])).T
    x = (z + np.tile(shift, 2)).reshape(draws, 11, 2, 3)
    for n in ns:
        wins = 0
        for study in x:
            sig = [multipletests([wilcoxon(study[:n, c, m], alternative="greater", method="exact").pvalue
                                  for m in range(3)], alpha=0.05, method="fdr_bh")[0] for c in range(2)]
            wins += int(np.sum(np.logical_and(*sig)) >= 2)
        assert got[n] == pytest.approx(wins / draws), n
    assert sizing.support_curve(cov, shift, [8], 2, 3, draws=draws) == {8: sizing.support_rate(cov, shift, 8, 2, 3,
                                                                                                 draws=draws)}


def test_seeds_for_target():
    import pandas as pd

    curve = pd.DataFrame(dict(n_seeds=[5, 6, 7, 8], pilot=[False, True, False, False], power=[0.1, 0.5, 0.81, 0.9]))
    assert power.seeds_for(curve) == 7
    assert math.isnan(power.seeds_for(curve.assign(power=0.2)))


def test_the_plain_python_test_a_bound_scans_is_the_numpy_test():
    """effects.greater_rejected_small (the bounds' scan) against the numpy path the report's test uses,
    on tied, zero-holding and continuous data at every Walsh average and between them."""
    rng = np.random.default_rng(11)
    checked = 0
    for trial in range(300):
        n = int(rng.integers(1, effects.SCAN_MAX_N + 1))
        kind = trial % 3
        d = (rng.integers(-3, 5, n) / 7 if kind == 0 else rng.normal(0.3, 1, n) if kind == 1
             else np.round(rng.normal(0.2, 1, n), 1))
        d = effects.snap_ties(d)
        scale = float(np.max(np.abs(d))) or 1.0
        w = np.unique(effects.walsh_averages(d))
        for delta in np.r_[w, (w[:-1] + w[1:]) / 2, w[0] - 1, w[-1] + 1]:
            for level in (0.05, 0.2):
                want = effects.snapped_p(effects.snap_ties(d - delta, scale), "greater")[0] <= level
                assert effects.greater_rejected_small(d.tolist(), float(delta), effects.TIE_RTOL * scale,
                                                      level) == want, (d, delta, level)
                checked += 1
    assert checked > 10000


def test_a_curve_cut_short_with_the_same_top_is_the_start_of_the_full_curve():
    """power_curves draws the noisy curve only up to the pilot's count first: with the same ``top`` the
    studies are the same, so its points equal the full curve's (and another top draws other studies)."""
    from kdray.analysis import sizing

    cov = np.array([[1.0, 0.3, 0.0, 0.1], [0.3, 1.0, 0.2, 0.0], [0.0, 0.2, 1.0, 0.4], [0.1, 0.0, 0.4, 1.0]])
    shift, ns = np.array([0.3, 0.2, 0.4, 0.25]), list(range(5, 31))
    full = sizing.support_curves(cov, shift, {1.8: ns}, 1, 4, draws=300)[1.8]
    short = sizing.support_curves(cov, shift, {1.8: ns[:6]}, 1, 4, draws=300, top=30)[1.8]
    assert short == {n: full[n] for n in ns[:6]}
    assert 0 < full[10] < 1
