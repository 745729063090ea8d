"""The statistics of docs/protocol.md §5 on planted MLflow sweeps, checked against scipy/statsmodels."""
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon
from statsmodels.stats.multitest import multipletests

from kdray.analysis import stats
from kdray.analysis.runs import load_runs
from kdray.analysis.pipeline import analyse
from kdray.analysis.stats import Condition, _exact_signed_rank, significance_warning, wilcoxon_one_sided
from synthetic_runs import SEEDS, as_frame, planted_runs, rate, run, write_experiment

KD09, KD01, KD05 = Condition.of("kd", alpha=0.9), Condition.of("kd", alpha=0.1), Condition.of("kd", alpha=0.5)
SIDDO, RCD05 = Condition.of("siddo"), Condition.of("rcd", alpha=0.5)


@pytest.fixture(scope="module")
def planted(planted_mlflow):
    _, uri = planted_mlflow
    df = load_runs(uri, "planted")
    return planted_runs(), df, analyse(df)


def of(frame, cond, col="condition"):
    """Boolean mask of rows whose condition (a tuple) equals cond."""
    return np.array([c == cond for c in frame[col]], bool)


def scipy_p(x, y, alternative):
    """What scipy says directly; all-zero differences are the one case the protocol defines itself."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.all(x == y):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(wilcoxon(x, y, alternative=alternative).pvalue)


def frame_pairs(students, setup, ts, cond, ctrl, metric):
    """Independent pairing for the checks: a pandas merge on student_seed."""
    def pick(c):
        s = students[(students["setup"] == setup) & (students["teacher_seed"] == ts)]
        return s[of(s, c)][["student_seed", metric]]
    m = pick(cond).merge(pick(ctrl), on="student_seed").dropna()
    return m.iloc[:, 1].to_numpy(), m.iloc[:, 2].to_numpy()


# ------------------------------------------------------------------ loading

def test_load_runs_types_and_contents(planted):
    runs, df, _ = planted
    assert len(df) == len(runs)
    # Runs logged without the condition tag: params come back typed from their legacy string params.
    kd = df[df["method"] == "kd"]
    assert all(type(p["alpha"]) is float and type(p["temperature"]) is float for p in kd["params"])
    assert all(p == {} for p in df.loc[df["method"].isin(["siddo", "teacher"]), "params"])
    assert df["width"].dtype == float
    assert str(df["student_seed"].dtype) == "Int64" and str(df["teacher_seed"].dtype) == "Int64"
    assert df.loc[df["role"] == "teacher", "student_seed"].isna().all()
    failed = df[df["status"] == "FAILED"]
    assert list(failed["failure"]) == ["RuntimeError: CUDA out of memory"]
    assert {"tha_count_a", "activation_distance", "test_acc"} <= set(df.columns)
    r = df[(df["setup"] == "errors") & (df["method"] == "kd") & np.array([p.get("alpha") == 0.9 for p in df["params"]])
           & (df["teacher_seed"] == 1) & (df["student_seed"] == 13)].iloc[0]
    planted_run = next(x for x in runs if x["trial_key"] == r["trial_key"])
    assert r["incorrect_agreement"] == pytest.approx(planted_run["metrics"]["incorrect_agreement"])


# ------------------------------------------------------------------ primitive statistics

@pytest.mark.parametrize("direction,alternative", [("lower", "less"), ("higher", "greater")])
def test_wilcoxon_one_sided_is_scipys(direction, alternative):
    rng = np.random.default_rng(3)
    for n in (5, 10, 30):
        kd, ctrl = rng.normal(0, 1, n), rng.normal(0.3, 1, n)
        p = wilcoxon_one_sided(kd, ctrl, direction)
        assert p == pytest.approx(wilcoxon(kd, ctrl, alternative=alternative, method="exact").pvalue, rel=1e-12)
    kd, ctrl = rng.normal(0, 1, 10), rng.normal(1, 1, 10)             # KD clearly lower
    assert wilcoxon_one_sided(kd, ctrl, "lower") < 0.05 < wilcoxon_one_sided(kd, ctrl, "higher")


def test_exact_signed_rank_equals_scipy_bit_for_bit():
    """kdray's own exact null distribution (scipy's per-call overhead dominated reports) vs scipy."""
    rng = np.random.default_rng(11)
    for n in (1, 2, 3, 7, 10, 13, 14, 25, 50):
        for shift in (-1.0, 0.0, 0.4, 3.0):
            d = rng.normal(shift, 1, n)
            for alt in ("less", "greater", "two-sided"):
                assert _exact_signed_rank(d, alt) == wilcoxon(d, alternative=alt, method="exact").pvalue, (n, shift, alt)


def brute_force_p(d, alternative):
    """Every one of the 2^n sign patterns of |d| (zeros dropped), mid-ranks by scipy.stats.rankdata."""
    from itertools import product

    from scipy.stats import rankdata

    d = np.asarray(d, float)
    d = d[d != 0]
    r = rankdata(np.abs(d))
    obs = r[d > 0].sum()
    null = np.array([sum(ri for ri, s in zip(r, signs) if s) for signs in product((0, 1), repeat=d.size)])
    less, greater = np.mean(null <= obs), np.mean(null >= obs)
    return {"less": less, "greater": greater}.get(alternative, min(1.0, 2 * min(less, greater)))


def test_wilcoxon_with_ties_and_zeros_is_scipys():
    """Up to 13 pairs scipy enumerates tied sign patterns too; above, kdray stays exact (to 50 pairs),
    checked against brute-force enumeration."""
    rng = np.random.default_rng(4)
    for n in (4, 9, 13, 16):
        kd = rng.integers(0, 4, n) / 8
        ctrl = rng.integers(0, 4, n) / 8
        if np.all(kd == ctrl):
            continue
        for direction, alt in (("lower", "less"), ("higher", "greater")):
            p = wilcoxon_one_sided(kd, ctrl, direction)
            assert p == pytest.approx(brute_force_p(kd - ctrl, alt), rel=1e-12)
            if n <= 13:
                assert p == pytest.approx(scipy_p(kd, ctrl, alt), rel=1e-12)


def test_all_zero_differences_give_one_and_empty_gives_nan():
    x = np.array([0.5, 0.25, 0.125])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                 # no RuntimeWarning either
        assert wilcoxon_one_sided(x, x, "lower") == 1.0
        assert wilcoxon_one_sided(x, x, "higher") == 1.0
        assert stats.wilcoxon_two_sided(np.zeros(10)) == 1.0
    assert math.isnan(wilcoxon_one_sided([], [], "lower"))


def test_min_p_and_significance_warning():
    assert stats.min_wilcoxon_p(4) == 0.0625
    # Honest: with 4 pairs, scipy's best one-sided p really is 2^-4 > 0.05.
    assert wilcoxon([1, 2, 3, 4], alternative="greater").pvalue == pytest.approx(0.0625)
    w = significance_warning(4)
    assert w and "0.0625" in w and "5 student seeds" in w
    assert significance_warning(10) is None
    assert significance_warning(5) is None                            # 2^-5 = 0.03125 <= 0.05
    assert significance_warning(5, level=0.01) is not None
    assert significance_warning(0)


def test_mean_sem():
    x = [0.1, 0.4, 0.2, np.nan]
    m, s, n = stats.mean_sem(x)
    assert (m, n) == (pytest.approx(np.mean(x[:3])), 3)
    assert s == pytest.approx(np.std(x[:3], ddof=1) / np.sqrt(3))
    assert math.isnan(stats.mean_sem([1.0])[1])


# ------------------------------------------------------------------ every test in the table

def test_every_p_value_matches_scipy_and_statsmodels(planted):
    _, _, a = planted
    assert len(a.tests) > 50
    for r in a.tests.itertuples():
        x, y = frame_pairs(a.students, r.setup, r.teacher_seed, r.condition, r.control, r.metric)
        assert r.n == len(x)
        alt = {"lower": "less", "higher": "greater"}[stats.direction(r.metric)]
        assert r.p == pytest.approx(scipy_p(x, y, alt), rel=1e-12), r
    fam = a.tests[a.tests["family"] == "bh"]
    n_fam = 0
    for _, g in fam.groupby(["setup", "teacher_seed", fam["condition"].map(repr), fam["control"].map(repr)]):
        assert sorted(g["metric"]) == sorted(stats.TRANSFER_METRICS)
        reject, adj, _, _ = multipletests(g["p"].to_numpy(), alpha=0.05, method="fdr_bh")
        np.testing.assert_allclose(g["p_adj"].to_numpy(), adj, rtol=1e-12)
        assert list(g["significant"]) == list(reject)
        n_fam += 1
    assert n_fam == len(fam) // 4
    plain = a.tests[a.tests["family"] != "bh"]
    assert set(plain["metric"]) == {"test_acc", "test_loss"}
    assert (plain["p_adj"] == plain["p"]).all() and (plain["significant"] == (plain["p"] <= 0.05)).all()


# ------------------------------------------------------------------ planted cases

def decision(a, setup, ts, cond):
    d = a.decisions
    rows = d[(d["setup"] == setup) & (d["teacher_seed"] == ts) & of(d, cond)]
    assert len(rows) == 1
    return rows.iloc[0]


def test_a_copying_errors_is_supported_and_negatively_asymmetric(planted):
    _, _, a = planted
    for ts in (0, 1, 2):
        r = decision(a, "errors", ts, KD09)
        assert r.supported and r.asymmetry == "negative"
        assert r.best_control == Condition.of("rcd", alpha=0.1)                # highest mean test accuracy
        assert r.delta_correct == 0.0 and r.delta_incorrect == pytest.approx(0.15, abs=0.005)
        assert r.p_asymmetry == pytest.approx(2 ** -9)                 # 10 positive differences, two-sided
        assert r.marginal == (ts == 1)                                 # PA gain 0.005 < 0.01 only at t1
    assert decision(a, "errors", 2, KD09).n_significant == 3           # no activation-distance gain at t2
    ag = a.against
    ad = ag[(ag["setup"] == "errors") & (ag["metric"] == "activation_distance") & of(ag, KD09)]
    assert list(ad.sort_values("teacher_seed")["significant"]) == [True, True, False]
    best = a.best_accuracy[a.best_accuracy["setup"] == "errors"]
    assert list(best["condition"]) == [Condition.of("rcd", alpha=0.1)] * 3 and best["is_rcd"].all()


def test_b_kd_like_the_controls_is_not_supported(planted):
    _, _, a = planted
    for setup, ts, cond in [("same", 0, KD05), ("errors", 0, KD01), ("errors", 1, KD01), ("errors", 2, KD01)]:
        r = decision(a, setup, ts, cond)
        assert not r.supported and not r.marginal and r.asymmetry == "none"


def test_c_ties_and_all_zero_differences(planted):
    _, _, a = planted
    t = a.tests[a.tests["setup"] == "ties"]
    vs_siddo = t[of(t, SIDDO, "control")]
    assert len(vs_siddo) == 6 and (vs_siddo["p"] == 1.0).all() and (vs_siddo["n"] == 10).all()
    vs_rcd = t[of(t, RCD05, "control")]
    assert vs_rcd["p"].notna().all() and (vs_rcd["n"] == 10).all()
    assert not decision(a, "ties", 0, KD05).supported


def test_d_failed_and_nan_runs_are_reported_and_pairing_stays_by_seed(planted):
    _, _, a = planted
    ex = a.excluded[a.excluded["setup"] == "broken"]
    reasons = {(r.condition, int(r.student_seed)): r.reason for r in ex.itertuples()}
    assert set(reasons) == {("KD α=0.5", 12), ("RCD α=0.5", 15)}
    assert reasons[("KD α=0.5", 12)].startswith("status FAILED: RuntimeError: CUDA out of memory")
    assert "NaN activation_distance" in reasons[("RCD α=0.5", 15)]

    t = a.tests[(a.tests["setup"] == "broken") & (a.tests["metric"] == "activation_distance")]
    by_ctrl = {r.control: r for r in t.itertuples()}
    assert by_ctrl[SIDDO].n == 9 and by_ctrl[RCD05].n == 8            # seed 12 gone; 15 also gone vs RCD
    # Paired by seed, KD is lower at every remaining seed: the smallest p those pairs allow.
    assert by_ctrl[SIDDO].p == pytest.approx(2 ** -9) and by_ctrl[RCD05].p == pytest.approx(2 ** -8)
    assert decision(a, "broken", 0, KD05).supported
    # Pairing by position (dropping the failed seed and zipping) would reverse the answer.
    s = a.students[a.students["setup"] == "broken"]
    kd = s[of(s, KD05)].sort_values("student_seed")["activation_distance"].to_numpy()
    ctrl = s[of(s, SIDDO)].sort_values("student_seed")["activation_distance"].to_numpy()
    assert wilcoxon(kd, ctrl[: len(kd)], alternative="less").pvalue > 0.5


# ------------------------------------------------------------------ control rules (no MLflow needed)

def _cond_runs(setup, method, metric_of, teacher_seed=0, **cond):
    return [run(setup, method, teacher_seed, s, metrics=metric_of(s), **cond) for s in SEEDS]


def test_fm_is_tested_against_siddo_and_its_own_random_control():
    good = lambda s: {m: 0.1 for m in stats.TRANSFER_METRICS} | {"test_acc": 0.8, "test_loss": 0.5}
    worse = lambda s: {m: 0.2 + s / 1000 for m in stats.TRANSFER_METRICS} | {"test_acc": 0.7, "test_loss": 0.6}
    runs = (_cond_runs("g", "siddo", worse) + _cond_runs("g", "fm", good, alpha=0.5, block=4)
            + _cond_runs("g", "fm_rcd", worse, alpha=0.5, block=4) + _cond_runs("g", "fm_rcd", worse, alpha=0.5, block=5)
            + _cond_runs("g", "fm_rcd", worse, alpha=0.9, block=4) + _cond_runs("g", "rcd", worse, alpha=0.5))
    a = analyse(as_frame(runs))
    controls = set(a.tests["control"])
    assert set(a.tests["condition"]) == {Condition.of("fm", alpha=0.5, block=4)}
    assert controls == {SIDDO, Condition.of("fm_rcd", alpha=0.5, block=4)}
    assert a.decisions.iloc[0].supported


def test_rcd_at_the_kd_temperature_else_at_t1():
    m = lambda s: {"activation_distance": 0.1 + s / 100, "test_acc": 0.8}
    runs = (_cond_runs("t", "siddo", m) + _cond_runs("t", "kd", m, alpha=0.5, temperature=2.0)
            + _cond_runs("t", "kd", m, alpha=0.5, temperature=4.0) + _cond_runs("t", "rcd", m, alpha=0.5)
            + _cond_runs("t", "rcd", m, alpha=0.5, temperature=4.0))
    tests = analyse(as_frame(runs)).tests
    pairs = {(r.condition.get("temperature"), r.control) for r in tests.itertuples() if r.control.method == "rcd"}
    assert pairs == {(2.0, Condition.of("rcd", alpha=0.5, temperature=1.0)), (4.0, Condition.of("rcd", alpha=0.5, temperature=4.0))}


def test_best_control_and_exclude_below():
    def conds(siddo, rcd01, rcd09):
        return {SIDDO: as_frame(_cond_runs("x", "siddo", lambda s: {"test_acc": siddo})),
                Condition.of("rcd", alpha=0.1): as_frame(_cond_runs("x", "rcd", lambda s: {"test_acc": rcd01}, alpha=0.1)),
                Condition.of("rcd", alpha=0.9): as_frame(_cond_runs("x", "rcd", lambda s: {"test_acc": rcd09}, alpha=0.9)),
                KD05: as_frame(_cond_runs("x", "kd", lambda s: {"test_acc": 0.99}, alpha=0.5))}
    assert stats.best_control(KD05, conds(0.80, 0.78, 0.90)) == Condition.of("rcd", alpha=0.9)   # KD itself never
    assert stats.best_control(KD05, conds(0.80, 0.78, 0.70)) == SIDDO
    c = conds(0.80, 0.76, 0.70)
    assert set(stats.control_pool(KD05, c)) == {SIDDO, Condition.of("rcd", alpha=0.1), Condition.of("rcd", alpha=0.9)}
    assert set(stats.control_pool(KD05, c, exclude_below=0.05)) == {SIDDO, Condition.of("rcd", alpha=0.1)}
    assert set(stats.control_pool(KD05, c, exclude_below=0.01)) == {SIDDO}


def test_duplicate_runs_of_a_trial_keep_the_latest_finished():
    base = _cond_runs("x", "siddo", lambda s: {"test_acc": 0.8})
    retry = dict(base[0], status="FAILED", failure="preempted")
    df = as_frame([retry] + base)                                       # same trial key, failed first
    students, _, excluded = stats.prepare(df)
    assert len(students) == 10 and (students["status"] == "FINISHED").all()
    assert len(excluded) == 1 and excluded.iloc[0]["reason"].startswith("superseded")


def test_labels_sort_in_paper_order():
    conds = [Condition.of("rcd", alpha=0.5), Condition.of("kd", alpha=0.9), Condition.of("siddo"), Condition.of("kd", alpha=0.1, temperature=2.0),
             Condition.of("ls", epsilon=0.1), Condition.of("fm", alpha=0.5, block=4), Condition.of("kd", alpha=0.1)]
    labels = [c.label for c in sorted(conds, key=lambda c: c.sort_key)]
    assert labels == ["SIDDO", "KD α=0.1", "KD α=0.9", "KD α=0.1 T=2", "RCD α=0.5", "LS ε=0.1", "FM α=0.5 b4"]
    assert Condition.of("kd", alpha=0.5, width=0.5).label == "KD α=0.5 w=0.5"
    assert isinstance(pd.DataFrame({"c": conds})["c"].iloc[0], Condition)


# ------------------------------------------------------------------ decision boundaries (rates as trials compute them)

GOOD = ("activation_distance", "js_divergence", "rank_disagreement", "prediction_disagreement")


def boundary_runs(kd_better=GOOD, rcd_equal=(), cor=(0, 0), inc=(0, 0), pd=(0, 0), n=300):
    """SIDDO (best accuracy), RCD alpha 0.5 and KD alpha 0.5 on SEEDS.  KD is better by a seed-dependent
    margin on the metrics in kd_better (except against RCD on those in rcd_equal, where RCD equals KD);
    correct/incorrect agreement and prediction disagreement are counts of n: KD's extra counts over
    every control are cor[0] of cor[1]-sized rates (likewise inc; pd: KD's prediction-disagreement count
    below every control's, else 1 or 2 by seed)."""
    out = []
    for s in SEEDS:
        base = {m: 0.3 + s / 100 for m in GOOD} | {"test_acc": 0.8, "test_loss": 0.7}
        k = 40 + 7 * s                                              # this seed's counts
        agree = dict(correct_agreement=rate(k, cor[1] or n), incorrect_agreement=rate(k // 3, inc[1] or n),
                     prediction_disagreement=rate(k, pd[1] or n))
        ctrl = base | agree
        kd = {m: v - (0.01 + s / 1000 if m in kd_better else 0) for m, v in base.items()} | dict(
            correct_agreement=rate(k + cor[0], cor[1] or n), incorrect_agreement=rate(k // 3 + inc[0], inc[1] or n),
            prediction_disagreement=rate(k - pd[0], pd[1] or n))
        if "prediction_disagreement" in kd_better and not pd[0]:
            kd["prediction_disagreement"] = rate(k - 1 - s % 2, n)
        rcd = dict(ctrl, test_acc=0.79)
        for m in rcd_equal:
            rcd[m] = kd[m] + (1e-4 if s % 2 else -1e-4)
        out += [run("b", "siddo", 0, s, metrics=dict(ctrl, test_acc=0.81)), run("b", "rcd", 0, s, alpha=0.5, metrics=rcd),
                run("b", "kd", 0, s, alpha=0.5, metrics=kd)]
    return out


def boundary(threshold=0.01, **kw):
    a = analyse(as_frame(boundary_runs(**kw)), threshold=threshold, power_draws=0)
    return a, a.decisions.iloc[0]


def test_boundary_two_of_four_is_not_supported_three_is():
    a, r = boundary(kd_better=GOOD[:2])
    assert (r.n_significant, r.supported, r.asymmetry) == (2, False, "none")
    _, r = boundary(kd_better=GOOD[:3])
    assert (r.n_significant, r.supported) == (3, True)


def test_boundary_beats_siddo_but_not_rcd_on_a_metric():
    a, r = boundary(rcd_equal=("js_divergence",))
    js = a.tests[a.tests["metric"] == "js_divergence"]
    assert list(js.sort_values("control", key=lambda c: c.map(lambda x: x.sort_key))["significant"]) == [True, False]
    ag = a.against[a.against["metric"] == "js_divergence"].iloc[0]
    assert not ag.significant and ag.n_controls == 2
    assert r.n_significant == 3 and r.supported                    # 3 of 4 still significant against both


def test_boundary_positive_asymmetry():
    _, r = boundary(cor=(15, 300), inc=(3, 300))
    assert r.supported and r.asymmetry == "positive"
    assert r.delta_correct == pytest.approx(15 / 300) and r.delta_incorrect == pytest.approx(3 / 300)


def test_boundary_symmetric_within_the_stated_tolerance():
    """Δcorrect = 2/200 and Δincorrect = 4/400 are equal as rationals; their float means are not."""
    _, r = boundary(cor=(2, 200), inc=(4, 400))
    assert r.delta_correct != r.delta_incorrect                     # float equality would call it asymmetric
    assert abs(r.delta_correct - r.delta_incorrect) < stats.DECISION_RTOL * 0.01
    assert r.supported and r.asymmetry == "symmetric"


def test_boundary_marginal_exactly_at_the_threshold():
    """A prediction-agreement gain of exactly 5/500 = 0.01 is not below the threshold 0.01; 4/500 is."""
    _, r = boundary(pd=(5, 500))
    assert r.pa_gain < 0.01 and r.pa_gain == pytest.approx(0.01, rel=1e-12)   # float noise below the boundary
    assert r.supported and not r.marginal
    _, r = boundary(pd=(4, 500))
    assert r.supported and r.marginal
    _, r = boundary(pd=(5, 500), threshold=0.0101)
    assert r.marginal
