"""``kdray report``: a sweep's MLflow runs -> tables, figures, one HTML page, a terminal summary.

Layout of the output folder::

    index.html            self-contained: tables inline, figures as data URIs
    summary.txt           what the terminal shows
    tables/<name>.md|csv|tex
    figures/<name>.png|svg
    data/{runs,summary,tests,decisions,excluded,power,pooled,statements}.csv   tidy, for scripts

The folder is also logged as the artifacts of a ``kdray.kind=report`` run
under the sweep's parent run, so the report travels with the runs.
"""
from __future__ import annotations

import base64
import functools
import html
import math
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import pandas as pd

from kdray.analysis import corrections, figures, power, provenance, tables
from kdray.analysis.scope import Scope, scope_to_plan, split_cohorts
from kdray import plugins
from kdray.analysis.runs import ReportError, get_experiment, load_runs, resolve_experiment, sweep_plugins
from kdray.registry import PluginError
from kdray.analysis.pipeline import analyse
from kdray.analysis.stats import NO_TRANSFER, SUPPORT_MIN, Analysis, asymmetry_text, decision_family_text
from kdray.contracts import KIND_REPORT, KIND_SWEEP, TAG_KIND, TAG_PARENT, TAG_SWEEP_SHA
from kdray.sanity import report_lines

SHOW_EXCLUDED = 8                    # excluded runs listed in the terminal summary


@dataclass
class ReportResult:
    out_dir: Path
    analysis: Analysis
    files: list[Path] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)     # per phase
    sanity: list = field(default_factory=list)      # teachers vs chance, suspect trials (kdray/sanity.py)
    scope: Optional[Scope] = None                   # which runs answer the question (scope.py)
    _summary: Optional[str] = field(default=None, repr=False)

    @property
    def index(self) -> Path:
        return self.out_dir / "index.html"

    def summary_text(self) -> str:
        """One line per setup: which conditions transfer on which teacher seeds (marginal,
        asymmetry), and which condition has the best accuracy (the paper's "RCD is often best").
        Computed once (the report writes it and prints it; at 200 setups it takes seconds)."""
        if self._summary is None:
            self._summary = self._summary_lines()
        return self._summary

    def _summary_lines(self) -> str:
        a = self.analysis
        lines = [f"kdray report: {len(a.students)} student and {len(a.teachers)} teacher runs used, "
                 f"{len(a.excluded)} excluded or partly excluded",
                 "transfer: condition [supporting teacher seeds, (m) marginal; asymmetry]"]
        decisions, best, statements = (_by_setup(f) for f in (a.decisions, a.best_accuracy, a.statements))
        for setup in sorted(set(a.students["setup"])):
            d = decisions.get(setup, a.decisions.iloc[0:0])
            lines.append(f"{setup}: {_transfer_text(d)} | {_best_text(best.get(setup, a.best_accuracy.iloc[0:0]))}")
            lines += _pooled_lines(statements.get(setup, a.statements.iloc[0:0]), d)
        nulls = a.tests["null"].value_counts()
        lines.append(f"statistics: {corrections.family_text(a.correction)}; level {a.level:g}; p-values "
                     + ", ".join(f"{k} {v}" for k, v in nulls.items() if k) + " (null distribution used)")
        lines.append(decision_family_text(a.decision_correction, a.decisions))
        if len(a.excluded):
            lines.append(f"excluded ({len(a.excluded)}):")
            for r in a.excluded.head(SHOW_EXCLUDED).itertuples():
                lines.append(f"  {r.setup} t{r.teacher_seed} {r.condition} seed {r.student_seed}: {r.reason}")
            if len(a.excluded) > SHOW_EXCLUDED:
                lines.append(f"  ... and {len(a.excluded) - SHOW_EXCLUDED} more (tables/excluded.md)")
        lines += [f"warning: {n}" for n in a.notes]
        lines += self.sanity
        lines += self.scope.lines() if self.scope else []
        lines += provenance.summary_lines(a.runs, a.tests)
        lines.append(f"report: {self.index}")
        return "\n".join(lines)


