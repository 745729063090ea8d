"""Paired tests, FDR and the transfer and asymmetry decisions (docs/protocol.md §5).

Pure functions on the frame ``runs.load_runs`` returns; no MLflow here, so
every number can be checked against scipy/statsmodels on planted data.

Choices the protocol leaves open, made here:

- Pairing is an inner join on ``student_seed``.  Runs that did not finish are
  excluded (and listed); a NaN metric drops that seed from that metric's
  tests only (and is listed).  Of several finished runs of one trial key, or
  of one condition and seed, the latest is used and the others listed.
- "Significant" means adjusted p <= level, the correction (BH by default,
  BY or Holm, corrections.py) over the four functional metrics of each
  comparison, uncorrected for accuracy and loss.
- Differences are snapped at effects.TIE_RTOL (F32_RTOL where the values
  are all float32, as accuracies stored by older versions are) before
  ranking, so equal rates k/N tie exactly; each p records its null distribution: "exact" (no ties),
  "exact-ties" (all sign patterns, ties and zeros; up to 50 pairs),
  "normal" (above 50 pairs).
- The prediction-agreement gain, Delta_correct and Delta_incorrect are means
  of per-seed paired differences against the best control.
- Asymmetry labels, only where transfer is supported ("none" otherwise):
  "negative" / "positive" when the two-sided signed-rank test of the per-seed
  Delta_incorrect - Delta_correct is significant at the level (direction:
  the smaller one-sided p); otherwise "negative, n.s." / "positive, n.s."
  from the sign of the mean difference (descriptive only), or "symmetric"
  (means equal to DECISION_RTOL).  Each carries the seeds a two-sided test
  would need for 80% power at the asymmetry SESOI, with the pilot's noise.
  "Marginal" likewise needs the gain below the threshold by more than that.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields, replace
from typing import NamedTuple, Optional

import numpy as np
import pandas as pd

from kdray import conditions
from kdray.analysis import corrections, effects, sizing
from kdray.metric_names import METRIC_DIRECTIONS, TRANSFER_METRICS

LEVEL = 0.05
SUPPORT_MIN = 3                      # the paper's rule: functional metrics that must be significant (of 4)
ACCURACY_METRICS = ("test_acc", "test_loss")
TESTED_METRICS = tuple(TRANSFER_METRICS) + ACCURACY_METRICS
ASYMMETRY_METRICS = ("correct_agreement", "incorrect_agreement")
CHECKED_METRICS = TESTED_METRICS + ASYMMETRY_METRICS + ("prediction_agreement",)
_OWN_DIRECTIONS = {"test_acc": "higher", "train_acc": "higher", "test_loss": "lower", "train_loss": "lower"}
DECISION_RTOL = 1e-9                         # means this close count as equal (asymmetry, marginal)


def direction(metric: str) -> Optional[str]:
    """'lower' or 'higher' for the preferred ("more similar"/better) direction, None if unknown."""
    return METRIC_DIRECTIONS.get(metric) or _OWN_DIRECTIONS.get(metric)


# ------------------------------------------------------------------ conditions

def sortable(v) -> tuple:
    return (0, -1.0) if v is None else (1, v) if isinstance(v, (int, float)) else (2, str(v))


class Condition(NamedTuple):
    """What a student was trained under; runs of one condition differ only by seed.

    ``params`` are the condition's parameters as (name, value) pairs in declared
    order (kdray/conditions); what they mean, and how they are labelled and
    sorted, comes from the condition's declaration.
    """
    method: str
    params: tuple = ()
    width: float = 1.0

    @classmethod
    def of(cls, method: str, width: float = 1.0, **params) -> "Condition":
        """A condition with its declared defaults filled in (``Condition.of("kd", alpha=0.5)``)."""
        decl = conditions.find(method)
        full = decl.full_params(params) if decl is not None else dict(sorted(params.items()))
        return cls(method, tuple(full.items()), float(width))

    @property
    def decl(self) -> Optional[conditions.Condition]:
        return conditions.find(self.method)

    def get(self, name: str, default=None):
        """A param's value, or the width ("width")."""
        if name == "width":
            return self.width
        return dict(self.params).get(name, default)

    def replace(self, **changes) -> "Condition":
        width = changes.pop("width", self.width)
        return Condition(self.method, tuple((k, changes.get(k, v)) for k, v in self.params), width)

    def facets(self) -> tuple:
        """The values figures draw in separate panel rows (e.g. the temperature)."""
        d = self.decl
        return tuple((p.name, self.get(p.name)) for p in (d.params if d else ()) if p.facet)

    def label_parts(self, facets: bool = True) -> list[str]:
        d = self.decl
        if d is None:   # a plug-in condition that is not installed where the report runs
            return [self.method.upper()] + [f"{k}={v}" for k, v in self.params]
        params = {k: v for k, v in self.params if facets or not d.param(k).facet}
        return [d.title] + d.label(params)

    @property
    def label(self) -> str:
        if self.decl is None:          # not cached: its plug-in may still be loaded and give it a title
            return _label(self)
        key = repr(self)               # repr, not the tuple: 1 and 1.0 are equal but labelled apart
        if key not in _LABELS:
            _LABELS[key] = _label(self)
        return _LABELS[key]

    @property
    def is_random_control(self) -> bool:
        return bool(self.decl and self.decl.random_control)

    @property
    def sort_key(self) -> tuple:
        d = self.decl
        decl_params = list(d.params) if d else []
        facets = [p.name for p in decl_params if p.facet]
        rest = [p.name for p in reversed(decl_params) if not p.facet] or [k for k, _ in self.params]
        return ((d.order if d else 99), self.method, -self.width,
                *(sortable(self.get(n)) for n in facets + rest))


