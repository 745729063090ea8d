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
from kdray.analysis.pipeline import analyse
from kdray.analysis.stats import wilcoxon_one_sided
from synthetic_runs import as_frame, run

QUICKSTART = Path(__file__).resolve().parents[1] / "search_spaces" / "quickstart.yaml"


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
    # given only the differences of the float32 values (no scale): still the tie-aware p, and the interval
    assert stats.signed_rank_test(f32(x) - f32(y), "greater") == (0.6875, "exact-ties")
    d32 = f32(CONSTRUCTED_X) - f32(CONSTRUCTED_Y)
    assert stats.signed_rank_test(d32, "greater")[0] == pytest.approx(37 / 256)
    assert effects.test_interval(d32).low <= 0
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
    n, half = sizing.seeds_needed(0.5, 1.0), sizing.DRAWS // 2
    assert sizing.signed_rank_power(int(n), 0.5, 1.0, draws=half) >= 0.8 > \
        sizing.signed_rank_power(int(n) - 3, 0.5, 1.0, draws=half)
    # beyond 50 pairs: the t test's count over the ARE 3/pi, by hand: ((1.96 + 0.8416) / 0.3)^2 * pi / 3 = 91.3
    assert sizing.seeds_needed(0.3, 1.0, two_sided=True) == 92
    assert 0.75 < sizing.signed_rank_power(92, 0.3, 1.0, two_sided=True) < 0.85


# ------------------------------------------------------------------ 4. equivalence (TOST) and the verdicts

