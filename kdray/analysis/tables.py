"""The paper's tables as plain data, rendered to Markdown, CSV, LaTeX and HTML.

A Table is a header, string cells and the set of cells to set in bold; the
renderers differ only in markup, so the four formats cannot disagree.
"""
from __future__ import annotations

import csv
import html
import io
import math
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd

from kdray.analysis import corrections, power, sizing
from kdray.analysis.effects import CI_LEVEL
from kdray.analysis.stats import TESTED_METRICS, Analysis, Condition, direction, metric_columns
from kdray.metric_names import TRANSFER_METRICS

TICK, CROSS, UNTESTED = "✓", "–", "·"
ARROWS = {"lower": "↓", "higher": "↑"}


@dataclass
class Table:
    name: str                                  # file stem
    title: str
    header: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)   # (row, column) cells in bold
    note: str = ""

    def markdown(self) -> str:
        def cell(i, j, v):
            return f"**{v}**" if (i, j) in self.bold else v.replace("|", "\\|")
        lines = [f"### {self.title}", ""] + ([self.note, ""] if self.note else [])
        lines += ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(cell(i, j, v) for j, v in enumerate(r)) + " |" for i, r in enumerate(self.rows)]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.header)
        w.writerows(self.rows)
        return buf.getvalue()

    def latex(self) -> str:
        def cell(i, j, v):
            v = tex(v)
            return f"\\textbf{{{v}}}" if (i, j) in self.bold else v
        out = [f"% {self.title}", "\\begin{tabular}{l" + "r" * (len(self.header) - 1) + "}", "\\toprule",
               " & ".join(tex(h) for h in self.header) + " \\\\", "\\midrule"]
        out += [" & ".join(cell(i, j, v) for j, v in enumerate(r)) + " \\\\" for i, r in enumerate(self.rows)]
        out += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(out) + "\n"

    def html(self) -> str:
        def cell(i, j, v):
            v = html.escape(v)
            return f"<td><b>{v}</b></td>" if (i, j) in self.bold else f"<td>{v}</td>"
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(cell(i, j, v) for j, v in enumerate(r)) + "</tr>" for i, r in enumerate(self.rows))
        note = f"<p>{html.escape(self.note)}</p>" if self.note else ""
        return f"<h3 id='{self.name}'>{html.escape(self.title)}</h3>{note}<table><tr>{head}</tr>{body}</table>"


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
        "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "±": r"$\pm$", "α": r"$\alpha$",
        "ε": r"$\varepsilon$", "Δ": r"$\Delta$", "↓": r"$\downarrow$", "↑": r"$\uparrow$", "✓": r"\checkmark{}",
        "–": "--", "·": r"$\cdot$"}


def tex(s: str) -> str:
    """Escape LaTeX specials and map the Unicode symbols the tables use (needs booktabs, amssymb)."""
    return "".join(_TEX.get(ch, ch) for ch in s)


def fmt(x: float, digits: int = 4) -> str:
    return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def fmt_ms(mean: float, sem: float) -> str:
    """'mean ± sem' with the SEM to two significant digits and the mean to the same decimals
    (just the mean when there is no SEM: one run, or all runs equal)."""
    if mean is None or math.isnan(mean) or sem is None or math.isnan(sem) or sem <= 0:
        return fmt(mean)
    dec = min(8, max(0, 1 - math.floor(math.log10(sem))))
    return f"{mean:.{dec}f} ± {sem:.{dec}f}"


def metric_header(metric: str) -> str:
    return f"{metric} {ARROWS[direction(metric)]}" if direction(metric) in ARROWS else metric


def slug(*parts) -> str:
    return "_".join(str(p) for p in parts).replace(" ", "-").replace("/", "-")


# ------------------------------------------------------------------ tables