def _label(c: Condition) -> str:
    parts = c.label_parts()
    if c.width != 1.0:
        parts.append(f"w={c.width:g}")
    return " ".join(parts)


# A declared condition's label, once per condition: a report labels the same few conditions
# hundreds of thousands of times (tables, CSVs, the summary).
_LABELS: dict[str, str] = {}


def condition_of(row) -> Condition:
    """A run's condition, from its method, params and width columns."""
    params = row.params if isinstance(row.params, dict) else {}
    width = 1.0 if pd.isna(row.width) else float(row.width)
    return Condition.of(row.method, width, **params)


def by_condition(frame: pd.DataFrame) -> dict[Condition, pd.DataFrame]:
    """Split on the ``condition`` column (tuples do not survive pandas groupby/== reliably)."""
    idx: dict[Condition, list] = {}
    for i, c in zip(frame.index, frame["condition"]):
        idx.setdefault(c, []).append(i)
    return {c: frame.loc[ix] for c, ix in sorted(idx.items(), key=lambda kv: kv[0].sort_key)}


def condition_groups(students: pd.DataFrame) -> list[tuple]:
    """(setup, teacher seed, {condition: its runs}) in sorted order: the split every step of an analysis
    walks, made once per setup (pipeline passes it to each step) instead of once per step."""
    return [(setup, int(ts), by_condition(grp))
            for (setup, ts), grp in students.groupby(["setup", "teacher_seed"], sort=True)]


# ------------------------------------------------------------------ controls

def find_controls(rule: conditions.ControlRule, treated: Condition, available) -> list[Condition]:
    """The conditions of ``rule.method`` that equal ``treated`` on the rule's fields, relaxing its
    fallback fields when nothing matches exactly."""
    def hits(target: Condition) -> list[Condition]:
        return [c for c in available if c.method == rule.method
                and all(c.get(f) == target.get(f) for f in rule.match)]
    found = hits(treated)
    if not found and rule.fallback:
        found = hits(treated.replace(**dict(rule.fallback)))
    return sorted(found, key=lambda c: c.sort_key)


def is_treatment(cond: Condition) -> bool:
    return bool(cond.decl and cond.decl.role == conditions.TREATMENT)


# ------------------------------------------------------------------ primitive statistics

def signed_rank_test(d, alternative: str, scale: Optional[float] = None,
                     rtol: float = effects.TIE_RTOL) -> tuple[float, str]:
    """Wilcoxon signed-rank p on differences d and the null distribution it used.

    d is snapped first (effects.snap_ties, at ``rtol`` times ``scale``: the
    paired values' largest magnitude; ``Tie.of`` gives both), so rate
    differences of equal k/N are ties.  No ties
    and no zeros, n <= 50: the exact null ("exact", as scipy's
    ``method="exact"``).  Ties or zeros (zeros dropped, zero_method="wilcox"),
    n <= 50: the exact null of the tied ranks, every sign pattern counted
    ("exact-ties"; scipy enumerates these only to n = 13).  Otherwise the
    normal approximation with scipy's tie correction ("normal").
    """
    from scipy.stats import wilcoxon

    d = np.asarray(d, float)
    d = effects.snap_ties(d[~np.isnan(d)], scale, rtol)
    if d.size < 1:
        return math.nan, ""
    if np.all(d == 0):
        return 1.0, "exact"
    ties = np.any(d == 0) or np.unique(np.abs(d)).size < d.size
    if d.size > effects.EXACT_MAX_N:
        return float(wilcoxon(d, alternative=alternative, method="asymptotic").pvalue), "normal"
    if ties:
        return effects.exact_tied_p(d, alternative), "exact-ties"
    return _exact_signed_rank(d, alternative), "exact"


def _signed_rank(d: np.ndarray, alternative: str, scale: Optional[float] = None,
                 rtol: float = effects.TIE_RTOL) -> float:
    return signed_rank_test(d, alternative, scale, rtol)[0]


def _scale(*arrays) -> Optional[float]:
    """The largest magnitude among paired values: the tie tolerance's scale (None when empty)."""
    sizes = [np.asarray(a, float) for a in arrays if np.size(a)]
    return float(max(np.nanmax(np.abs(a)) for a in sizes)) if sizes else None