def _counted(items: list[str]) -> str:
    """'negative ×2, positive' from ['negative', 'positive', 'negative'], first-seen order."""
    return ", ".join(f"{x} ×{items.count(x)}" if items.count(x) > 1 else x for x in dict.fromkeys(items))


def _by_setup(frame: pd.DataFrame) -> dict:
    """{setup: its rows}, split once (a boolean mask per setup is quadratic in the setups)."""
    return dict(tuple(frame.groupby("setup", sort=False))) if len(frame) else {}


def _transfer_text(d: pd.DataFrame) -> str:
    rows: dict = {}
    for r in d.itertuples():
        rows.setdefault(r.condition, []).append(r)
    conds = sorted(rows, key=lambda c: c.sort_key)
    parts = []
    for cond in conds:
        sup = [r for r in rows[cond] if r.supported]
        if sup:
            seeds = " ".join(f"t{r.teacher_seed}" + ("(m)" if r.marginal else "") for r in sup)
            parts.append(f"{cond.label} [{seeds}; {_asymmetry_words(sup)}]")
    absent = [f"{cond.label} [{' '.join(f't{r.teacher_seed}' for r in rs)}]"
              for cond in conds if (rs := [r for r in rows[cond] if r.verdict == NO_TRANSFER])]
    text = "transfer " + ", ".join(parts) if parts else "no supported transfer"
    return text + ("; no transfer larger than the SESOI shown: " + ", ".join(absent) if absent else "")


def _asymmetry_words(sup: list) -> str:
    """'negative asymmetry ×2' for the teacher seeds whose asymmetry test is significant; each other
    seed by itself, with its p and the seeds its test would need at the SESOI (stats.asymmetry_text)."""
    shown = [f"{r.asymmetry} asymmetry" for r in sup if r.asymmetry in ("negative", "positive")]
    rest = [f"t{r.teacher_seed} {asymmetry_text(r.asymmetry, r.p_asymmetry, r.asymmetry_seeds)}"
            for r in sup if r.asymmetry not in ("negative", "positive")]
    return ", ".join(([_counted(shown)] if shown else []) + rest)


def _pooled_lines(st: pd.DataFrame, d: pd.DataFrame) -> list[str]:
    """The pooled statement and the power statement of one setup, a line each."""
    if st.empty:
        return []
    pooled = ", ".join(f"{r.condition.label} {r.supported_seeds}/{r.teacher_seeds} "
                       f"{tables.fmt_ci(r.pa_gain, r.ci_low, r.ci_high)}{tables.fmt_re(r)}" for r in st.itertuples())
    need = []
    for cond in sorted(set(d["condition"]), key=lambda c: c.sort_key):
        rs = d[[c == cond for c in d["condition"]]]
        n, hi = rs["seeds_for_power"], rs["seeds_for_power_low"]
        most = tables.fmt_seeds(math.nan if n.isna().any() else n.max())
        most_hi = tables.fmt_seeds(math.nan if hi.isna().any() else hi.max())
        need.append(f"{cond.label} {most} ({most_hi}; now {tables.fmt(rs['power'].min(), 2)})")
    return [f"  pooled over teacher seeds: condition supported/seeds PA gain [95% CI for these teacher seeds; "
            f"for teachers like these, 3+ seeds]: {pooled}",
            f"  seeds for {power.TARGET:.0%} power to support transfer at the SESOI (noise at its upper 95% limit; "
            f"lowest power now): {', '.join(need)}"]


def _best_text(b: pd.DataFrame) -> str:
    if b.empty:
        return "best accuracy: n/a"
    labels = [r.condition.label for r in b.itertuples()]
    return f"best accuracy {_counted(labels)} (an RCD control in {int(b['is_rcd'].sum())}/{len(b)})"


# ------------------------------------------------------------------ writing

def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _table_files(out: Path, t: tables.Table) -> list[Path]:
    return [out / "tables" / f"{t.name}.{ext}" for ext in ("md", "csv", "tex")]