def null_runs(n_seeds: int, noise: float, seed: int = 0):
    """A planted null: SIDDO, RCD and KD drawn from one distribution (per-seed noise sd ``noise`` on every
    functional metric, rates as counts of 3600)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n_seeds):
        for method, extra in (("siddo", {}), ("rcd", dict(alpha=0.5)), ("kd", dict(alpha=0.5))):
            m = dict(activation_distance=0.3 + rng.normal(0, noise), js_divergence=0.05 + rng.normal(0, noise / 2),
                     rank_disagreement=0.2 + rng.normal(0, noise),
                     prediction_disagreement=round(3600 * (0.15 + rng.normal(0, noise))) / 3600,
                     correct_agreement=0.9, incorrect_agreement=0.3, test_acc=0.8 + (method == "siddo") / 100,
                     test_loss=0.7)
            out.append(run("n", method, 0, s, metrics=m, **extra))
    return out


def test_a_planted_null_gets_the_tost_verdict():
    """12 seeds, noise well inside the SESOI: every functional comparison's TOST p (checked by enumerating
    both one-sided tests at +-SESOI) is below 0.05, and the decision says no transfer larger than the SESOI."""
    from kdray.analysis import sizing
    from kdray.audit import answer_lines

    frame = as_frame(null_runs(12, 0.002))
    a = analyse(frame, power_draws=0)
    t = a.tests[a.tests["metric"].isin(["activation_distance", "js_divergence", "rank_disagreement",
                                        "prediction_disagreement"])]
    for r in t.itertuples():
        students = a.students
        x = students[students["condition"] == r.condition].sort_values("student_seed")[r.metric].to_numpy()
        y = students[students["condition"] == r.control].sort_values("student_seed")[r.metric].to_numpy()
        s = sizing.SESOI[r.metric]
        want = max(brute(x - y + s, "greater"), brute(x - y - s, "less"))
        assert r.p_tost == pytest.approx(want) and r.p_tost <= 0.05 and r.equivalent
        assert r.verdict == "no transfer larger than the SESOI shown"
        assert -s < r.ci_low and r.ci_high < s                             # the 90% interval inside +-SESOI
    d = a.decisions.iloc[0]
    assert not d.supported and d.verdict == "no transfer larger than the SESOI shown" and d.n_equivalent == 4
    assert "KD α=0.5: no transfer larger than the SESOI shown" in "\n".join(answer_lines(a))


def test_a_small_noisy_null_is_inconclusive_and_a_large_sesoi_changes_that():
    frame = as_frame(null_runs(6, 0.03, seed=1))
    a = analyse(frame, power_draws=0)
    d = a.decisions.iloc[0]
    assert not d.supported and d.verdict == "inconclusive"
    assert "KD α=0.5: inconclusive" in "\n".join(__import__("kdray.audit", fromlist=["x"]).answer_lines(a))
    wide = dict(activation_distance=1.0, js_divergence=1.0, rank_disagreement=1.0, prediction_disagreement=1.0)
    assert analyse(frame, power_draws=0, sesoi=wide).decisions.iloc[0].verdict == "no transfer larger than the SESOI shown"


def test_tost_agrees_with_the_interval_on_random_data():
    """Equivalence is shown when the 90% interval of the two inverted one-sided tests lies inside (-S, S);
    then both one-sided tests at -S and +S reject, by enumeration."""
    rng = np.random.default_rng(9)
    tie = stats.Tie(None, effects.TIE_RTOL)
    agree = 0
    for it in range(300):
        d = random_differences(rng, int(rng.integers(5, 16)), it % 3)
        s = float(rng.choice([0.5, 1.0, 2.0])) * (1 / 360 if it % 3 == 0 else 1.0)
        iv = effects.test_interval(d)
        shown = -s < iv.low and iv.high < s
        if shown:            # the interval inside +-S implies both one-sided tests at +-S reject (brute force)
            assert max(brute(effects.snap_ties(d + s), "greater"), brute(effects.snap_ties(d - s), "less")) <= 0.05
            assert stats.tost_p(d, s, tie) <= 0.05
        agree += shown
    assert agree >= 10


def test_bad_sesoi_is_one_line(capsys):
    from kdray.cli import main

    assert main(["report", "nope", "--sesoi", "prediction_disagreement=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdray: error: --sesoi 'prediction_disagreement=-1': expected METRIC=VALUE") and "\n" not in err


# ------------------------------------------------------------------ 3. power at a stated effect, not the observed one

def test_power_uses_the_pilots_noise_not_its_effect():
    """Two pilots with the same noise and different observed effects get the same power, bit for bit."""
    from kdray.analysis import power

    noise = np.random.default_rng(2).normal(0, 0.01, (2, 4, 8))
    shift = np.array([0.014, 0.01, 0.01, 0.0069])
    for n in (5, 10, 20):
        assert power.power_at(noise, n, shift, draws=300) == power.power_at(noise + 0.05, n, shift, draws=300) \
            == power.power_at(noise - 0.02, n, shift, draws=300)


def test_a_null_pilot_is_not_labelled_under_powered_and_its_power_is_at_the_sesoi():
    """A non-significant pilot with no effect: no "under-powered" label anywhere; its power is the power
    to detect the SESOI with its noise, checked against a direct simulation with scipy and statsmodels."""
    from scipy.stats import wilcoxon
    from statsmodels.stats.multitest import multipletests

    from kdray.analysis import sizing, tables

    a = analyse(as_frame(null_runs(8, 0.01, seed=3)), power_draws=400)
    d = a.decisions.iloc[0]
    assert not d.supported and "under_powered" not in a.decisions
    assert "under-powered" not in tables.decision_table(a).markdown()
    # direct simulation: 8 seeds, each metric's noise sd as the pilot's, mean SESOI, metrics independent here
    pilot = a.students.sort_values("student_seed")
    rng = np.random.default_rng(0)
    metrics = ["activation_distance", "rank_disagreement", "prediction_disagreement", "js_divergence"]
    sd = {}
    for m in metrics:
        kd = pilot[pilot["condition"] == d.condition][m].to_numpy()
        sd[m] = [np.std(kd - pilot[pilot["condition"] == c][m].to_numpy(), ddof=1)
                 for c in set(pilot["condition"]) if c != d.condition]
    assert 0 <= d.power_low <= d.power <= d.power_high <= 1
    # the noise of the two controls' differences shares KD's noise, so simulate the pair jointly per metric
    wins = 0
    for _ in range(300):
        ok = []
        for c in range(2):
            ps = [wilcoxon(rng.normal(sizing.SESOI[m], sd[m][c], 8), alternative="greater", method="exact").pvalue
                  for m in metrics]
            ok.append(multipletests(ps, method="fdr_bh")[0])
        wins += (np.all(ok, axis=0).sum() >= 3)
    indep = wins / 300               # independent metrics and controls: a rough reference only
    assert abs(d.power - indep) < 0.3


# ------------------------------------------------------------------ 5. the decision rule as a test, and a family of decisions

def test_p_decision_matches_the_rule_and_holm_over_a_setup_is_statsmodels(holm_without_gc):
    from statsmodels.stats.multitest import multipletests

    from synthetic_runs import planted_runs

    frame = as_frame(planted_runs())
    a = analyse(frame, power_draws=0)
    d = a.decisions
    assert ((d["p_decision"] <= 0.05) == d["supported"]).all()          # supported <=> its own p <= level
    h = analyse(frame, power_draws=0, decision_correction="holm").decisions
    for setup, g in d.groupby("setup"):
        want = multipletests(g["p_decision"].to_numpy(), method="holm")[1]
        got = h[h["setup"] == setup]["p_decision_adj"].to_numpy()
        np.testing.assert_allclose(got, want, rtol=1e-12)
        assert ((got <= 0.05) == h[h["setup"] == setup]["supported"].to_numpy()).all()


# ------------------------------------------------------------------ 6. the pooled statements

def test_random_effects_interval_is_mixedlms():
    """Balanced teachers with a clear between-teacher spread: the t interval on teacher means has
    statsmodels MixedLM's (REML) fixed intercept and standard error, with T - 1 degrees of freedom."""
    import pandas as pd
    import statsmodels.formula.api as smf
    from scipy.stats import t

    rng = np.random.default_rng(6)
    groups = [rng.normal(mu, 1, 8) for mu in (0.0, 2.0, -1.0, 1.5)]
    est, lo, hi = effects.random_effects_interval(groups)
    df = pd.DataFrame(dict(y=np.concatenate(groups), teacher=np.repeat(range(4), 8)))
    fit = smf.mixedlm("y ~ 1", df, groups=df["teacher"]).fit(reml=True)
    assert est == pytest.approx(fit.fe_params["Intercept"], rel=1e-6)
    assert (hi - est) == pytest.approx(t.ppf(0.975, 3) * fit.bse_fe["Intercept"], rel=1e-4)
    assert np.isnan(effects.random_effects_interval(groups[:2])[1])


