"""Ties, effect sizes and confidence intervals for paired per-seed differences.

Rate metrics (accuracy, prediction disagreement, agreements) are k/N, so two
seeds' differences of the same k/N can differ in the last bits of a float (and
by ~1e-8 where an older version stored accuracy as float32: ``tie_rtol``).  Rank
statistics only see signs and the order of |d|, so ``snap_ties`` decides
ties once, at a documented tolerance, for every metric: two |d| closer than
``TIE_RTOL`` times the scale of the paired values are one value, and a |d|
within that of zero is zero.  Float rounding of x - y is ~1e-16 of max(|x|,
|y|); real differences between seeds are many orders above 1e-9 of it.

Everything else here is on snapped differences d = treated - control:

- ``exact_tied_p``: the signed-rank test's exact null with ties and zeros, by
  counting all 2^n sign patterns through a rank-sum recursion on doubled
  mid-ranks (the same distribution as sign-flip enumeration, any n <= 50);
- ``lower_bound`` / ``upper_bound`` / ``test_interval``: one-sided bounds that
  invert the report's own exact tie-aware one-sided tests, and the 1 - 2 level
  interval they make (what the report shows beside each test);
- ``hodges_lehmann`` / ``hl_interval``: the median of the Walsh averages and
  the classical two-sided interval from the untied null (kept for reference;
  the report uses test_interval);
- ``rank_biserial`` and ``superiority``: matched-pairs effect sizes oriented
  so that +1 / 1.0 mean "the treated condition is better on every seed";
- ``pooled_interval``: a Welch t interval for the teacher seeds drawn, and
  ``random_effects_interval``: a t interval on the teacher seeds' means for
  teachers like these (3 teacher seeds or more).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence

import numpy as np

TIE_RTOL = 1e-9          # |d| closer than this times the values' scale are tied (and that close to 0: zero)
F32_RTOL = 2.0 ** -21    # the same for values that are all float32 (an accuracy stored by kdray before 0.x)
CI_LEVEL = 0.95
EXACT_MAX_N = 50         # exact null distributions up to this many pairs, normal approximation above
SCAN_MAX_N = 20          # bounds scan every candidate shift up to this many pairs, bisect above


def tie_rtol(*arrays) -> float:
    """The relative tie tolerance for differences of these paired values: TIE_RTOL, or F32_RTOL when
    every finite value is exactly a float32.

    A rate k/N rounded to float32 is off by up to half a float32 ulp (6e-8 at 1), so two equal count
    differences can differ by ~1e-7 of the scale, far above TIE_RTOL: float32 values are compared at
    float32's resolution (2 ulp of the scale per difference: 2^-21).  Distinct rate differences
    still differ by 1/N, so this is safe for N below ~2 million; a float64 k/N is almost never a
    float32 (only dyadic k/N are), and where it is the coarser tolerance changes nothing.
    """
    vals = [np.asarray(a, float).ravel() for a in arrays]
    vals = np.concatenate(vals) if vals else np.array([])
    vals = vals[np.isfinite(vals)]
    return F32_RTOL if vals.size and np.all(vals.astype(np.float32).astype(float) == vals) else TIE_RTOL


def snap_ties(d, scale: Optional[float] = None, rtol: float = TIE_RTOL) -> np.ndarray:
    """d with |d| values within rtol * scale of each other made equal (and of 0 made 0).

    Callers that know the paired values pass their largest magnitude as scale (and tie_rtol's
    tolerance), so differences that are pure rounding become zeros.  Given the differences alone,
    scale is max |d|; but differences that are all exactly float32 are taken as differences of
    float32 rates in [0, 1] (an accuracy stored by an older version): F32_RTOL of max(1, max |d|).
    """
    d = np.asarray(d, float)
    if d.size == 0:
        return d.copy()
    a = np.abs(d)
    if scale is None and rtol == TIE_RTOL and tie_rtol(d) == F32_RTOL:
        scale, rtol = max(1.0, float(np.nanmax(a))), F32_RTOL
    tol = rtol * (float(np.max(a)) if scale is None else float(scale))
    order = np.argsort(a, kind="stable")
    s = a[order]
    starts = np.ones(s.size, bool)
    starts[1:] = np.diff(s) > tol          # a new value where the gap to the previous exceeds tol
    rep = s[starts][np.cumsum(starts) - 1]  # every member takes its run's smallest |d|
    rep[rep <= tol] = 0.0
    out = np.empty_like(d)
    out[order] = rep
    return np.copysign(out, d) * (out != 0)


def midranks2(a: np.ndarray) -> np.ndarray:
    """Twice the mid-ranks of a (ties share the mean rank), as integers: sums stay exact."""
    order = np.argsort(a, kind="stable")
    s = a[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], s.size]                      # rank block [start+1, end]
    r2 = np.repeat(starts + 1 + ends, ends - starts)      # 2 * mean(start+1 .. end)
    out = np.empty(a.size, np.int64)
    out[order] = r2
    return out


def rank_sum_counts(weights: np.ndarray) -> np.ndarray:
    """How many of the 2^n sign patterns give each sum of the weights counted positive (float64,
    exact below 2^53, i.e. n <= 52)."""
    counts = np.zeros(int(np.sum(weights)) + 1)
    counts[0] = 1
    for w in weights:  # this weight either counts towards the sum or not
        counts[w:] = counts[w:] + counts[:counts.size - w]
    return counts


@functools.lru_cache(maxsize=8192)
def _tails(r2: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(P(sum <= s), P(sum >= s)) for every s of the null of the doubled mid-ranks ``r2`` (int64 bytes):
    one tie pattern's null, computed once (a confidence bound asks for the same pattern many times)."""
    w = np.frombuffer(r2, np.int64)
    counts, total = rank_sum_counts(w), 2.0 ** w.size
    return np.cumsum(counts) / total, np.cumsum(counts[::-1])[::-1] / total