def _write_table(out: Path, t: tables.Table) -> list[Path]:
    """The table as Markdown, CSV and LaTeX files."""
    files = _table_files(out, t)
    for path, text in zip(files, (t.markdown(), t.csv(), t.latex())):
        _write(path, text)
    return files


def _setup_tables_written(out: Path, a: Analysis) -> tuple[list, list]:
    """tables.setup_tables of one setup's analysis, written to out/tables (by the report worker that
    analysed the setup, so the parent only writes the tables across setups)."""
    parts = tables.setup_tables(a)
    for group in parts:
        for t in group:
            _write_table(out, t)
    return parts


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


_CSS = ("body{font-family:sans-serif;margin:2em;max-width:110em}table{border-collapse:collapse;margin:.5em 0 1.5em}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right;font-size:13px}td:first-child{text-align:left}"
        "img{max-width:100%}pre{background:#f6f6f6;padding:1em}")


def _html(title: str, summary: str, tabs: list[tables.Table], figs: list[tuple[str, list[Path]]], root: Path) -> str:
    def link(p: Path) -> str:
        rel = p.relative_to(root).as_posix()
        return f"<a href='{html.escape(rel)}'>{html.escape(p.suffix[1:])}</a>"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<pre>{html.escape(summary)}</pre><h2>Tables</h2>"]
    for t in tabs:
        files = " ".join(link(root / "tables" / f"{t.name}.{ext}") for ext in ("md", "csv", "tex"))
        parts.append(t.html() + f"<p>{files}</p>")
    parts.append("<h2>Figures</h2>")
    for name, (png, svg) in figs:
        parts.append(f"<h3>{html.escape(name)}</h3><img alt='{html.escape(name)}' src='{_data_uri(png)}'>"
                     f"<p>{link(png)} {link(svg)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


# Above this many setups a report draws no per-setup figures unless asked (--figures all): at
# 5 figures a setup, 200 setups are 1,000 figures (minutes of drawing) that no reader pages through.
FIGURE_SETUPS = 24


def build_report(df: pd.DataFrame, out_dir: str | Path, threshold: float = 0.01,
                 exclude_below: Optional[float] = None, title: str = "kdray report", pool=None,
                 correction: str = corrections.DEFAULT, min_metrics: int = SUPPORT_MIN,
                 sesoi: Optional[dict] = None, decision_correction: str = "none",
                 figures_for: str = "auto") -> ReportResult:
    """Analyse the runs and write every table, figure and the HTML page into out_dir
    (setups analysed and their figures drawn by the process ``pool`` when given, see report_pool).
    ``figures_for``: "all" setups, "none", or "auto": all up to FIGURE_SETUPS setups, none above."""
    out = Path(out_dir)
    clock = _Clock()
    a = analyse(df, threshold=threshold, exclude_below=exclude_below, map_=pool.map if pool else map,
                correction=correction, min_metrics=min_metrics, sesoi=sesoi,
                decision_correction=decision_correction,
                each=functools.partial(_setup_tables_written, out) if pool else None)
    a.tests["fingerprint_mismatches"] = provenance.mismatches(a.students, a.tests)
    result = ReportResult(out, a, seconds=clock.seconds, sanity=report_lines(df.to_dict("records")),
                          scope=df.attrs.get("scope"))
    clock.lap("analysis")
    files = result.files
    n_setups = a.students["setup"].nunique()
    draw = figures_for == "all" or (figures_for == "auto" and n_setups <= FIGURE_SETUPS)
    pending = figures.all_figures(a, out / "figures", pool) if draw else iter(())   # drawn by the workers meanwhile
    if not draw and n_setups:
        a.notes.append(f"figures not drawn ({n_setups} setups, {len(figures.FIGURES)} figures each; drawn by "
                       f"default up to {FIGURE_SETUPS} setups): `kdray report ... --figures all` draws them")
    tabs = tables.all_tables(a, a.each or None)
    written = {t.name for part in a.each for group in part for t in group}    # by the workers
    for t in tabs:
        files += _write_table(out, t) if t.name not in written else _table_files(out, t)
    for name, frame in (("runs", a.runs), ("summary", a.summary), ("tests", a.tests),
                        ("decisions", a.decisions), ("excluded", a.excluded), ("power", a.power),
                        ("pooled", a.pooled), ("statements", a.statements)):
        files.append(_write(out / "data" / f"{name}.csv", tables.tidy(frame).to_csv(index=False)))
    clock.lap("tables")
    figs = list(pending)
    files += [p for _, paths in figs for p in paths]
    clock.lap("figures")
    summary = result.summary_text()
    files.append(_write(out / "summary.txt", summary + "\n"))
    files.append(_write(result.index, _html(title, summary, tabs, figs, out)))
    clock.lap("html")
    return result


class _Clock:
    """Seconds per phase, for the progress line."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = now - self._t
        self._t = now


# ------------------------------------------------------------------ MLflow and CLI

def provenance_tags(result: ReportResult) -> dict[str, str]:
    """What the report run records of its question: the sweep file's hash and scope, the
    fingerprints, data and checkpoint checksums of the runs it used."""
    runs = result.analysis.runs
    def distinct(col: str) -> str:
        return ",".join(sorted({v for v in runs.get(col, ()) if isinstance(v, str) and v}))
    tags = {"kdray.fingerprints": distinct("fingerprint"), "kdray.data_sha256s": distinct("data_sha256"),
            "kdray.checkpoint_sha256s": distinct("checkpoint")}
    if result.scope is not None:
        tags["kdray.scope"] = result.scope.source
        if result.scope.sweep_sha256:
            tags[TAG_SWEEP_SHA] = result.scope.sweep_sha256
    return {k: v[:8000] for k, v in tags.items() if v}


def log_report_to_mlflow(tracking_uri: str, experiment: str, out_dir: str | Path, extra_tags: Optional[dict] = None,
                         experiment_id: Optional[str] = None) -> str:
    """Log out_dir as the artifacts of a new report run (child of the sweep run if there is one);
    ``experiment_id`` when the caller has looked the experiment up already."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    exp_id = experiment_id or get_experiment(tracking_uri, experiment).experiment_id
    parents = client.search_runs([exp_id], f"tags.`{TAG_KIND}` = '{KIND_SWEEP}'", max_results=1)
    tags = {TAG_KIND: KIND_REPORT, **(extra_tags or {})}
    if parents:
        tags[TAG_PARENT] = parents[0].info.run_id
    run = client.create_run(exp_id, tags=tags, run_name="report")
    try:
        client.log_artifacts(run.info.run_id, str(out_dir))
    except Exception:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def default_out(storage: str, experiment: str) -> Path:
    """<storage>/<sweep>/report, or ./<sweep>-report when storage is remote (s3://, gs://)."""
    return Path(f"{experiment}-report") if "://" in storage else Path(storage).expanduser() / experiment / "report"


@contextmanager
def report_pool(jobs: Optional[int] = None) -> Iterator[Optional[Executor]]:
    """Worker processes that fetch runs and draw figures (``jobs``, default one per core; 1: none).

    Where the platform can fork, they are forked before this process opens any
    MLflow connection, so no worker inherits a database connection, and they
    start with kdray, pandas, matplotlib and MLflow already imported.
    """
    jobs = jobs or os.cpu_count() or 1
    if jobs <= 1:
        yield None
        return
    import mlflow.tracking  # noqa: F401 - imported once, inherited by forked workers

    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else None
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        yield pool


def _plan_of(path: Path):
    """The plan of a sweep file as it is now, and the file's SHA-256; one ReportError line if the file
    no longer loads (a report of an old version: name the experiment instead of the file)."""
    from kdray.checkpoints import CheckpointError
    from kdray.plan import build_plan
    from kdray.provenance import sha256_bytes
    from kdray.sweep import SweepError, load_sweep

    try:
        plan = build_plan(load_sweep(path))
    except (SweepError, CheckpointError, PluginError) as e:
        raise ReportError(f"{e} (to report every run of its experiment, name the experiment instead of the file)") from None
    return plan, sha256_bytes(path.read_bytes())


def is_sweep_file(target: str) -> bool:
    path = Path(target)
    return path.suffix in (".yaml", ".yml") or path.is_file()


def load_target(target: str, tracking_uri: str | None, pool=None) -> tuple[pd.DataFrame, str, str, str, float]:
    """(runs, tracking URI, experiment name, storage, seconds to load) of a sweep file or experiment name;
    ReportError when there is nothing to analyse.  A file's report has exactly the runs of the
    trials it plans now, an experiment's keeps each teacher and student variant apart (scope.py;
    ``df.attrs["scope"]`` says which).  The sweep's plug-ins are imported here (and
    ``df.attrs["plugins"]`` names them for the worker processes)."""
    uri, name, storage = resolve_experiment(tracking_uri, target)
    t0 = time.perf_counter()
    exp = get_experiment(uri, name)
    mods = sweep_plugins(uri, exp.experiment_id)
    try:
        plugins.load(mods)
    except PluginError as e:
        print(f"kdray report: warning: {e}; its conditions are shown by name only", file=sys.stderr)
        mods = ()
    df = load_runs(uri, name, pool, exp=exp, plugin_modules=tuple(mods))
    if df.empty:
        raise ReportError(f"MLflow experiment {name!r} at {uri} has no trial runs yet; run `kdray sweep` first")
    if is_sweep_file(target):
        plan, sha = _plan_of(Path(target))
        df, scope = scope_to_plan(df, plan, target, sha)
        if df.empty:
            raise ReportError(f"none of the {scope.planned} trials {target} plans now has a run in MLflow experiment "
                              f"{name!r} at {uri} ({sum(scope.ignored.values())} runs of other trials there); "
                              f"run `kdray sweep {target}` first")
    else:
        df, scope = split_cohorts(df, f"experiment {name!r}")
    df.attrs["plugins"] = tuple(mods)
    df.attrs["experiment_id"] = exp.experiment_id
    df.attrs["scope"] = scope
    return df, uri, name, storage, time.perf_counter() - t0


def run_report(target: str, out: str | None, tracking_uri: str | None, threshold: float = 0.01,
               exclude_below: float | None = None, jobs: Optional[int] = None,
               correction: str = corrections.DEFAULT, min_metrics: int = SUPPORT_MIN,
               sesoi: Optional[dict] = None, decision_correction: str = "none", figures_for: str = "auto") -> int:
    """What ``kdray report`` does: print the summary, return the exit code (2 on a user error)."""
    jobs = jobs or os.cpu_count() or 1
    with report_pool(jobs) as pool:
        try:
            df, uri, name, storage, loaded = load_target(target, tracking_uri, pool)
        except ReportError as e:
            print(f"kdray: error: {e}", file=sys.stderr)
            return 2
        out_dir = Path(out) if out else default_out(storage, name)
        result = build_report(df, out_dir, threshold=threshold, exclude_below=exclude_below,
                              title=f"kdray report: {name}", pool=pool, correction=correction,
                              min_metrics=min_metrics, sesoi=sesoi, decision_correction=decision_correction,
                              figures_for=figures_for)
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    print(f"kdray report: {len(df)} runs loaded in {loaded:.1f} s; {phases} "
          f"({jobs} process{'es' if jobs > 1 else ''})", file=sys.stderr)
    print(result.summary_text())
    try:
        run_id = log_report_to_mlflow(uri, name, out_dir, provenance_tags(result), df.attrs.get("experiment_id"))
        print(f"logged to MLflow: experiment {name!r}, run {run_id}")
    except Exception as e:  # the report on disk is still good
        print(f"kdray: warning: could not log the report to MLflow: {type(e).__name__}: {e}", file=sys.stderr)
    return 0