def test_pooled_coverage_is_within_094_096():
    """The pooled intervals' coverage by simulation (kdray/analysis/operating.py), 5-10 students per teacher."""
    from kdray.analysis import operating

    for teachers in (2, 3, 5):
        for n in (5, 10):
            drawn, like = operating.pooled_coverage(teachers, n, reps=8000, seed=1)
            assert 0.94 <= drawn <= 0.96, (teachers, n, drawn)
            if teachers >= 3:
                assert 0.94 <= like <= 0.96, (teachers, n, like)


def test_plan_and_audit_recommend_seeds_from_a_pilot(planted_mlflow, tmp_path, capsys):
    """Before anything trains: a finished pilot's noise sizes the study at the SESOI (kdray plan/audit --pilot)."""
    from kdray.cli import main

    _, uri = planted_mlflow
    assert main(["plan", str(QUICKSTART), "--pilot", "small", "--tracking-uri", uri]) == 0
    out = capsys.readouterr().out
    assert "seeds from pilot 'small'" in out and "their noise only" in out
    assert "broken: student seeds for 80% power at the SESOI on every teacher seed" in out
    assert main(["plan", str(QUICKSTART), "--pilot", "nope", "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kdray: error: no MLflow experiment 'nope'") and "\n" not in err
    assert main(["audit", "--dataset", "digits", "--teacher", "small_cnn", "--storage", str(tmp_path / "r"),
                 "--tracking-uri", uri, "--pilot", "small", "--sesoi", "prediction_disagreement=0.02",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# seeds from pilot 'small'" in out and "prediction_disagreement 0.02" in out
    assert not (tmp_path / "r").exists()


def test_no_significant_row_of_a_report_shows_an_interval_covering_0():
    """Every significant row of the planted sweep's tests (adjusted p for the functional metrics, raw for
    accuracy and loss) has its interval on the favourable side of 0."""
    from synthetic_runs import planted_runs

    a = analyse(as_frame(planted_runs()), power_draws=0)
    sig = a.tests[a.tests["significant"].astype(bool)]
    assert len(sig) > 20
    for r in sig.itertuples():
        assert (r.ci_high < 0) if stats.direction(r.metric) == "lower" else (r.ci_low > 0), r


def test_report_options_name_the_decision_family_and_use_the_sesoi(planted_mlflow, tmp_path, capsys):
    import pandas as pd

    from kdray.cli import main

    _, uri = planted_mlflow
    assert main(["report", "small", "--tracking-uri", uri, "--out", str(tmp_path / "h"), "--jobs", "1",
                 "--decision-correction", "holm", "--sesoi", "prediction_disagreement=0.05"]) == 0
    out = capsys.readouterr().out
    assert "decisions: Holm (family-wise error rate) over the decisions of each setup" in out and "broken 1)" in out
    t = pd.read_csv(tmp_path / "h" / "data" / "tests.csv")
    assert set(t.loc[t["metric"] == "prediction_disagreement", "sesoi"]) == {0.05}
    d = pd.read_csv(tmp_path / "h" / "data" / "decisions.csv")
    assert {"p_decision", "p_decision_adj", "supported_uncorrected", "verdict"} <= set(d.columns)
    with pytest.raises(SystemExit) as e:          # argparse's choices: its usage line and exit 2
        main(["report", "small", "--tracking-uri", uri, "--decision-correction", "sidak"])
    assert e.value.code == 2