def exact_tied_p(d: np.ndarray, alternative: str) -> float:
    """Exact signed-rank p of snapped d with ties and/or zeros (zeros dropped, scipy's "wilcox")."""
    d = d[d != 0]
    r2 = midranks2(np.abs(d))
    cdf_at, sf_at = _tails(np.sort(r2).tobytes())
    obs = int(np.sum(r2[d > 0]))
    cdf, sf = float(cdf_at[obs]), float(sf_at[obs])
    return float({"less": cdf, "greater": sf}.get(alternative, min(1.0, 2 * min(cdf, sf))))


def snapped_p(d: np.ndarray, alternative: str) -> tuple[float, str]:
    """The signed-rank p of already-snapped d and its null ("exact", "exact-ties" or "normal";
    stats.signed_rank_test's rules: zeros dropped, exact to EXACT_MAX_N pairs, scipy's normal above)."""
    if d.size < 1:
        return math.nan, ""
    if np.all(d == 0):
        return 1.0, "exact"
    if d.size > EXACT_MAX_N:
        from scipy.stats import wilcoxon

        return float(wilcoxon(d, alternative=alternative, method="asymptotic").pvalue), "normal"
    ties = np.any(d == 0) or np.unique(np.abs(d)).size < d.size
    return exact_tied_p(d, alternative), "exact-ties" if ties else "exact"


# ------------------------------------------------------------------ bounds that agree with the test

