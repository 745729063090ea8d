"""The report's figures, PNG and SVG, drawn with matplotlib's object API.

``Figure`` objects render through Agg without pyplot, so nothing here touches
a global backend or leaks open figures in a long-lived process.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kdray.analysis.stats import TRANSFER_METRICS, Analysis, Condition, by_condition, sortable, mean_sem
from kdray.analysis.tables import metric_header, slug

PANEL = (4.2, 3.2)                   # inches per panel
COLORS = {"correct": "#4477aa", "incorrect": "#ee6677"}
# Fixed margins in inches: matplotlib's constrained layout measured every text box of every panel
# and took a third of a figure's time.  Titles are one line; ``bottom`` grows with tick-label lines.
LEFT, RIGHT, TOP, GAP_W = 0.75, 0.2, 0.45, 1.0
TITLE_H = 0.35


def _grid(rows: int, cols: int, bottom: float = 0.6, left: float = LEFT) -> tuple[Figure, np.ndarray]:
    """rows x cols panels of PANEL inches, spaced in fixed inches: ``bottom`` below each panel's axes
    (tick labels and x label), a title above each, the figure's title on top."""
    w, h = PANEL[0] * cols, PANEL[1] * rows + TOP
    gap_h = bottom + TITLE_H
    w += left - LEFT
    ax_w = (w - left - RIGHT - (cols - 1) * GAP_W) / cols
    ax_h = (h - TOP - TITLE_H - bottom - (rows - 1) * gap_h) / rows
    fig = Figure(figsize=(w, h))
    axes = fig.subplots(rows, cols, squeeze=False, gridspec_kw=dict(
        left=left / w, right=1 - RIGHT / w, bottom=bottom / h, top=1 - (TOP + TITLE_H) / h,
        wspace=GAP_W / ax_w, hspace=gap_h / ax_h))
    return fig, np.atleast_2d(axes)


# Also for speed: titles at a fixed height (matplotlib otherwise measures every tick label to
# place them), SVG text as <text> elements (editable, and cheaper than glyph outlines), and light
# PNG compression.  A report draws ~40 figures; these halve the time each takes.
STYLE = {"axes.titley": 1.0, "axes.titlepad": 5.0, "svg.fonttype": "none"}


def save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{name}.png", out_dir / f"{name}.svg"]
    with rc_context(STYLE):
        fig.savefig(paths[0], dpi=110, pil_kwargs={"compress_level": 1})
        fig.savefig(paths[1])
    return paths


def _full_width(d):
    """Rows at the largest width: the alpha and asymmetry figures; width has its own figure."""
    top = max(c.width for c in d["condition"])
    return d[np.array([c.width == top for c in d["condition"]], bool)]


def asymmetry_figure(a: Analysis, setup: str) -> Figure | None:
    """Δcorrect vs Δincorrect agreement bars per condition; a panel per teacher seed (rows: the
    conditions' facet values, e.g. temperatures)."""
    d = a.decisions[a.decisions["setup"] == setup]
    if d.empty:
        return None
    d = _full_width(d)
    seeds = sorted(set(d["teacher_seed"]))
    facets = sorted({c.facets() for c in d["condition"]}, key=lambda f: [sortable(v) for _, v in f])
    fig, axes = _grid(len(facets), len(seeds), bottom=0.75)   # two-line tick labels
    for i, facet in enumerate(facets):
        for j, ts in enumerate(seeds):
            ax = axes[i, j]
            rows = d[(d["teacher_seed"] == ts).to_numpy() & np.array([c.facets() == facet for c in d["condition"]])]
            x = np.arange(len(rows))
            ax.bar(x - 0.2, rows["delta_correct"], 0.4, yerr=rows["delta_correct_sem"].fillna(0), capsize=3,
                   color=COLORS["correct"], label="Δ correct agreement")
            ax.bar(x + 0.2, rows["delta_incorrect"], 0.4, yerr=rows["delta_incorrect_sem"].fillna(0), capsize=3,
                   color=COLORS["incorrect"], label="Δ incorrect agreement")
            ax.axhline(0, color="black", lw=0.6)
            labels = [" ".join(c.label_parts(facets=False)) + ("\n" + asym if asym != "none" else "")
                      for c, asym in zip(rows["condition"], rows["asymmetry"])]
            ax.set_xticks(x, labels, fontsize=8)
            shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in facet)
            ax.set_title(f"teacher seed {ts}" + (f", {shown}" if len(facets) > 1 and shown else ""), fontsize=9)
            ax.set_ylabel("vs best control")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{setup}: agreement gained over the best control (mean ± SEM)", fontsize=10)
    return fig


def _curve(c: Condition) -> tuple[str, Optional[str], tuple]:
    """(method, the param on the x axis, the other params): conditions with the same method and other
    params lie on one line against the x param; a condition without one is drawn as a band."""
    decl = c.decl
    x = decl.x_param() if decl is not None else None
    return c.method, (x.name if x else None), tuple((k, v) for k, v in c.params if x is None or k != x.name)