def metric_tables(a: Analysis) -> list[Table]:
    """Per setup and teacher seed: conditions x metrics, mean ± SEM, best mean per column in bold."""
    out = []
    metrics = metric_columns(a.students)
    s = a.summary
    for (setup, ts), grp in s.groupby(["setup", "teacher_seed"], sort=True):
        conds = sorted(set(grp["condition"]), key=lambda c: c.sort_key)
        cols = [m for m in metrics if m in set(grp["metric"])]
        cell = {(r.condition, r.metric): r for r in grp.itertuples()}
        rows, bold = [], set()
        for i, c in enumerate(conds):
            n = max((cell[(c, m)].n for m in cols if (c, m) in cell), default=0)
            rows.append([c.label, str(n)] + [fmt_ms(cell[(c, m)].mean, cell[(c, m)].sem) if (c, m) in cell else ""
                                             for m in cols])
        for j, m in enumerate(cols):
            d = direction(m)
            means = {i: cell[(c, m)].mean for i, c in enumerate(conds) if (c, m) in cell}
            if d and means:
                best = (min if d == "lower" else max)(means.values())
                bold |= {(i, j + 2) for i, v in means.items() if v == best}
        out.append(Table(slug("metrics", setup, f"t{ts}"), f"{setup}, teacher seed {ts}: mean ± SEM over student seeds",
                         ["condition", "n"] + [metric_header(m) for m in cols], rows, bold,
                         note="Best mean per column in bold."))
    return out


def tick_tables(a: Analysis) -> list[Table]:
    """Per setup: treated condition x tested metric, one mark per teacher seed (✓ significant
    against every control, – not, · not tested)."""
    out = []
    ag = a.against
    for setup in sorted(set(a.decisions["setup"])):
        seeds = sorted(set(a.decisions.loc[a.decisions["setup"] == setup, "teacher_seed"]))
        rows_here = ag[ag["setup"] == setup]
        sig = {(r.teacher_seed, r.condition, r.metric): r.significant for r in rows_here.itertuples()}
        conds = sorted(set(a.decisions.loc[a.decisions["setup"] == setup, "condition"]), key=lambda c: c.sort_key)
        rows = []
        for c in conds:
            row = [c.label]
            for m in TESTED_METRICS:
                marks = [UNTESTED if (ts, c, m) not in sig else TICK if sig[(ts, c, m)] else CROSS for ts in seeds]
                row.append("".join(marks))
            rows.append(row)
        out.append(Table(slug("ticks", setup), f"{setup}: significant against every control "
                         f"(one mark per teacher seed {', '.join(map(str, seeds))})",
                         ["condition"] + [metric_header(m) for m in TESTED_METRICS], rows,
                         note=f"{TICK} significant against every control, {CROSS} not, {UNTESTED} not tested; "
                              f"{corrections.family_text(a.correction)}; level {a.level:g}. "
                              f"Effect sizes in the table below."))
    return out


TINY = 1e-300           # a bound this close to 0 is "just above (below) 0": the interval is open there


def fmt_ci(est: float, low: float, high: float) -> str:
    """'est [low, high]': an end at +-inf (no bound: too few pairs) as inf, an end that is the float
    just beside 0 (effects.lower_bound: 0 itself rejected) as an open '(0' or '0)'."""
    left = "(0" if 0 < low < TINY else "[" + fmt(low, 3)
    right = "0)" if -TINY < high < 0 else fmt(high, 3) + "]"
    return f"{fmt(est, 3)} {left}, {right}"