def greater_rejected_small(values: list, delta: float, tol: float, level: float) -> bool:
    """``snapped_p(snap_ties(values - delta, scale), "greater")[0] <= level`` (tol = TIE_RTOL * scale)
    for a few values, step for step in plain Python: sorted by |value - delta| (stably), runs of
    gaps <= tol share their smallest |.|, a run within tol of 0 is zero and dropped, each run is one
    block of tied mid-ranks, and the exact tied null of those blocks gives the p.  A confidence
    bound asks this some fifty times per test (tests/test_effects.py checks it equals the numpy path)."""
    v = [x - delta for x in values]
    a = [abs(x) for x in v]
    runs: list[list] = []                         # [smallest |v|, members, members > 0]
    prev = None
    for i in sorted(range(len(v)), key=a.__getitem__):
        if prev is None or a[i] - prev > tol:
            run = [a[i], 0, 0]
            runs.append(run)
        run[1] += 1
        run[2] += v[i] > 0
        prev = a[i]
    sizes: list[int] = []
    obs = pos = 0
    for rep, k, plus in runs:
        if rep <= tol:                            # zeros: dropped, as the exact test drops them
            continue
        obs += (2 * pos + k + 1) * plus           # twice the mean rank of positions pos+1 .. pos+k, per plus
        sizes.append(k)
        pos += k
    if not sizes:                                 # all zero: p = 1
        return 1.0 <= level
    return _tied_sf(tuple(sizes))[obs] <= level


@functools.lru_cache(maxsize=8192)
def _tied_sf(sizes: tuple) -> list:
    """P(sum >= s) of the tied null whose blocks of equal |d| have these sizes (smallest |d| first), as
    Python floats: greater_rejected_small's table, keyed by the tie pattern alone."""
    r2: list[int] = []
    pos = 0
    for k in sizes:
        r2 += [2 * pos + k + 1] * k
        pos += k
    return _tails(np.array(r2, np.int64).tobytes())[1].tolist()


def _distinct(v: np.ndarray, tol: float) -> np.ndarray:
    """Sorted v with values within tol of the previous kept value dropped."""
    v = np.sort(v)
    keep = np.r_[True, np.diff(v) > tol]
    return v[keep]


def lower_bound(d, level: float = 0.05) -> float:
    """The one-sided (1 - level) lower confidence bound for the shift of snapped d, by inverting the
    very test the report runs: the exact tie-aware signed-rank test of d - delta > 0 ("greater").

    The test's p as a function of delta only changes at the Walsh averages (where |d_i - delta|
    tie or cross, or d_i - delta is zero), so it is evaluated at each of them and between them, from
    below; the bound is the first delta the test does not reject (just above a rejected Walsh average
    when the open stretch after it is the first not rejected: np.nextafter of it).  So the bound is
    above 0 exactly when every delta <= 0 is rejected, which includes the report's own test at 0;
    -inf when no shift is rejected (too few pairs).  Above SCAN_MAX_N pairs the first is found by
    bisection, which assumes the p grows with delta (tests/test_stats_round2.py checks both).
    """
    d = np.asarray(d, float)
    d = snap_ties(d[~np.isnan(d)])         # as the test snaps them (float32 differences at float32's resolution)
    if d.size == 0:
        return math.nan
    scale = float(np.max(np.abs(d))) or 1.0
    tol = TIE_RTOL * scale
    w = _distinct(walsh_averages(d), tol)
    step = max(scale, float(w[-1] - w[0])) or 1.0

    if d.size <= SCAN_MAX_N:          # the same test in plain Python: numpy's per-call cost dominates at this size
        values, snap_tol = d.tolist(), TIE_RTOL * scale

        def rejected(delta: float) -> bool:
            return greater_rejected_small(values, delta, snap_tol, level)
    else:
        def rejected(delta: float) -> bool:
            return snapped_p(snap_ties(d - delta, scale), "greater")[0] <= level

    # candidates in increasing order: below all, then each Walsh average and the stretch after it
    cand = np.empty(2 * w.size + 1)
    cand[0], cand[1::2] = w[0] - step, w
    cand[2:-1:2], cand[-1] = (w[:-1] + w[1:]) / 2, w[-1] + step
    if d.size <= SCAN_MAX_N:            # every candidate from below: the first not rejected
        first = next(i for i, c in enumerate(cand) if not rejected(float(c)))
    else:                               # bisection: the p grows with delta (checked on random tied data)
        lo, hi = -1, cand.size - 1      # rejected(cand[lo]) (virtually), not rejected(cand[hi])
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if rejected(float(cand[mid])) else (lo, mid)
        first = hi
    if first == 0:
        return -math.inf
    return float(cand[first]) if first % 2 else float(np.nextafter(cand[first - 1], math.inf))