def metrics_figure(a: Analysis, setup: str) -> Figure | None:
    """Accuracy and the functional metrics against each condition's x param (alpha, epsilon): a line
    per condition and its other params, conditions without such a param (SIDDO) as a band."""
    s = a.students[a.students["setup"] == setup]
    metrics = [m for m in ("test_acc", *TRANSFER_METRICS) if m in s and s[m].notna().any()]
    if s.empty or not metrics:
        return None
    s = _full_width(s)
    seeds = sorted(set(s["teacher_seed"]))
    fig, axes = _grid(len(seeds), len(metrics))
    for i, ts in enumerate(seeds):
        conds = by_condition(s[s["teacher_seed"] == ts])
        lines: dict[tuple, list] = {}
        for c in conds:
            lines.setdefault(_curve(c), []).append(c)
        bands = [cs[0] for (_, x, _), cs in lines.items() if x is None]
        curves = {k: cs for k, cs in lines.items() if k[1] is not None}
        xs = sorted({c.get(k[1]) for k, cs in curves.items() for c in cs})
        for j, m in enumerate(metrics):
            ax = axes[i, j]
            for c in bands:
                mu, se, _ = mean_sem(conds[c][m])
                ax.axhspan(mu - (se if se == se else 0), mu + (se if se == se else 0), color="grey", alpha=0.3)
                ax.axhline(mu, color="grey", lw=1, label=c.label)
            for (method, x, rest), cs in sorted(curves.items(), key=lambda kv: kv[1][0].sort_key):
                cs = sorted(cs, key=lambda c: c.get(x))
                ms = [mean_sem(conds[c][m]) for c in cs]
                ax.errorbar([c.get(x) for c in cs], [v[0] for v in ms], yerr=[0 if v[1] != v[1] else v[1] for v in ms],
                            marker="o", ms=3, capsize=2, label=" ".join(_line_label(cs[0], x)))
            if xs:
                ax.set_xticks(xs)
            ax.yaxis.set_major_locator(MaxNLocator(4))  # few ticks: each costs matplotlib a deep copy
            ax.set_xlabel(_x_label(curves))
            ax.set_title(f"{metric_header(m)}, teacher seed {ts}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{setup}: metrics against each condition's parameter (mean ± SEM)", fontsize=10)
    return fig


def _line_label(c: Condition, x: str) -> list[str]:
    """A line's legend: the condition's label without the x param's value."""
    decl = c.decl
    return [decl.title] + decl.label({k: v for k, v in c.params if k != x})


def _x_label(curves: dict) -> str:
    """The x axis names every param it carries, e.g. "α (ε for LS)"."""
    by_param: dict[str, list[str]] = {}
    for (method, x, _), cs in curves.items():
        decl = cs[0].decl
        by_param.setdefault(decl.param(x).symbol or x, []).append(decl.title)
    if not by_param:
        return ""
    (main, _), *others = sorted(by_param.items(), key=lambda kv: -len(kv[1]))
    extra = "; ".join(f"{sym} for {', '.join(sorted(set(t)))}" for sym, t in others)
    return main + (f" ({extra})" if extra else "")


def width_figure(a: Analysis, setup: str) -> Figure | None:
    """Δcorrect (solid) and Δincorrect (dashed) against student width; a line pair per condition."""
    d = a.decisions[a.decisions["setup"] == setup]
    if len({c.width for c in d["condition"]}) < 2:
        return None
    seeds = sorted(set(d["teacher_seed"]))
    fig, axes = _grid(1, len(seeds))
    for j, ts in enumerate(seeds):
        ax = axes[0, j]
        groups: dict = {}
        for r in d[d["teacher_seed"] == ts].itertuples():
            groups.setdefault(r.condition.replace(width=1.0), []).append(r)
        for k, (base, rs) in enumerate(sorted(groups.items(), key=lambda kv: kv[0].sort_key)):
            rs = sorted(rs, key=lambda r: r.condition.width)
            w = [r.condition.width for r in rs]
            color = f"C{k}"
            ax.errorbar(w, [r.delta_correct for r in rs], yerr=[np.nan_to_num(r.delta_correct_sem) for r in rs],
                        color=color, marker="o", ms=3, capsize=2, label=f"{base.label} Δcorrect")
            ax.errorbar(w, [r.delta_incorrect for r in rs], yerr=[np.nan_to_num(r.delta_incorrect_sem) for r in rs],
                        color=color, ls="--", marker="s", ms=3, capsize=2, label=f"{base.label} Δincorrect")
        ax.axhline(0, color="black", lw=0.6)
        ax.set_xlabel("student width (fraction of the teacher's)")
        ax.set_title(f"teacher seed {ts}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{setup}: transfer against width (mean ± SEM)", fontsize=10)
    return fig