def effect_tables(a: Analysis) -> dict[str, Table]:
    """Per setup: every paired comparison's effect sizes, one cell per tested metric (what the ticks rest on)."""
    out = {}
    for setup, t in a.tests.groupby("setup", sort=True):
        cell = {(r.teacher_seed, r.condition, r.control, r.metric): r for r in t.itertuples()}
        keys = sorted({k[:3] for k in cell}, key=lambda k: (k[0], k[1].sort_key, k[2].sort_key))
        rows = [[str(ts), c.label, ctrl.label] + [
            f"{fmt_ci(r.hl, r.ci_low, r.ci_high)}; r={fmt(r.rank_biserial, 2)}; P={fmt(r.superiority, 2)}"
            if (r := cell.get((ts, c, ctrl, m))) is not None else "" for m in TESTED_METRICS] for ts, c, ctrl in keys]
        out[setup] = Table(slug("effects", setup), f"{setup}: effect sizes of every paired comparison",
                           ["teacher seed", "condition", "control"] + [metric_header(m) for m in TESTED_METRICS], rows,
                           note=f"Hodges-Lehmann shift (condition - control, the metric's units) with its "
                                f"{1 - 2 * a.level:.0%} interval: the two one-sided {1 - a.level:.0%} bounds that "
                                f"invert the exact tie-aware signed-rank test the ticks use, so a tick never "
                                f"sits beside an interval that covers 0 (inf: no bound, too few pairs; "
                                f"(0 or 0): open at 0); "
                                f"r: matched-pairs rank-biserial correlation, P: probability the condition beats "
                                f"the control on a random seed (both +1 / 1 when it is better on every seed).")
    return out


def pooled_tables(a: Analysis) -> dict[str, Table]:
    """Per setup: each comparison's mean difference pooled over teacher seeds, with its bootstrap CI."""
    out = {}
    for setup, t in a.pooled.groupby("setup", sort=True):
        cell = {(r.condition, r.control, r.metric): r for r in t.itertuples()}
        keys = sorted({k[:2] for k in cell}, key=lambda k: (k[0].sort_key, k[1].sort_key))
        rows = [[c.label, ctrl.label, str(max(r.teacher_seeds for k, r in cell.items() if k[:2] == (c, ctrl)))] + [
            fmt_ci(r.estimate, r.ci_low, r.ci_high) + fmt_re(r) if (r := cell.get((c, ctrl, m))) is not None else ""
            for m in TESTED_METRICS] for c, ctrl in keys]
        out[setup] = Table(slug("pooled", setup), f"{setup}: paired differences pooled over teacher seeds",
                           ["condition", "control", "teacher seeds"] + [metric_header(m) for m in TESTED_METRICS],
                           rows, note=f"Mean over teacher seeds of the mean paired difference (condition - control), "
                                      f"{CI_LEVEL:.0%} CI for these teacher seeds (Welch t); with 3 or more "
                                      f"teacher seeds also a {CI_LEVEL:.0%} CI for teachers like these (teacher as "
                                      f"a random factor: t on the teacher seeds' means), after 'like these'.")
    return out


def statement_table(a: Analysis) -> Table:
    """One line per setup and treated condition, over all its teacher seeds."""
    rows = [[r.setup, r.condition.label, f"{r.supported_seeds}/{r.teacher_seeds}",
             fmt_ci(r.pa_gain, r.ci_low, r.ci_high) + fmt_re(r)] for r in a.statements.itertuples()]
    return Table("pooled", "Pooled over teacher seeds", ["setup", "condition", "supported on teacher seeds",
                                                          "PA gain over the best control"], rows,
                 note=f"PA gain: mean over teacher seeds of the prediction-agreement gain over that seed's best "
                      f"control, {CI_LEVEL:.0%} CI for these teacher seeds (Welch t); with 3 or more teacher "
                      f"seeds also the {CI_LEVEL:.0%} CI for teachers like these (random effects).")


POWER_SHOWN = (5, 10, 15, 20, 25, 30)


def fmt_re(r) -> str:
    """'; like these [low, high]' where a random-effects interval exists (3+ teacher seeds), else ''."""
    lo, hi = getattr(r, "re_low", math.nan), getattr(r, "re_high", math.nan)
    return "" if lo != lo else f"; like these [{fmt(lo, 3)}, {fmt(hi, 3)}]"