def upper_bound(d, level: float = 0.05) -> float:
    """The one-sided (1 - level) upper confidence bound by inverting the "less" test (lower_bound of -d)."""
    return -lower_bound(-np.asarray(d, float), level)


def test_interval(d, level: float = 0.05) -> "Interval":
    """[lower_bound, upper_bound]: the two-sided (1 - 2 level) interval made of the two one-sided bounds
    that invert the report's one-sided level tests, so a one-sided test significant at level never
    shows an interval that covers 0 (tests/test_stats_round2.py checks this on random tied data)."""
    return Interval(lower_bound(d, level), upper_bound(d, level), 1 - 2 * level)


# ------------------------------------------------------------------ effect sizes

def walsh_averages(d: np.ndarray) -> np.ndarray:
    """(d_i + d_j) / 2 for all i <= j: n(n+1)/2 values."""
    i, j = np.triu_indices(d.size)
    return (d[i] + d[j]) / 2


def hodges_lehmann(d) -> float:
    """The Hodges-Lehmann estimate of the paired shift: the median Walsh average."""
    d = np.asarray(d, float)
    return float(np.median(walsh_averages(d))) if d.size else math.nan


class Interval(NamedTuple):
    low: float
    high: float
    level: float          # the interval's actual confidence (discrete: at least CI_LEVEL where attainable)


def _lower_count(n: int, level: float) -> tuple[int, float]:
    """(k, actual level): the interval is the (k+1)-th smallest to (k+1)-th largest Walsh average.

    k is the largest count with P(T+ <= k) <= (1 - level) / 2 under the exact
    null (normal with continuity correction above EXACT_MAX_N pairs).  With
    too few pairs no k qualifies (n <= 5 at 95%): k = 0, the widest interval,
    whose lower actual level is returned.
    """
    half = (1 - level) / 2
    m = n * (n + 1) // 2
    if n > EXACT_MAX_N:
        from scipy.stats import norm

        sd = math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
        k = max(0, math.floor(m / 2 - norm.isf(half) * sd - 0.5))
        return k, float(1 - 2 * norm.cdf((k + 0.5 - m / 2) / sd))
    cdf = np.cumsum(rank_sum_counts(np.arange(1, n + 1))) / 2.0 ** n
    k = max(0, int(np.searchsorted(cdf, half, side="right")) - 1)
    return k, float(1 - 2 * cdf[k])


def hl_interval(d, level: float = CI_LEVEL) -> Interval:
    """Confidence interval for the paired shift from the exact signed-rank test's inversion."""
    d = np.asarray(d, float)
    if d.size == 0:
        return Interval(math.nan, math.nan, math.nan)
    w = np.sort(walsh_averages(d))
    k, actual = _lower_count(d.size, level)
    return Interval(float(w[k]), float(w[w.size - 1 - k]), actual)


def _better(d: np.ndarray, direction: str) -> np.ndarray:
    """d oriented so that positive means the treated condition is better (more similar)."""
    return -d if direction == "lower" else d


def rank_biserial(d, direction: str) -> float:
    """Matched-pairs rank-biserial correlation (R_better - R_worse) / (R_better + R_worse), zeros dropped:
    +1 when every non-zero pair favours the treated condition, -1 when every one favours the control."""
    b = _better(np.asarray(d, float), direction)
    b = b[b != 0]
    if b.size == 0:
        return 0.0 if np.asarray(d).size else math.nan
    r2 = midranks2(np.abs(b))
    return float((r2[b > 0].sum() - r2[b < 0].sum()) / r2.sum())


