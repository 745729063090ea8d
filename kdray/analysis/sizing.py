"""Smallest effects of interest (SESOI) and the power of one signed-rank test at a stated effect.

A pure module below stats: it knows metric names, numbers and the signed-rank
null, nothing about runs.  Power here is never computed at an observed effect
(that is a function of the p-value, Hoenig & Heisey 2001): the effect is the
SESOI the user states, and a pilot supplies only the noise (the standard
deviation of per-seed differences).

Default SESOIs, in each metric's own units, are 1% of the metric's range:
the change if one test input in a hundred went from the teacher's own output
to the most different one.  For prediction (dis)agreement and the rank
disagreement (rates in [0, 1]) that is 0.01, the protocol's marginal threshold
for the prediction-agreement gain; activation distance (L2 between softmax
vectors) ranges over [0, sqrt 2]: 0.014; Jensen-Shannon divergence (nats)
over [0, ln 2]: 0.0069.  Correct/incorrect agreement and their asymmetry
(Δincorrect - Δcorrect) are rates: 0.01.  Test accuracy 0.01 (one point);
test loss 0.01 nats.  ``--sesoi METRIC=VALUE`` overrides any of them.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import numpy as np

from kdray.analysis import corrections
from kdray.analysis.effects import EXACT_MAX_N, rank_sum_counts

SESOI = {
    "prediction_disagreement": 0.01, "prediction_agreement": 0.01, "rank_disagreement": 0.01,
    "activation_distance": round(0.01 * math.sqrt(2), 4), "js_divergence": round(0.01 * math.log(2), 4),
    "correct_agreement": 0.01, "incorrect_agreement": 0.01, "asymmetry": 0.01,
    "test_acc": 0.01, "test_loss": 0.01,
}
TARGET = 0.8                        # the power a plan asks for
MAX_SEEDS = 200                     # seeds searched for a target power
DRAWS = 4000                        # simulated studies per power value (Monte Carlo sd <= 0.008)
SEED = 0


def parse_sesoi(items) -> dict[str, float]:
    """``["prediction_disagreement=0.02", ...]`` -> SESOI with those replaced; ValueError on a bad item."""
    out = dict(SESOI)
    for item in items or ():
        name, sep, value = str(item).partition("=")
        try:
            v = float(value)
        except ValueError:
            v = math.nan
        if not sep or name not in SESOI or not v > 0 or not math.isfinite(v):
            raise ValueError(f"--sesoi {item!r}: expected METRIC=VALUE with VALUE > 0 and METRIC one of "
                             f"{', '.join(SESOI)}")
        out[name] = v
    return out


def exact_greater_p(x: np.ndarray) -> np.ndarray:
    """One-sided (greater) signed-rank p along the last axis of continuous x (no ties, no zeros),
    exact up to EXACT_MAX_N pairs, normal approximation above."""
    return _greater_p_from_w(_w_plus_minus(x)[0], x.shape[-1])


def _w_plus_minus(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W+ of x and of -x along the last axis from one sort of |x| (which is |-x|: the same order)."""
    s = np.take_along_axis(x, np.argsort(np.abs(x), axis=-1), axis=-1)   # the i-th smallest |x| has rank i + 1
    ranks = np.arange(1, x.shape[-1] + 1)
    return (s > 0) @ ranks, (s < 0) @ ranks


@functools.lru_cache(maxsize=None)
def _untied_sf(n: int) -> np.ndarray:
    """P(W+ >= s) for s = 0 .. n(n+1)/2 under the signed-rank null of n untied pairs."""
    return np.cumsum(rank_sum_counts(np.arange(1, n + 1))[::-1])[::-1] / 2.0 ** n


@functools.lru_cache(maxsize=4096)
def _power(n: int, ratio: float, level: float, two_sided: bool, draws: int, seed: int) -> float:
    rng = np.random.default_rng([seed, n, abs(int(ratio * 1e6)), ratio < 0])
    x = rng.standard_normal((draws, n)) + ratio
    if two_sided:
        plus, minus = _w_plus_minus(x)
        p = np.minimum(1.0, 2 * np.minimum(_greater_p_from_w(plus, n), _greater_p_from_w(minus, n)))
    else:
        p = exact_greater_p(x)
    return float(np.mean(p <= level))