def fmt_seeds(n: float) -> str:
    return f">{max(power.SEED_RANGE)}" if n != n else str(int(n))


def fmt_seeds_at(n: float, label: str = "") -> str:
    """Seeds sizing.seeds_needed found ('>200' when none up to MAX_SEEDS; blank where not asked)."""
    if label == "none":
        return ""
    return f">{sizing.MAX_SEEDS}" if n != n else str(int(n))


def fmt_power(p: float, low: float, high: float) -> str:
    """'0.62 (0.31-0.85)': the power with its range over the noise estimate's 95% interval."""
    return f"{fmt(p, 2)} ({fmt(low, 2)}-{fmt(high, 2)})"


def power_table(a: Analysis) -> Table:
    """Per decision: the power to support transfer at the SESOI at several student-seed counts, and the
    count needed (as estimated, and with the noise at its upper 95% limit)."""
    rows = []
    for setup, ts, cond, c, i in power.decision_curves(a.power):
        at = dict(zip(c["n_seeds"], c["power"]))
        rows.append([setup, str(ts), cond.label,
                     f"{fmt_power(c['power'][i], c['power_low'][i], c['power_high'][i])} [{c['pilot_seeds'][i]}]"]
                    + [fmt(at.get(n, float("nan")), 2) for n in POWER_SHOWN]
                    + [f"{fmt_seeds(power.seeds_reaching(c['n_seeds'], c['power']))} ({fmt_seeds(c['seeds_low'][0])})"])
    sesoi = ", ".join(f"{m} {a.sesoi[m]:g}" for m in TRANSFER_METRICS)
    return Table("power", f"Power to support transfer at the SESOI ({corrections.SHORT[a.correction]})",
                 ["setup", "teacher seed", "condition", "now [seeds]"] + [f"{n} seeds" for n in POWER_SHOWN]
                 + [f"seeds for {power.TARGET:.0%}"], rows,
                 note=f"Probability that a study of that many student seeds supports transfer (at least "
                      f"{a.min_metrics} of 4 functional metrics significant against every control) if every "
                      f"functional metric is better than every control by its smallest effect of interest "
                      f"({sesoi}). Simulated with this sweep's noise only (the covariance of its per-seed "
                      f"differences; its own effect is not used); in brackets the range with the noise at the "
                      f"ends of its 95% interval, and the seeds needed with the noise at its upper limit.")


def decision_table(a: Analysis) -> Table:
    """One row per (setup, teacher seed, treated condition): the transfer and asymmetry calls."""
    best_acc = {(r.setup, r.teacher_seed, r.width): r for r in a.best_accuracy.itertuples()}
    rows = []
    for r in a.decisions.itertuples():
        b = best_acc.get((r.setup, r.teacher_seed, r.condition.width))
        rows.append([r.setup, str(r.teacher_seed), r.condition.label, "yes" if r.supported else "no", r.verdict,
                     "yes" if r.marginal else "no", fmt(r.pa_gain, 3),
                     fmt_ms(r.delta_correct, r.delta_correct_sem), fmt_ms(r.delta_incorrect, r.delta_incorrect_sem),
                     r.asymmetry, fmt(r.p_asymmetry, 3), fmt_seeds_at(r.asymmetry_seeds, r.asymmetry),
                     r.best_control.label if r.best_control else "none",
                     b.condition.label if b is not None else "",
                     fmt_power(r.power, r.power_low, r.power_high),
                     f"{fmt_seeds(r.seeds_for_power)} ({fmt_seeds(r.seeds_for_power_low)})"])
    return Table("decisions", "Transfer decisions",
                 ["setup", "teacher seed", "condition", "supported", "verdict", "marginal", "PA gain", "Δcorrect", "Δincorrect",
                  "asymmetry", "p(asym)", f"asym. seeds for {sizing.TARGET:.0%}", "best control", "best accuracy", "power",
                  f"seeds for {power.TARGET:.0%}"], rows,
                 note=f"Supported: at least {a.min_metrics} of {len(TRANSFER_METRICS)} functional metrics significant "
                      f"against every control ({corrections.family_text(a.correction)}). "
                      f"Verdict: transfer shown (supported); no transfer larger than the SESOI shown (on at least "
                      f"{len(TRANSFER_METRICS) - a.min_metrics + 1} functional metrics an equivalence test, TOST at "
                      f"level {a.level:g}, shows the difference from some control within the metric's smallest "
                      f"effect of interest: {', '.join(f'{m} {a.sesoi[m]:g}' for m in TRANSFER_METRICS)}); "
                      f"otherwise inconclusive. "
                      f"Power: probability of support at this many seeds if every functional metric is better "
                      f"than every control by its SESOI, with this sweep's noise (range: the noise at the ends of "
                      f"its 95% interval; power table); seeds for {power.TARGET:.0%}: as estimated (noise at "
                      f"its upper limit). "
                      f"Marginal: supported but prediction-agreement gain over the best control < {a.threshold:g}. "
                      f"p(asym): two-sided paired Wilcoxon of Δincorrect - Δcorrect; asymmetry named "
                      f"(negative/positive) only where p(asym) <= {a.level:g}, else its direction with n.s.; "
                      f"asym. seeds: the seeds that test needs for {sizing.TARGET:.0%} power at an asymmetry of "
                      f"{sizing.SESOI['asymmetry']:g} with this sweep's noise.")