def count_figure(a: Analysis, setup: str) -> Figure | None:
    """Mean tha_count_* per condition (teacher included): how far KD copies a planted error."""
    s = a.students[a.students["setup"] == setup]
    cols = sorted(c for c in s.columns if c.startswith("tha_count") and s[c].notna().any())
    if not cols:
        return None
    seeds = sorted(set(s["teacher_seed"]))
    fig, axes = _grid(1, len(seeds), bottom=1.2)              # rotated condition labels
    teachers = a.teachers[a.teachers["setup"] == setup]
    for j, ts in enumerate(seeds):
        ax = axes[0, j]
        conds = by_condition(s[s["teacher_seed"] == ts])
        labels = ["teacher"] + [c.label for c in conds]
        t = teachers[teachers["teacher_seed"] == ts]
        x = np.arange(len(labels))
        width = 0.8 / len(cols)
        for k, col in enumerate(cols):
            ms = [mean_sem(t[col]) if col in t else (np.nan, np.nan, 0)] + [mean_sem(r[col]) for r in conds.values()]
            ax.bar(x + (k - (len(cols) - 1) / 2) * width, [m[0] for m in ms], width,
                   yerr=[np.nan_to_num(m[1]) for m in ms], capsize=2, label=col)
        ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"teacher seed {ts}", fontsize=9)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"{setup}: planted-error counts (mean ± SEM)", fontsize=10)
    return fig


def effects_figure(a: Analysis, setup: str) -> Figure | None:
    """Hodges-Lehmann shift with the interval that inverts the test (90% at level 0.05) per comparison (condition vs control): a panel per teacher
    seed (rows) and functional metric (columns); ticked comparisons filled, the others hollow."""
    t = a.tests[(a.tests["setup"] == setup) & a.tests["metric"].isin(TRANSFER_METRICS)]
    if t.empty:
        return None
    seeds = sorted(set(t["teacher_seed"]))
    metrics = [m for m in TRANSFER_METRICS if m in set(t["metric"])]
    pairs = sorted({(r.condition, r.control) for r in t.itertuples()}, key=lambda k: (k[0].sort_key, k[1].sort_key))
    fig, axes = _grid(len(seeds), len(metrics), left=1.4)    # comparison labels on the left
    y = np.arange(len(pairs))
    for i, ts in enumerate(seeds):
        for j, m in enumerate(metrics):
            ax = axes[i, j]
            cell = {(r.condition, r.control): r for r in t[(t["teacher_seed"] == ts) & (t["metric"] == m)].itertuples()}
            rs = [cell.get(k) for k in pairs]
            hl = np.array([r.hl if r else np.nan for r in rs])
            lo = np.array([r.ci_low if r else np.nan for r in rs])
            hi = np.array([r.ci_high if r else np.nan for r in rs])
            sig = np.array([bool(r and r.significant) for r in rs])
            err = np.array([hl - lo, hi - hl])
            err[~np.isfinite(err)] = np.nan              # an unbounded side (too few pairs): no bar
            ax.errorbar(hl, y, xerr=np.nan_to_num(err), fmt="none", ecolor="black", capsize=2, lw=0.8)
            ax.scatter(hl[sig], y[sig], color="black", s=14, zorder=3)
            ax.scatter(hl[~sig], y[~sig], facecolors="white", edgecolors="black", s=14, zorder=3)
            ax.axvline(0, color="grey", lw=0.6)
            ax.set_yticks(y, [f"{c.label} vs {k.label}" for c, k in pairs] if j == 0 else [], fontsize=6)
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.set_title(f"{metric_header(m)}, teacher seed {ts}", fontsize=9)
    fig.suptitle(f"{setup}: Hodges-Lehmann shift, condition - control, with its {1 - 2 * a.level:.0%} interval "
                 f"(two one-sided {1 - a.level:.0%} bounds; filled: significant)",
                 fontsize=10)
    return fig


FIGURES = {"effects": effects_figure, "asymmetry": asymmetry_figure, "metrics": metrics_figure, "width": width_figure, "counts": count_figure}


def setup_figures(a: Analysis, setup: str, out_dir: Path) -> list[tuple[str, list[Path]]]:
    """Every figure that applies to one setup: (title, [png, svg])."""
    out = []
    for kind, draw in FIGURES.items():
        with rc_context(STYLE):
            fig = draw(a, setup)
        if fig is not None:
            out.append((f"{setup}: {kind}", save(fig, Path(out_dir), slug(kind, setup))))
    return out


def _draw_setup(job: tuple[Analysis, str, Path]) -> list[tuple[str, list[Path]]]:
    from kdray import plugins

    plugins.load(job[0].plugins)   # a worker process: the sweep's plug-in conditions label themselves
    return setup_figures(*job)


def all_figures(a: Analysis, out_dir: Path, pool=None) -> Iterator[tuple[str, list[Path]]]:
    """Every figure of every setup, in setup order: (title, [png, svg]).  Drawing is CPU-bound pure
    Python (matplotlib): with a process ``pool`` every setup is handed to the workers at once (each
    with its own slice of the analysis) and the caller can work while they draw."""
    setups = sorted(set(a.students["setup"]))
    if pool is None:
        return (f for setup in setups for f in setup_figures(a, setup, Path(out_dir)))
    drawn = pool.map(_draw_setup, [(a.for_setup(setup), setup, Path(out_dir)) for setup in setups])
    return (f for figs in drawn for f in figs)