def signed_rank_power(n: int, shift: float, sd: float, level: float = 0.05, two_sided: bool = False,
                      draws: int = DRAWS, seed: int = SEED) -> float:
    """The probability that the exact signed-rank test on n normal differences of mean ``shift`` and
    standard deviation ``sd`` rejects at level (one-sided towards the shift, or two-sided), by
    simulation with a fixed seed.  Only shift / sd matters; it is rounded to 3 significant digits."""
    if n < 1 or not math.isfinite(sd) or not math.isfinite(shift):
        return math.nan
    if sd <= 0:
        return 1.0 if shift > 0 and 2.0 ** -n * (2 if two_sided else 1) <= level else 0.0
    ratio = float(f"{shift / sd:.3g}")
    return _power(int(n), ratio, float(level), bool(two_sided), int(draws), int(seed))


def seeds_needed(shift: float, sd: float, level: float = 0.05, two_sided: bool = False,
                 target: float = TARGET, most: int = MAX_SEEDS, draws: int = DRAWS // 2) -> float:
    """The pairs whose signed_rank_power reaches target: by bisection over 1..EXACT_MAX_N on the simulated
    exact test (the power grows with n, up to the exact test's small saw-tooth); beyond that the
    large-sample count for a normal shift, the t test's ((z_level + z_target) sd / shift)^2 divided
    by the signed-rank test's asymptotic relative efficiency 3/pi; nan beyond ``most``."""
    def ok(n: int) -> bool:
        return signed_rank_power(n, shift, sd, level, two_sided, draws) >= target

    if not (shift > 0 and math.isfinite(sd)):
        return math.nan
    if not ok(EXACT_MAX_N):
        from scipy.stats import norm

        z = norm.isf(level / 2 if two_sided else level) + norm.ppf(target)
        n = math.ceil((z * sd / shift) ** 2 * math.pi / 3)
        return float(n) if EXACT_MAX_N < n <= most else float(EXACT_MAX_N + 1) if n <= most else math.nan
    lo, hi = 1, EXACT_MAX_N
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return float(hi)


def sd_interval(sd: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """The chi-square confidence interval of a normal standard deviation estimated from n values:
    the uncertainty a pilot's noise estimate carries into every planned seed count."""
    if n < 2 or not math.isfinite(sd):
        return math.nan, math.nan
    from scipy.stats import chi2

    a = (1 - level) / 2
    return sd * math.sqrt((n - 1) / chi2.isf(a, n - 1)), sd * math.sqrt((n - 1) / chi2.ppf(a, n - 1))


def pilot_sd(d) -> Optional[float]:
    """The standard deviation (ddof=1) of a pilot's per-seed differences, nan below two of them."""
    d = np.asarray(d, float)
    d = d[~np.isnan(d)]
    return float(np.std(d, ddof=1)) if d.size >= 2 else math.nan


def w_plus_prefixes(x: np.ndarray) -> np.ndarray:
    """W+ of the first n values along the last axis, for every n = 1 .. N (continuous x: no ties, no
    zeros).  W+ is the number of Walsh averages (x_i + x_j) / 2, i <= j, above 0 (Tukey's identity:
    the same sum of the ranks of the positive |x|), so adding value j adds #{i <= j: x_i + x_j > 0};
    one pass gives every prefix, where ranking each prefix would sort N times.  The seeds are put
    first so each step's count runs down whole rows (a short last-axis sum is several times slower);
    x_i > -x_j is x_i + x_j > 0 (a float sum's sign is its exact sum's) without the sum, and a step's
    count fits a byte below 256 seeds."""
    n = x.shape[-1]
    xs = np.ascontiguousarray(np.moveaxis(x, -1, 0)).reshape(n, -1)      # (seeds, everything else)
    neg = -xs
    out = np.empty(xs.shape, np.int64)
    acc = np.zeros(xs.shape[1], np.int64)
    count = np.uint8 if n < 256 else np.int64
    for j in range(n):
        acc += np.add.reduce(np.greater(xs[:j + 1], neg[j]).view(np.uint8), axis=0, dtype=count)
        out[j] = acc
    return np.moveaxis(out.reshape((n,) + x.shape[:-1]), 0, -1)


def _greater_p_from_w(w: np.ndarray, n: int) -> np.ndarray:
    """exact_greater_p's answer from W+ of n continuous pairs."""
    if n > EXACT_MAX_N:
        from scipy.stats import norm

        return norm.sf((w - n * (n + 1) / 4) / math.sqrt(n * (n + 1) * (2 * n + 1) / 24))
    return _untied_sf(n)[w]


def support_curve(cov: np.ndarray, shift, ns, controls: int, metrics: int, correction: str = "bh",
                  level: float = 0.05, draws: int = 1000, seed: int = SEED, min_metrics: int = 3,
                  scale: float = 1.0, top: int = 0) -> dict[int, float]:
    """support_rate at every n of ``ns`` from one set of simulated studies of max(ns, top) seeds, each
    n deciding on the first n of them (common random numbers: one draw and one pass of
    w_plus_prefixes instead of a draw and a sort per n; ``top`` > max(ns) gives a few ns the draws of
    a longer curve).  For a single n the draws are support_rate's own, so
    ``support_curve(..., [n])[n] == support_rate(..., n)``."""
    return support_curves(cov, shift, {scale: ns}, controls, metrics, correction, level, draws, seed, min_metrics,
                          top)[scale]


def support_curves(cov: np.ndarray, shift, plan: dict, controls: int, metrics: int, correction: str = "bh",
                   level: float = 0.05, draws: int = 1000, seed: int = SEED, min_metrics: int = 3,
                   top: int = 0) -> dict[float, dict[int, float]]:
    """support_curve for several noise scales ({scale: ns}) on the same standard normal draws (made once)."""
    plan = {scale: sorted({int(n) for n in ns}) for scale, ns in plan.items()}
    top = max(max(ns[-1] for ns in plan.values()), int(top))
    c, m = controls, metrics
    w, v = np.linalg.eigh(np.asarray(cov, float))
    root = v * np.sqrt(np.clip(w, 0, None))                     # root @ root.T == cov
    z = _standard_normals(seed, draws, top, c * m) @ root.T
    mean = np.tile(np.broadcast_to(np.asarray(shift, float), (m,)), c)
    out = {}
    for scale, ns in plan.items():
        x = (z[:, :ns[-1]] * scale + mean).reshape(draws, ns[-1], c, m).transpose(2, 0, 3, 1)  # (c, draws, m, seeds)
        wp = w_plus_prefixes(x)
        p = np.stack([_greater_p_from_w(wp[..., n - 1], n) for n in ns])   # (ns, controls, draws, metrics)
        sig = corrections.rejected(p, correction, level).all(axis=1)        # every control, per study
        rates = np.mean(sig.sum(axis=-1) >= min_metrics, axis=-1)
        out[scale] = {n: float(r) for n, r in zip(ns, rates)}
    return out


@functools.lru_cache(maxsize=8)
def _standard_normals(seed: int, draws: int, top: int, k: int) -> np.ndarray:
    """support_curves' standard normal studies, drawn once per shape (a setup's curves share them)."""
    z = np.random.default_rng([seed, top]).standard_normal((draws, top, k))
    z.flags.writeable = False
    return z


def support_rate(cov: np.ndarray, shift, n: int, controls: int, metrics: int, correction: str = "bh",
                 level: float = 0.05, draws: int = 1000, seed: int = SEED, min_metrics: int = 3,
                 scale: float = 1.0) -> float:
    """The fraction of simulated studies of n seeds in which transfer is supported, decided as the report
    decides (exact one-sided test per metric and control, the correction over each control's metrics,
    significant against every control, at least min_metrics metrics).

    Each seed's differences over (control, metric), control-major, are normal with covariance
    ``scale``^2 ``cov`` and mean ``shift`` (one value per metric, or one for all; positive favours the
    treated condition).  Fixed seed: reproducible."""
    return support_curve(cov, shift, [n], controls, metrics, correction, level, draws, seed, min_metrics, scale)[int(n)]
