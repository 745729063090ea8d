"""``kdray audit``: "what did my distillation transfer?" in one command.

From a teacher (a checkpoint, or one kdray trains), a student, a recipe, a data set and the
distillation methods to audit (KD, or the user's own plug-in condition), it writes the paired
study as an ordinary sweep file: SIDDO, each method at the chosen alphas, RCD at the same alphas,
N student seeds.  ``--dry-run`` runs the checks a sweep gets before it starts (schema, data,
checkpoint, models on two inputs, storage, tracking URI) and prints that file; otherwise it is run on Ray like any sweep and
the report ends with the answer in plain words (answer_lines).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import yaml

# The paper's 10 paired seeds: with them the smallest one-sided exact p is 2^-10, far below 0.05
# after any of the corrections (`kdray plan` states it); `kdray power` on a pilot says how many
# seeds an effect of the size found needs.
DEFAULT_SEEDS = 10
DEFAULT_ALPHAS = (0.5, 0.9)


def _mapping(text: Optional[str], what: str) -> dict:
    if not text:
        return {}
    from kdray.sweep import SweepError
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SweepError(f"--{what}: not valid YAML/JSON ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(value, dict):
        raise SweepError(f"--{what}: expected a mapping such as '{{epochs: 10, lr: 0.001}}', got {text!r}")
    return value


def _treatment(key: str, modules: list[str]):
    """The treated condition a sweep file names ``key`` (plug-ins imported first), or one SweepError line."""
    from kdray import conditions, plugins
    from kdray.registry import PluginError
    from kdray.sweep import SweepError

    try:
        plugins.load(modules)
    except PluginError as e:
        raise SweepError(f"--plugin: {e}") from None
    keys = {c.sweep_key: c for c in conditions.all_conditions() if c.sweep_key and c.role == conditions.TREATMENT}
    if key not in keys:
        raise SweepError(f"--method: {key!r} is not a distillation method kdray knows; valid: {', '.join(keys)} "
                         "(a plug-in's: name its module with --plugin, or install its package)")
    return keys[key]


def audit_sweep(args) -> dict:
    """The sweep file (as a dict) the audit runs."""
    teacher = {"arch": args.teacher, "args": _mapping(args.teacher_args, "teacher-args")}
    if args.checkpoint:   # absolute, so the saved audit.yaml finds it from any folder
        local = "://" not in args.checkpoint
        teacher["checkpoint"] = str(Path(args.checkpoint).expanduser().resolve()) if local else args.checkpoint
    recipe = {"epochs": 10, **_mapping(args.recipe, "recipe")}
    seeds = list(range(10, 10 + args.seeds))
    conds: dict = {"siddo": True, "rcd": {"alphas": list(args.alphas)}}
    methods = args.method or ["kd"]
    for m in methods:
        cond = _treatment(m, args.plugin or [])
        conds[m] = {"alphas": list(args.alphas)} if any(p.grid == "alphas" for p in cond.params) else {}
    if "kd" not in methods:
        conds["kd"] = None
    setup = {"name": "audit", "dataset": {"name": args.dataset, "args": _mapping(args.dataset_args, "dataset-args")},
             "teacher": teacher, "recipe": recipe, "teacher_seeds": [args.teacher_seed], "student_seeds": seeds,
             "conditions": conds}
    if args.student:
        setup["student"] = {"arch": args.student, "args": _mapping(args.student_args, "student-args")}
    if teacher["args"].get("pretrained"):     # a saved model folder (hf_causal_lm) teaches as it is
        setup["teacher_recipe"] = {"train": False}
    if "iterations" in recipe:
        recipe.pop("epochs")
    sweep = {"name": args.name, "description": "kdray audit: what did the distillation transfer?",
             "storage": args.storage, "setups": [setup]}
    if args.plugin:
        sweep["plugins"] = list(args.plugin)
    if args.tracking_uri:
        sweep["tracking_uri"] = args.tracking_uri
    return sweep


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.{digits}f}"


def answer_lines(analysis) -> list[str]:
    """Per audited method: did function transfer, by how much, and was it the teacher's mistakes
    or its successes that the student copied more."""
    from kdray.analysis.stats import NO_TRANSFER, asymmetry_text
    from kdray.metric_names import TRANSFER_METRICS

    out = []
    tests = analysis.tests
    for r in analysis.decisions.itertuples():
        name = r.condition.label
        if r.supported:
            verdict = (f"{name}: transfer shown: function transferred from the teacher (significant on "
                       f"{r.n_significant} of {len(TRANSFER_METRICS)} functional metrics against every control)")
        elif r.verdict == NO_TRANSFER:
            verdict = (f"{name}: no transfer larger than the SESOI shown: on {r.n_equivalent} of "
                       f"{len(TRANSFER_METRICS)} functional metrics the difference from a control is shown to be "
                       f"within its smallest effect of interest (equivalence tests, level {analysis.level:g})")
        else:
            verdict = (f"{name}: inconclusive: transfer not shown (significant on {r.n_significant} of "
                       f"{len(TRANSFER_METRICS)} metrics against every control; {analysis.min_metrics} needed), "
                       f"and no transfer larger than the SESOI not shown either (equivalence on {r.n_equivalent}; "
                       f"{len(TRANSFER_METRICS) - analysis.min_metrics + 1} needed): more seeds are needed")
        out.append(verdict + ("; the gain is marginal" if r.marginal else ""))
        best = r.best_control
        if best is not None:
            row = tests[(tests["condition"] == r.condition) & (tests["control"] == best)
                        & (tests["metric"] == "prediction_disagreement") & (tests["teacher_seed"] == r.teacher_seed)]
            effect = ""
            if len(row):
                t = row.iloc[0]
                effect = (f"; prediction disagreement with the teacher vs {best.label}: Hodges-Lehmann shift "
                          f"{_fmt(t.hl)}, {t.ci_level:.0%} interval [{_fmt(t.ci_low)}, {_fmt(t.ci_high)}], "
                          f"rank-biserial {_fmt(t.rank_biserial, 2)}")
            out.append(f"  how much: prediction agreement {_fmt(r.pa_gain)} over the best control ({best.label}){effect}")
        copied = {"negative": "more of the teacher's mistakes than of its successes",
                  "positive": "more of the teacher's successes than of its mistakes"}.get(r.asymmetry)
        detail = (f"agreement where the teacher is wrong {_fmt(r.delta_incorrect)}, where it is right "
                  f"{_fmt(r.delta_correct)}; two-sided p {r.p_asymmetry:.3g}")
        if r.asymmetry == "none":
            out.append(f"  what: not asked, as no transfer was shown ({detail})")
        elif copied:   # named only where its test is significant at the analysis level
            out.append(f"  what: the student copied {copied}: {asymmetry_text(r.asymmetry, r.p_asymmetry, 0)} "
                       f"at level {analysis.level:g} ({detail})")
        else:
            out.append(f"  what: not shown which the student copied more, the teacher's mistakes or its "
                       f"successes: {asymmetry_text(r.asymmetry, r.p_asymmetry, r.asymmetry_seeds)} ({detail})")
    return out


def run_audit(args) -> int:
    from kdray.sweep import parse_sweep

    from kdray.analysis.sizing import parse_sesoi

    try:
        sesoi = parse_sesoi(getattr(args, "sesoi", None))
    except ValueError as e:
        print(f"kdray: error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "pilot", None):   # the seeds this study needs, from a finished pilot, before anything trains
        from kdray.analysis.planning import seed_lines
        from kdray.analysis.runs import ReportError

        try:
            lines = seed_lines(args.pilot, args.tracking_uri, args.correction, sesoi)
        except ReportError as e:
            print(f"kdray: error: {e}", file=sys.stderr)
            return 2
        print("\n".join(f"# {line}" for line in lines), flush=True)   # comments: the dry run stays a sweep file
    data = audit_sweep(args)
    text = ("# written by kdray audit; run it again with: kdray sweep THIS_FILE\n"
            + yaml.safe_dump(data, sort_keys=False))
    from kdray.checks import check_destinations, check_size
    from kdray.preflight import preflight

    # The same checks `kdray sweep` runs before anything starts, dry run or not (nothing is written).
    sweep = parse_sweep(data, "kdray audit")
    check_size(sweep, "kdray audit")
    check_destinations(sweep, "kdray audit")
    preflight(sweep, "kdray audit")
    if args.dry_run:
        print(text, end="")
        return 0
    path = sweep.local_storage() / sweep.name / "audit.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"kdray audit: the study is {path}", flush=True)

    from kdray.analysis.report import build_report, default_out, load_target
    from kdray.cluster import quiet_ray_notices
    from kdray.engine import run_sweep
    from kdray.plan import build_plan, format_plan

    plan = build_plan(sweep)
    print(format_plan(plan), flush=True)
    from kdray.provenance import sha256_bytes

    quiet_ray_notices()
    summary = run_sweep(sweep, plan, progress=not args.quiet, source_sha256=sha256_bytes(text.encode()))
    print("\n".join(summary.lines()))
    if summary.exit_code:
        return summary.exit_code
    df, uri, name, storage, _ = load_target(str(path), None)
    result = build_report(df, default_out(storage, name), title=f"kdray audit: {name}", correction=args.correction,
                          sesoi=sesoi)
    print(result.summary_text())
    print("\nkdray audit: the answer")
    print("\n".join(answer_lines(result.analysis)))
    return 0


def add_arguments(sp) -> None:
    sp.add_argument("--dataset", required=True, help="a data set name or import path (my_pkg.data:load)")
    sp.add_argument("--dataset-args", help="its arguments, as YAML/JSON: '{n: 2000}'")
    sp.add_argument("--teacher", required=True, help="the teacher's architecture (name or import path)")
    sp.add_argument("--teacher-args", help="its arguments, as YAML/JSON")
    sp.add_argument("--checkpoint", help="the teacher's state dict (path or storage URI); without it kdray trains "
                                         "the teacher with the recipe")
    sp.add_argument("--teacher-seed", type=int, default=0, help="names the teacher (and seeds it when kdray trains it)")
    sp.add_argument("--student", help="the student's architecture (default: the teacher's)")
    sp.add_argument("--student-args", help="its arguments, as YAML/JSON")
    sp.add_argument("--recipe", help="the training recipe, as YAML/JSON: '{epochs: 10, lr: 0.001, batch_size: 128}'")
    sp.add_argument("--method", action="append", help="a distillation method to audit (a condition's key under "
                                                      "conditions:, e.g. kd or your plug-in's); repeatable; default kd")
    sp.add_argument("--alphas", type=float, nargs="+", default=list(DEFAULT_ALPHAS),
                    help=f"the distillation weights (RCD runs at the same ones; default {' '.join(map(str, DEFAULT_ALPHAS))})")
    sp.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                    help=f"paired student seeds (default {DEFAULT_SEEDS}, the paper's; `kdray power` on a pilot says how many an effect needs)")
    sp.add_argument("--plugin", action="append", help="a module that registers your plug-ins (repeatable)")
    sp.add_argument("--name", default="audit", help="the study's name (MLflow experiment, folder)")
    sp.add_argument("--storage", default="./results", help="where results go (default ./results)")
    sp.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite in storage)")
    sp.add_argument("--dry-run", action="store_true", help="print the sweep file the audit would run, run nothing")
    sp.add_argument("--quiet", action="store_true", help="no progress lines")