def superiority(d, direction: str) -> float:
    """The probability that the treated condition beats the control on a random seed (ties count half)."""
    b = _better(np.asarray(d, float), direction)
    return float((np.sum(b > 0) + 0.5 * np.sum(b == 0)) / b.size) if b.size else math.nan


class Effect(NamedTuple):
    hl: float
    ci_low: float
    ci_high: float
    ci_level: float
    rank_biserial: float
    superiority: float


def effect(d, direction: str, level: float = 0.05) -> Effect:
    """Every effect size of one paired comparison (d already snapped); the interval is test_interval's
    at the report's one-sided level (a 90% interval beside 5% tests)."""
    ci = test_interval(d, level)
    return Effect(hodges_lehmann(d), ci.low, ci.high, ci.level, rank_biserial(d, direction), superiority(d, direction))


# ------------------------------------------------------------------ pooled over teacher seeds

def welch_interval(means, variances, sizes, level: float = CI_LEVEL):
    """(estimate, low, high) over the last axis (teacher seeds) of per-seed means, variances (ddof=1)
    and pair counts: the mean of the means with a Welch t interval, variance sum(s_t^2 / n_t) / T^2 and
    Welch-Satterthwaite degrees of freedom.  Vectorised over leading axes (the coverage simulation,
    kdray/analysis/operating.py, runs this very function)."""
    from scipy.stats import t as student_t

    means, variances, sizes = (np.asarray(a, float) for a in (means, variances, sizes))
    v = variances / sizes
    total = v.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        df = total ** 2 / np.sum(v ** 2 / (sizes - 1), axis=-1)
        half = student_t.isf((1 - level) / 2, df) * np.sqrt(total) / means.shape[-1]
    half = np.where(total > 0, half, 0.0)            # no spread at all: the estimate itself
    est = means.mean(axis=-1)
    return est, est - half, est + half


def pooled_interval(groups: Sequence[np.ndarray], level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(estimate, low, high) for the teacher seeds drawn: the mean over teacher seeds of each seed's mean
    paired difference (teacher seeds weigh equally), with welch_interval.  Groups with fewer than two
    pairs are left out; none left: nans.  (It replaces a stratified bootstrap that covered too rarely
    at 5-10 students per teacher; this one's coverage is in docs/statistics.md.)"""
    groups = [np.asarray(g, float) for g in groups if len(g) >= 2]
    if not groups:
        return math.nan, math.nan, math.nan
    est, lo, hi = welch_interval([g.mean() for g in groups], [np.var(g, ddof=1) for g in groups],
                                 [g.size for g in groups], level)
    return float(est), float(lo), float(hi)


def means_t_interval(means, level: float = CI_LEVEL):
    """(estimate, low, high) over the last axis: a t interval on the teacher seeds' means with T - 1
    degrees of freedom (vectorised over leading axes)."""
    from scipy.stats import t as student_t

    means = np.asarray(means, float)
    k = means.shape[-1]
    est = means.mean(axis=-1)
    half = student_t.isf((1 - level) / 2, k - 1) * np.std(means, axis=-1, ddof=1) / math.sqrt(k)
    return est, est - half, est + half


def random_effects_interval(groups: Sequence[np.ndarray], level: float = CI_LEVEL) -> tuple[float, float, float]:
    """(estimate, low, high) "for teachers like these": teacher as a random factor.  The estimate is the
    mean of the teacher seeds' mean differences and the interval means_t_interval on those means (the
    exact interval of the balanced normal random-effects model; the same fixed effect and standard
    error as statsmodels' MixedLM where its between-teacher variance is positive).  Needs at least 3
    teacher seeds with 2 pairs each; otherwise nans."""
    means = np.array([np.mean(g) for g in groups if len(g) >= 2])
    if means.size < 3:
        return math.nan, math.nan, math.nan
    est, lo, hi = means_t_interval(means, level)
    return float(est), float(lo), float(hi)