def teacher_table(a: Analysis) -> Table:
    t = a.teachers.sort_values(["setup", "teacher_seed"])
    metrics = [m for m in metric_columns(t) if m in t and t[m].notna().any()]
    rows = [[r["setup"], str(r["teacher_seed"])] + [fmt(r[m], 6) for m in metrics] for _, r in t.iterrows()]
    return Table("teachers", "Teachers", ["setup", "teacher seed"] + [metric_header(m) for m in metrics], rows)


def excluded_table(a: Analysis) -> Table:
    rows = [[str(v) for v in (r.setup, r.teacher_seed, r.condition, r.student_seed, r.trial_key, r.reason)]
            for r in a.excluded.itertuples()]
    return Table("excluded", f"Excluded or partly excluded runs ({len(rows)})",
                 ["setup", "teacher seed", "condition", "student seed", "trial key", "reason"], rows)


def setup_tables(a: Analysis) -> tuple[list[Table], list[Table]]:
    """(ticks, effects and pooled tables per setup; metric tables per setup and teacher seed) of an
    analysis of any setups, each in setup order: an analysis of several setups gives what its
    setups' analyses give one after the other (so report workers can make them, see all_tables)."""
    effects, pooled = effect_tables(a), pooled_tables(a)
    setups = sorted(set(a.decisions["setup"]))              # tick_tables' order: one table per setup
    per_setup = [t for setup, tick in zip(setups, tick_tables(a))
                 for t in (tick, effects.get(setup), pooled.get(setup)) if t is not None]
    return per_setup, metric_tables(a)


def all_tables(a: Analysis, parts: Optional[list] = None) -> list[Table]:
    """Every table, in the report's order; ``parts``: setup_tables of each setup's analysis, in setup
    order, when the workers that analysed them made them already."""
    per_setup, metric = setup_tables(a) if parts is None else ([t for p in parts for t in p[0]],
                                                             [t for p in parts for t in p[1]])
    return [decision_table(a), statement_table(a), power_table(a), *per_setup, *metric,
            teacher_table(a), excluded_table(a)]


def tidy(df: pd.DataFrame) -> pd.DataFrame:
    """A frame with Condition objects replaced by their labels, for machine-readable CSVs."""
    df = df.copy()
    for col in ("condition", "control", "best_control"):
        if col in df:
            df[col] = [c.label if isinstance(c, Condition) else ("" if c is None else c) for c in df[col]]
    return df