class Tie(NamedTuple):
    """How differences of some paired values are snapped: scale and relative tolerance (effects.snap_ties)."""
    scale: Optional[float]
    rtol: float

    @classmethod
    def of(cls, *arrays) -> "Tie":
        """The tolerance for differences of these paired values (float32 values at float32 resolution)."""
        return cls(_scale(*arrays), effects.tie_rtol(*arrays))


@functools.cache
def _signed_rank_counts(n: int) -> np.ndarray:
    """How many of the 2^n sign patterns give each rank sum R+ = 0 .. n(n+1)/2 (exact in float64)."""
    counts = np.zeros(n * (n + 1) // 2 + 1)
    counts[0] = 1
    for rank in range(1, n + 1):  # rank either counts towards R+ or not
        counts[rank:] = counts[rank:] + counts[:-rank]
    return counts


def _exact_signed_rank(d: np.ndarray, alternative: str) -> float:
    """scipy's ``method="exact"`` p without its per-call overhead (~1 ms; a report makes thousands).

    Every partial sum of counts / 2^n is a dyadic fraction float64 holds
    exactly, so the p-values equal scipy's bit for bit (tests/test_stats.py).
    """
    n = d.size
    r_plus = int(np.sum((np.argsort(np.argsort(np.abs(d))) + 1)[d > 0]))  # no ties: ranks are 1..n
    counts, total = _signed_rank_counts(n), 2.0 ** n
    cdf, sf = counts[:r_plus + 1].sum() / total, counts[r_plus:].sum() / total
    return float({"less": cdf, "greater": sf}.get(alternative, min(1.0, 2 * min(cdf, sf))))


def wilcoxon_one_sided(kd, control, direction: str) -> float:
    """Paired one-sided signed-rank p that KD is more similar/better than the control.

    direction is the metric's preferred one: "lower" tests kd - control < 0,
    "higher" tests > 0.  All-zero differences give 1.0; no pairs give nan.
    """
    kd, control = np.asarray(kd, float), np.asarray(control, float)
    if kd.shape != control.shape:
        raise ValueError(f"paired samples differ in length: {kd.shape} vs {control.shape}")
    alternative = {"lower": "less", "higher": "greater"}[direction]
    return _signed_rank(kd - control, alternative, *Tie.of(kd, control))


def wilcoxon_two_sided(d, scale: Optional[float] = None) -> float:
    """Two-sided signed-rank p on per-seed differences d (1.0 when all are zero)."""
    return _signed_rank(d, "two-sided", scale)


def mean_sem(x) -> tuple[float, float, int]:
    """Mean, 1 SEM (ddof=1 std / sqrt(n)) and n over the non-nan values."""
    x = np.asarray(x, float)
    x = x[~np.isnan(x)]
    n = x.size
    if n == 0:
        return math.nan, math.nan, 0
    sem = float(np.std(x, ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return float(np.mean(x)), sem, n


def min_wilcoxon_p(n: int) -> float:
    """The smallest one-sided signed-rank p that n pairs can give: all signs agree, 2**-n."""
    return 2.0 ** -n


def significance_warning(n_pairs: int, level: float = LEVEL, n_tests: int = 4,
                         correction: str = corrections.DEFAULT) -> Optional[str]:
    """A one-line warning when n_pairs paired seeds can never reach significance, else None.

    The best case is every test at 2**-n; the correction over n_tests metrics
    then gives corrections.min_adjusted_p (BH: 2**-n itself, BY and Holm more).
    """
    if n_pairs < 1:
        return "no paired student seeds: no test can be run"
    p, adj = min_wilcoxon_p(n_pairs), corrections.min_adjusted_p(n_pairs, correction, n_tests)
    if adj <= level:
        return None
    need = corrections.seeds_needed(level, correction, n_tests)
    after = f" ({corrections.SHORT[correction]}-adjusted: {adj:.4g})" if adj != p else ""
    return (f"{n_pairs} paired student seeds: the smallest one-sided Wilcoxon p is 2^-{n_pairs} = {p:.4g}{after} "
            f"> {level:g}, so none of the {n_tests} metric tests can be significant; "
            f"use at least {need} student seeds")


def smallest_p_text(n_pairs: int, correction: str = corrections.DEFAULT, n_tests: int = 4) -> str:
    """What ``kdray plan`` states: the smallest p attainable with n_pairs seeds, raw and corrected."""
    return (f"{n_pairs} student seeds: smallest one-sided p 2^-{n_pairs} = {min_wilcoxon_p(n_pairs):.4g}, "
            f"{corrections.SHORT[correction]}-adjusted over {n_tests} metrics "
            f"{corrections.min_adjusted_p(n_pairs, correction, n_tests):.4g}")


class Pairs(NamedTuple):
    seeds: np.ndarray
    x: np.ndarray            # the treated condition's metric, per seed
    y: np.ndarray            # the control's

    @property
    def d(self) -> np.ndarray:
        return self.x - self.y


def paired(a: pd.DataFrame, b: pd.DataFrame, metric: str) -> Pairs:
    """a's and b's metric matched on student_seed (inner join); seeds with a nan on either side dropped."""
    if metric not in a or metric not in b:
        return Pairs(np.array([], int), np.array([]), np.array([]))
    sa, sb = a["student_seed"].to_numpy(np.int64), b["student_seed"].to_numpy(np.int64)
    if len(set(sa)) < len(sa) or len(set(sb)) < len(sb):
        raise ValueError("a condition has two runs with the same student seed; pairing would be ambiguous")
    seeds, ia, ib = np.intersect1d(sa, sb, return_indices=True)
    x, y = a[metric].to_numpy(float)[ia], b[metric].to_numpy(float)[ib]
    keep = ~(np.isnan(x) | np.isnan(y))
    return Pairs(seeds[keep], x[keep], y[keep])


# ------------------------------------------------------------------ cleaning

def _excluded_row(r, reason: str) -> dict:
    cond = condition_of(r)
    return dict(setup=r.setup, teacher_seed=r.teacher_seed, condition=cond.label if r.role != "teacher" else "teacher",
                student_seed=r.student_seed, trial_key=r.trial_key, run_id=r.run_id, reason=reason)


def prepare(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(finished students with a ``condition`` column, finished teachers, excluded runs with reasons)."""
    df = df.copy()
    if "prediction_disagreement" in df:  # PA = 1 - PD where a run did not log PA itself
        derived = 1 - df["prediction_disagreement"]
        df["prediction_agreement"] = df["prediction_agreement"].fillna(derived) if "prediction_agreement" in df else derived
    excluded = []
    # Latest finished run per trial key wins; earlier attempts are superseded.
    df["_ok"] = df["status"] == "FINISHED"
    df = df.sort_values(["_ok", "start_time"], ascending=False, na_position="last")
    keyed = df["trial_key"].notna()
    dup = keyed & df.duplicated("trial_key")
    for r in df[dup].itertuples():
        excluded.append(_excluded_row(r, f"superseded: another run of trial {r.trial_key} is used"))
    df = df[~dup]
    for r in df[~df["_ok"]].itertuples():
        why = r.failure if isinstance(r.failure, str) and r.failure else "no reason recorded"
        excluded.append(_excluded_row(r, f"status {r.status}: {why.splitlines()[0][:200]}"))
    df = df[df["_ok"]].drop(columns="_ok")
    teachers = df[df["role"] == "teacher"].copy()
    students = df[df["role"] != "teacher"].copy()
    for col in ("setup", "teacher_seed", "student_seed"):
        for r in students[students[col].isna()].itertuples():
            excluded.append(_excluded_row(r, f"no {col}: cannot be paired"))
        students = students[students[col].notna()]
    students["condition"] = [condition_of(r) for r in students.itertuples()]
    students["teacher_seed"] = students["teacher_seed"].astype("Int64")
    # One run per (setup, teacher seed, condition, seed): a second would pair twice.
    keys = pd.Series([f"{r.setup}|{r.teacher_seed}|{r.student_seed}|{r.condition!r}" for r in students.itertuples()],
                     index=students.index, dtype=object)
    dup = keys.duplicated()
    for r in students[dup].itertuples():
        excluded.append(_excluded_row(r, "duplicate of a later finished run with the same condition and seed"))
    students = students[~dup]
    checked = [m for m in CHECKED_METRICS if m in students]
    for r in students.itertuples():
        nan = [m for m in checked if pd.isna(getattr(r, m))]
        if nan:
            excluded.append(_excluded_row(r, "NaN " + ", ".join(nan) + " (left out of those tests)"))
    cols = ["setup", "teacher_seed", "condition", "student_seed", "trial_key", "run_id", "reason"]
    excl = pd.DataFrame(excluded, columns=cols)
    return students.reset_index(drop=True), teachers.reset_index(drop=True), excl


# ------------------------------------------------------------------ analysis

def metric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric metric columns, the protocol's first, then any extra metric alphabetically."""
    from kdray.analysis.runs import ID_COLUMNS
    # Bookkeeping the trials log beside their results, not outcomes to compare.
    skip = set(ID_COLUMNS) | {"condition", "lr", "train_seconds", "tha_contexts"}
    present = [c for c in df.columns if c not in skip and pd.api.types.is_numeric_dtype(df[c]) and df[c].notna().any()]
    first = ["test_acc", "test_loss", "train_acc", "train_loss", *TRANSFER_METRICS, "prediction_agreement",
             "correct_agreement", "incorrect_agreement", "variation_of_information", "procrustes_distance"]
    return [m for m in first if m in present] + sorted(m for m in present if m not in first)


def summarize(students: pd.DataFrame, groups: Optional[list] = None) -> pd.DataFrame:
    """Long table: setup, teacher_seed, condition, metric, n, mean, sem (``groups``: condition_groups')."""
    rows = []
    metrics = metric_columns(students)
    floats = all(students[m].dtype == np.float64 for m in metrics)   # then one array per condition
    for setup, ts, conds in condition_groups(students) if groups is None else groups:
        for cond, runs in conds.items():
            values = runs[metrics].to_numpy(float).T if floats else [runs[m] for m in metrics]
            for m, x in zip(metrics, values):
                mean, sem, n = mean_sem(x)
                if n:
                    rows.append(dict(setup=setup, teacher_seed=ts, condition=cond, metric=m, n=n, mean=mean, sem=sem))
    return pd.DataFrame(rows, columns=["setup", "teacher_seed", "condition", "metric", "n", "mean", "sem"])


def tost_p(d: np.ndarray, sesoi: float, tie: "Tie") -> float:
    """The two one-sided tests (TOST) p that the shift of d lies within (-sesoi, +sesoi): the larger of
    the exact tie-aware signed-rank p of d + sesoi > 0 and of d - sesoi < 0 (nan without pairs).

    The tied test is not monotone in the shift where the SESOI is itself a tie point (d + sesoi
    has zeros): it can reject at -sesoi but not at some shift below it.  Equivalence is therefore
    shown only when the whole interval of effects.test_interval lies inside (-sesoi, sesoi), which
    implies this p <= level (``equivalent`` in paired_tests)."""
    if d.size == 0 or not sesoi > 0:
        return math.nan
    above = signed_rank_test(d + sesoi, "greater", tie.scale, effects.TIE_RTOL)[0]
    below = signed_rank_test(d - sesoi, "less", tie.scale, effects.TIE_RTOL)[0]
    return max(above, below)


TRANSFER_SHOWN, NO_TRANSFER, INCONCLUSIVE = ("transfer shown", "no transfer larger than the SESOI shown",
                                             "inconclusive")


def verdict(significant: bool, equivalent: bool, functional: bool = True) -> str:
    """One comparison's verdict: the one-sided test, else the equivalence test, else neither (for
    accuracy and loss "better shown" / "no difference larger than the SESOI shown")."""
    shown, none = (TRANSFER_SHOWN, NO_TRANSFER) if functional else (
        "better shown", "no difference larger than the SESOI shown")
    if significant:
        return shown + (" (smaller than the SESOI)" if equivalent else "")
    return none if equivalent else INCONCLUSIVE


def _test_row(pr: Pairs, metric: str, level: float = LEVEL, sesoi: Optional[dict] = None) -> dict:
    """A comparison's p, its null distribution and effect sizes (on snapped differences); the interval
    inverts the same one-sided level test in each direction (effects.test_interval: 90% at 0.05)."""
    tie = Tie.of(pr.x, pr.y)
    d = effects.snap_ties(pr.d, *tie)
    alternative = {"lower": "less", "higher": "greater"}[direction(metric)]
    p, null = signed_rank_test(pr.d, alternative, *tie)
    eff = effects.effect(d, direction(metric), level) if d.size else effects.Effect(*[math.nan] * 6)
    s = (sizing.SESOI if sesoi is None else sesoi).get(metric, math.nan)
    return dict(n=len(pr.seeds), mean_diff=mean_sem(pr.d)[0], p=p, null=null, **eff._asdict(),
                sesoi=s, p_tost=tost_p(d, s, tie), equivalent=bool(-s < eff.ci_low and eff.ci_high < s))


EFFECT_COLUMNS = ["hl", "ci_low", "ci_high", "ci_level", "rank_biserial", "superiority"]


def paired_tests(students: pd.DataFrame, level: float = LEVEL, correction: str = corrections.DEFAULT,
                 sesoi: Optional[dict] = None, groups: Optional[list] = None) -> pd.DataFrame:
    """One row per (setup, teacher seed, treated condition, control, metric) with raw and adjusted p,
    the p's null distribution and the effect sizes (Hodges-Lehmann shift, the 1 - 2 level interval of
    the two one-sided bounds that invert the test, rank-biserial
    correlation, probability of superiority; effects.py), and the equivalence test at the metric's
    smallest effect of interest (``sesoi``, default sizing.SESOI) with the comparison's verdict
    (``groups``: condition_groups' split of students, when the caller has it)."""
    rows = []
    for setup, ts, conds in condition_groups(students) if groups is None else groups:
        for cond, runs in conds.items():
            for rule in conditions.controls_of(cond.method):
                for ctrl in find_controls(rule, cond, conds):
                    for m in TESTED_METRICS:
                        pr = paired(runs, conds[ctrl], m)
                        rows.append(dict(setup=setup, teacher_seed=ts, condition=cond, control=ctrl, metric=m,
                                         **_test_row(pr, m, level, sesoi), family=correction if m in TRANSFER_METRICS else "none"))
    cols = ["setup", "teacher_seed", "condition", "control", "metric", "n", "mean_diff", "p", "null",
            *EFFECT_COLUMNS, "sesoi", "p_tost", "equivalent", "family"]
    tests = pd.DataFrame(rows, columns=cols)
    tests["p_adj"], tests["significant"] = tests["p"], tests["p"] <= level
    families: dict[tuple, list] = {}   # one family per (setup, teacher seed, condition, control)
    for i, r in enumerate(tests.itertuples()):
        if r.family != "none":
            families.setdefault((r.setup, r.teacher_seed, r.condition, r.control), []).append(i)
    if families:                       # adjusted family by family on arrays, written back once
        p, p_adj, sig = tests["p"].to_numpy(float), tests["p_adj"].to_numpy(float).copy(), tests["significant"].to_numpy(bool).copy()
        for ix in families.values():
            p_adj[ix] = adj = corrections.adjust(p[ix], correction)
            sig[ix] = adj <= level
        tests["p_adj"], tests["significant"] = p_adj, sig
    tests["verdict"] = [verdict(bool(s), bool(e), m in TRANSFER_METRICS)
                        for s, e, m in zip(tests["significant"], tests["equivalent"], tests["metric"])]
    return tests


def against_controls(tests: pd.DataFrame) -> pd.DataFrame:
    """Per (setup, teacher seed, condition, metric): significant against every control present."""
    groups: dict[tuple, list] = {}
    for i, r in enumerate(tests.itertuples()):   # positions
        groups.setdefault((r.setup, r.teacher_seed, r.condition, r.metric), []).append(i)
    sig, p_adj = tests["significant"].to_numpy(bool), tests["p_adj"].to_numpy(float)
    rows = [dict(setup=k[0], teacher_seed=k[1], condition=k[2], metric=k[3],
                 significant=bool(sig[ix].all()), n_controls=len(ix), max_p_adj=_max(p_adj[ix]))
            for k, ix in groups.items()]
    return pd.DataFrame(rows, columns=["setup", "teacher_seed", "condition", "metric", "significant",
                                       "n_controls", "max_p_adj"])


def _max(x: np.ndarray) -> float:
    """The largest non-nan value (nan if none), as pandas' max."""
    x = x[~np.isnan(x)]
    return float(x.max()) if x.size else math.nan


def _mean_test_acc(runs: pd.DataFrame) -> float:
    return mean_sem(runs["test_acc"])[0] if "test_acc" in runs else math.nan


def control_pool(treated: Condition, conds: dict[Condition, pd.DataFrame],
                 exclude_below: Optional[float] = None) -> dict[Condition, float]:
    """The best-control candidates of a treated condition with their mean test accuracy.

    exclude_below drops controls whose mean accuracy is more than that below
    SIDDO's (the paper drops RCD alpha 0.9 on UrbanSound8K); SIDDO always stays.
    With best = highest accuracy the drop cannot change the choice; it shows in
    the pool (and would matter to any other choice of "best").
    """
    pool = [c for rule in conditions.best_pool_of(treated.method) for c in find_controls(rule, treated, conds)]
    acc = {c: _mean_test_acc(conds[c]) for c in pool}
    siddo = [a for c, a in acc.items() if c.method == "siddo"]
    if exclude_below is not None and siddo:
        acc = {c: a for c, a in acc.items() if c.method == "siddo" or not a < siddo[0] - exclude_below}
    return {c: a for c, a in acc.items() if not math.isnan(a)}


def best_control(treated: Condition, conds: dict[Condition, pd.DataFrame],
                 exclude_below: Optional[float] = None) -> Optional[Condition]:
    """The pool control with the highest mean test accuracy (docs/protocol.md §5.7), None without one."""
    pool = control_pool(treated, conds, exclude_below)
    return max(pool, key=pool.get) if pool else None


def best_accuracy(students: pd.DataFrame, groups: Optional[list] = None) -> pd.DataFrame:
    """Per setup, teacher seed and width: the condition with the highest mean test accuracy."""
    rows = []
    if "test_acc" not in students:
        return pd.DataFrame(columns=["setup", "teacher_seed", "width", "condition", "test_acc", "is_rcd"])
    for setup, ts, conds in condition_groups(students) if groups is None else groups:
        for w in sorted({c.width for c in conds}, reverse=True):
            acc = {c: _mean_test_acc(r) for c, r in conds.items() if c.width == w}
            acc = {c: a for c, a in acc.items() if not math.isnan(a)}
            if acc:
                best = max(acc, key=acc.get)
                rows.append(dict(setup=setup, teacher_seed=ts, width=w, condition=best, test_acc=acc[best],
                                 is_rcd=best.is_random_control))
    return pd.DataFrame(rows, columns=["setup", "teacher_seed", "width", "condition", "test_acc", "is_rcd"])


def _same(a: float, b: float) -> bool:
    """Equal to DECISION_RTOL: means of k/N differences that are equal can differ in the last bits."""
    return math.isclose(a, b, rel_tol=DECISION_RTOL, abs_tol=DECISION_RTOL * 1e-3)


def _asymmetry(supported: bool, d_cor: float, d_inc: float, p: float = math.nan, p_neg: float = math.nan,
               level: float = LEVEL) -> str:
    """The asymmetry label: a direction is named plainly only when its two-sided test p <= level."""
    if not supported or math.isnan(d_cor) or math.isnan(d_inc):
        return "none"
    if p <= level:   # the direction the test found: the smaller one-sided p (p_neg: Δincorrect > Δcorrect)
        return "negative" if p_neg <= 0.5 else "positive"
    return "symmetric" if _same(d_inc, d_cor) else "negative, n.s." if d_inc > d_cor else "positive, n.s."


def asymmetry_text(label: str, p: float, seeds: float, sesoi: float = sizing.SESOI["asymmetry"]) -> str:
    """The words for an asymmetry label: "negative asymmetry (p 0.002)", or for a direction the test does
    not support "direction negative, not significant (p 0.0625; 23 seeds for 80% power at 0.01)"."""
    need = f"{'more than ' + str(sizing.MAX_SEEDS) if seeds != seeds else int(seeds)} seeds for " \
           f"{sizing.TARGET:.0%} power at {sesoi:g}"
    if label in ("negative", "positive"):
        return f"{label} asymmetry (p {p:.3g})"
    if label.endswith(", n.s."):
        return f"direction {label[:-6]}, not significant (p {p:.3g}; {need})"
    if label == "symmetric":
        return f"no asymmetry observed (p {p:.3g}; {need})"
    return label


def _marginal(supported: bool, gain: float, threshold: float) -> bool:
    """Supported, but the prediction-agreement gain is below the threshold (a gain equal to it is not)."""
    return bool(supported and gain < threshold and not _same(gain, threshold))


def decisions(students: pd.DataFrame, against: pd.DataFrame, threshold: float = 0.01,
              exclude_below: Optional[float] = None, min_metrics: int = SUPPORT_MIN, level: float = LEVEL,
              sesoi: Optional[dict] = None, tests: Optional[pd.DataFrame] = None,
              groups: Optional[list] = None) -> pd.DataFrame:
    """Transfer support, marginality, asymmetry and the verdict per (setup, teacher seed, treated condition).

    The verdict (with ``tests``, paired_tests' frame): "transfer shown" when supported; "no transfer
    larger than the SESOI shown" when on more functional metrics than support could spare
    (4 - min_metrics + 1) the equivalence test (TOST at the level: the 1 - 2 level interval inside
    +-SESOI, see tost_p) against some control shows the shift within the metric's SESOI, so no min_metrics of them can beat every control by the SESOI;
    otherwise "inconclusive".
    """
    sesoi = sizing.SESOI if sesoi is None else sesoi
    worst = {(r.setup, r.teacher_seed, r.condition, r.metric): r.max_p_adj for r in against.itertuples()}
    equiv: dict[tuple, set] = {}
    if tests is not None and len(tests):
        for r in tests[tests["metric"].isin(TRANSFER_METRICS) & tests["equivalent"].astype(bool)].itertuples():
            equiv.setdefault((r.setup, r.teacher_seed, r.condition), set()).add(r.metric)
    rows = []
    sig = {(r.setup, r.teacher_seed, r.condition, r.metric): r.significant for r in against.itertuples()}
    for setup, ts, conds in condition_groups(students) if groups is None else groups:
        for cond, runs in conds.items():
            if not is_treatment(cond):
                continue
            n_sig = sum(bool(sig.get((setup, ts, cond, m), False)) for m in TRANSFER_METRICS)
            supported = n_sig >= min_metrics
            # the decision's own p: supported at level a <=> its min_metrics-th smallest worst-control p <= a
            ps = sorted(worst.get((setup, ts, cond, m), math.nan) for m in TRANSFER_METRICS)
            ps = [p for p in ps if not math.isnan(p)]
            p_decision = ps[min_metrics - 1] if len(ps) >= min_metrics else 1.0
            n_equiv = len(equiv.get((setup, ts, cond), ()))
            shown = (TRANSFER_SHOWN if supported else NO_TRANSFER
                     if n_equiv >= len(TRANSFER_METRICS) - min_metrics + 1 else INCONCLUSIVE)
            best = best_control(cond, conds, exclude_below)
            ref = conds[best] if best is not None else runs.iloc[0:0]
            cor, inc = paired(runs, ref, "correct_agreement"), paired(runs, ref, "incorrect_agreement")
            dc, dc_sem, _ = mean_sem(cor.d)
            di, di_sem, _ = mean_sem(inc.d)
            both, ic, ii = np.intersect1d(cor.seeds, inc.seeds, return_indices=True)
            gain = mean_sem(paired(runs, ref, "prediction_agreement").d)[0]
            tie = Tie.of(inc.x, inc.y, cor.x, cor.y)
            asym_d = inc.d[ii] - cor.d[ic]
            p_asym, asym_null = signed_rank_test(asym_d, "two-sided", *tie)
            p_neg = signed_rank_test(asym_d, "greater", *tie)[0]
            asym_seeds = sizing.seeds_needed(sesoi["asymmetry"], sizing.pilot_sd(effects.snap_ties(asym_d, *tie)),
                                             level, two_sided=True) if supported else math.nan
            rows.append(dict(
                setup=setup, teacher_seed=ts, condition=cond, n_significant=n_sig, supported=supported,
                marginal=_marginal(supported, gain, threshold), pa_gain=gain,
                delta_correct=dc, delta_correct_sem=dc_sem, delta_incorrect=di, delta_incorrect_sem=di_sem,
                n_pairs=len(both), asymmetry=_asymmetry(supported, dc, di, p_asym, p_neg, level),
                p_asymmetry=p_asym, asymmetry_null=asym_null, asymmetry_seeds=asym_seeds,
                n_equivalent=n_equiv, verdict=shown, p_decision=p_decision,
                best_control=best))
    return pd.DataFrame(rows, columns=[
        "setup", "teacher_seed", "condition", "n_significant", "supported", "marginal", "pa_gain",
        "delta_correct", "delta_correct_sem", "delta_incorrect", "delta_incorrect_sem", "n_pairs",
        "asymmetry", "p_asymmetry", "asymmetry_null", "asymmetry_seeds", "n_equivalent", "verdict", "p_decision", "best_control"])


@dataclass
class Analysis:
    """Everything a report shows, computed once from the runs."""
    runs: pd.DataFrame
    students: pd.DataFrame
    teachers: pd.DataFrame
    excluded: pd.DataFrame
    summary: pd.DataFrame
    tests: pd.DataFrame
    against: pd.DataFrame
    decisions: pd.DataFrame
    best_accuracy: pd.DataFrame
    threshold: float = 0.01
    exclude_below: Optional[float] = None
    level: float = LEVEL
    notes: list = field(default_factory=list)
    min_metrics: int = SUPPORT_MIN
    correction: str = corrections.DEFAULT
    power: pd.DataFrame = field(default_factory=pd.DataFrame)        # power.power_curves
    pooled: pd.DataFrame = field(default_factory=pd.DataFrame)       # pooled.pooled_tests
    statements: pd.DataFrame = field(default_factory=pd.DataFrame)   # pooled.statements
    plugins: tuple = ()                                               # modules declaring plug-in conditions
    sesoi: dict = field(default_factory=lambda: dict(sizing.SESOI))   # smallest effect of interest per metric
    decision_correction: str = "none"                                 # over each setup's decisions
    each: list = field(default_factory=list)                          # pipeline.analyse's each(setup), per setup

    def for_setup(self, setup: str) -> "Analysis":
        """The same analysis restricted to one setup (what a worker needs to draw its figures)."""
        def only(frame: pd.DataFrame) -> pd.DataFrame:
            return frame[frame["setup"] == setup] if "setup" in frame else frame

        return replace(self, **{f.name: only(getattr(self, f.name)) for f in fields(self)
                                if isinstance(getattr(self, f.name), pd.DataFrame)})


def _notes(tests: pd.DataFrame, level: float, correction: str = corrections.DEFAULT) -> list[str]:
    if not len(tests):
        return []
    n = int(tests.groupby(["setup", "teacher_seed"])["n"].max().min())
    w = significance_warning(n, level, correction=correction)
    return [w] if w else []


DECISION_CORRECTIONS = ("none", "holm", "bh")


def correct_decisions(dec: pd.DataFrame, method: str, level: float = LEVEL, min_metrics: int = SUPPORT_MIN,
                      threshold: float = 0.01) -> pd.DataFrame:
    """Decisions with a correction over the family of decisions of each setup (every treated condition,
    alpha, temperature and teacher seed in it): ``p_decision`` adjusted by Holm (family-wise error rate)
    or BH (false discovery rate of the decisions); ``supported`` then means p_decision_adj <= level
    (the uncorrected call kept as ``supported_uncorrected``), and the verdict, marginal and asymmetry
    follow it.  "none" leaves the decisions as they are."""
    dec = dec.copy()
    dec["supported_uncorrected"] = dec["supported"].astype(bool)
    if method == "none" or not len(dec):
        dec["p_decision_adj"] = dec["p_decision"]
        return dec
    adj = pd.Series(np.nan, index=dec.index)
    for _, ix in dec.groupby(dec["setup"].astype(str)).groups.items():
        adj[ix] = corrections.adjust(dec.loc[ix, "p_decision"].to_numpy(float), method)
    dec["p_decision_adj"] = adj
    lost = dec["supported_uncorrected"] & ~(adj <= level)
    dec.loc[lost, "supported"] = False
    dec.loc[lost, "marginal"] = False
    dec.loc[lost, "asymmetry"] = "none"
    dec.loc[lost, "verdict"] = INCONCLUSIVE
    return dec


def decision_family_text(method: str, dec: pd.DataFrame) -> str:
    """The family the decision correction runs over, named for the summary."""
    if method == "none":
        return ("decisions: no correction over the decisions (each setup's treated conditions x alphas x "
                "temperatures x teacher seeds); see docs/statistics.md for the rule's error rates")
    sizes = dec.groupby(dec["setup"].astype(str)).size()
    fam = ", ".join(f"{k} {v}" for k, v in sizes.items())
    return (f"decisions: {corrections.CORRECTIONS[method]} over the decisions of each setup (treated "
            f"conditions x alphas x temperatures x teacher seeds: {fam})")
