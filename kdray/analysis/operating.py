"""Operating characteristics, by simulation: the numbers docs/statistics.md states about the decision
rule and the pooled intervals, with fixed seeds, so tests/test_docs_statistics.py regenerates them.

- ``decision_rates``: P(supported) of the report's rule ("significant on >= 3 of 4 functional metrics
  against both controls, the correction within each comparison") under the global null and under
  stated effect patterns, at n student seeds.  The model: per seed, each condition's four metrics
  are normal with unit variance and correlation ``rho`` between metrics; the treated condition's
  differences against SIDDO and RCD therefore share its noise (correlation 1/2 between controls).
  Effects are in units of one condition's per-seed standard deviation.
- ``pooled_coverage``: how often the pooled intervals cover what they claim to, with T teacher seeds
  of n students: effects.welch_interval for the mean over the teacher seeds drawn (heteroscedastic
  teachers), effects.means_t_interval for the mean over teachers like these (teacher means drawn
  from a normal between-teacher distribution).

``python -m kdray.analysis.operating`` prints both tables.
"""
from __future__ import annotations

import numpy as np

from kdray.analysis import effects, sizing

PATTERNS = {                           # name -> effect per functional metric, in per-seed sd units
    "global null": (0.0, 0.0, 0.0, 0.0),
    "all four +0.5": (0.5, 0.5, 0.5, 0.5),
    "three of four +0.5": (0.5, 0.5, 0.5, 0.0),
    "all four +1": (1.0, 1.0, 1.0, 1.0),
}
SEEDS = (5, 10, 20)
RHO = 0.5
DRAWS = 20000


def null_cov(rho: float = RHO, controls: int = 2, metrics: int = 4) -> np.ndarray:
    """Covariance of the treated-minus-control differences over (control, metric), control-major: each
    condition's metrics have unit variance and correlation rho; the treated condition's noise is shared."""
    sigma = np.full((metrics, metrics), rho) + (1 - rho) * np.eye(metrics)
    return np.kron(np.ones((controls, controls)) + np.eye(controls), sigma)


def decision_rates(patterns=PATTERNS, seeds=SEEDS, rho: float = RHO, correction: str = "bh",
                   draws: int = DRAWS, level: float = 0.05) -> dict[tuple[str, int], float]:
    """(pattern, n) -> P(supported) by sizing.support_rate (the report's own decision, vectorised)."""
    cov = null_cov(rho)
    return {(name, n): sizing.support_rate(cov, np.array(shift), n, 2, 4, correction, level, draws)
            for name, shift in patterns.items() for n in seeds}


def pooled_coverage(teachers: int, n: int, reps: int = 20000, seed: int = 0,
                    level: float = effects.CI_LEVEL) -> tuple[float, float]:
    """(coverage of the Welch interval for the teacher seeds drawn, coverage of the random-effects t
    interval for teachers like these), T = ``teachers`` teacher seeds of n students each.

    Drawn teachers: fixed means 0, 1, -0.5, ... and standard deviations 1, 2, 0.5, ... (unequal on
    purpose).  Teachers like these: means from N(0, 1), students' sd 1."""
    rng = np.random.default_rng([seed, teachers, n])
    mu = np.resize([0.0, 1.0, -0.5, 0.3, 0.8], teachers)
    sd = np.resize([1.0, 2.0, 0.5, 1.5, 1.0], teachers)
    x = rng.standard_normal((reps, teachers, n)) * sd[:, None] + mu[:, None]
    _, lo, hi = effects.welch_interval(x.mean(-1), x.var(-1, ddof=1), np.full(teachers, n), level)
    drawn = float(np.mean((lo <= mu.mean()) & (mu.mean() <= hi)))
    like = rng.standard_normal((reps, teachers, 1)) + rng.standard_normal((reps, teachers, n))
    _, lo, hi = effects.means_t_interval(like.mean(-1), level)
    return drawn, float(np.mean((lo <= 0) & (0 <= hi)))


def main() -> None:
    rates = decision_rates()
    print("| effect pattern | " + " | ".join(f"n = {n}" for n in SEEDS) + " |")
    print("|---|" + "---|" * len(SEEDS))
    for name in PATTERNS:
        print(f"| {name} | " + " | ".join(f"{rates[(name, n)]:.4f}" for n in SEEDS) + " |")
    print()
    print("| teacher seeds | students each | drawn teachers (Welch) | teachers like these (t on means) |")
    print("|---|---|---|---|")
    for t in (2, 3, 5):
        for n in (5, 6, 8, 10):
            drawn, like = pooled_coverage(t, n)
            print(f"| {t} | {n} | {drawn:.3f} | {like:.3f} |" if t >= 3 else f"| {t} | {n} | {drawn:.3f} | n/a |")


if __name__ == "__main__":
    main()
