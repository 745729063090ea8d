"""The ``kdray`` command: validate, plan, sweep, audit, status, report, ui.

User mistakes (a bad sweep file, missing data, unreachable MLflow) print one
``kdray: error: ...`` line and exit 2; nothing is started.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

EXIT_USAGE = 2


def _fail(msg: str) -> int:
    print(f"kdray: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _load(path: str, max_trials: int, overrides: Optional[dict] = None):
    """The checked sweep (with command-line overrides) and its plan; the size is checked before the
    plan is built, so an absurd grid is refused at once."""
    from kdray.checks import check_destinations, check_size
    from kdray.plan import build_plan
    from kdray.sweep import load_sweep

    sweep = load_sweep(path)
    if overrides:
        sweep = sweep.model_copy(update={k: v for k, v in overrides.items() if v})
    check_size(sweep, path, max_trials)
    check_destinations(sweep, path)
    from kdray.preflight import preflight
    preflight(sweep, path)
    return sweep, build_plan(sweep)


def cmd_validate(args) -> int:
    sweep, plan = _load(args.sweep, args.max_trials)
    print(f"{args.sweep}: ok ({len(sweep.setups)} setups, {len(plan.all)} trials)")
    return 0


def cmd_plan(args) -> int:
    from kdray.plan import format_plan

    try:
        from kdray.analysis.stats import significance_warning, smallest_p_text
    except ImportError:  # analysis not installed in a minimal build
        significance_warning = smallest_p_text = None
    keys: dict[str, str] = {}
    total = 0
    for path in args.sweep:
        sweep, plan = _load(path, args.max_trials)
        print(format_plan(plan))
        if any(s.resources.student.pack > 1 for s in sweep.setups):   # builds one model per architecture
            from kdray.packing import jobs
            for note in jobs(plan.students)[1]:
                print(f"  note: {note}")
        total += len(plan.all)
        for spec in plan.all:
            keys.setdefault(spec.trial_key, spec.role)
        for s in sweep.setups:
            if smallest_p_text:
                print(f"  {s.name}: {smallest_p_text(len(s.student_seeds), args.correction)}")
            w = significance_warning and significance_warning(len(s.student_seeds), correction=args.correction)
            if w:
                print(f"  warning: {s.name}: {w}")
    if args.pilot:
        from kdray.analysis.planning import seed_lines
        from kdray.analysis.runs import ReportError

        try:
            print("\n".join(seed_lines(args.pilot, args.tracking_uri, args.correction, _sesoi(args))))
        except (ReportError, ValueError) as e:
            return _fail(str(e))
        if args.list:
            for spec in plan.all:
                print(f"{spec.trial_key}  {spec.label}")
    if len(args.sweep) > 1:
        shared = total - len(keys)
        print(f"all {len(args.sweep)} files: {len(keys)} distinct trials "
              f"({shared} planned by more than one file, trained once: same trial key, shared storage)")
    return 0


def cmd_sweep(args) -> int:
    from kdray.engine import run_sweep
    from kdray.plan import format_plan

    sweep, plan = _load(args.sweep, args.max_trials, {"storage": args.storage, "tracking_uri": args.tracking_uri})
    print(format_plan(plan), flush=True)
    summary = run_sweep(sweep, verbose=1 if args.verbose else 0, progress=not (args.quiet or args.verbose))
    print("\n".join(summary.lines()))
    return summary.exit_code


def cmd_audit(args) -> int:
    from kdray.audit import run_audit

    if args.seeds < 1:
        return _fail(f"--seeds: expected at least 1 student seed, got {args.seeds}")
    return run_audit(args)


def cmd_status(args) -> int:
    from kdray.progress import status_lines

    print("\n".join(status_lines(args.target, args.tracking_uri)))
    return 0


def _sesoi(args) -> Optional[dict]:
    """--sesoi METRIC=VALUE items -> the full SESOI dict; ValueError (one line) on a bad one."""
    from kdray.analysis.sizing import parse_sesoi

    return parse_sesoi(getattr(args, "sesoi", None))


def cmd_report(args) -> int:
    from kdray.analysis.report import run_report

    try:
        sesoi = _sesoi(args)
    except ValueError as e:
        return _fail(str(e))
    return run_report(args.target, args.out, args.tracking_uri, args.threshold, args.exclude_below, args.jobs,
                      args.correction, args.min_metrics, sesoi=sesoi,
                      decision_correction=args.decision_correction)


def cmd_power(args) -> int:
    from kdray.analysis.planning import run_power

    try:
        sesoi = _sesoi(args)
    except ValueError as e:
        return _fail(str(e))
    return run_power(args.target, args.tracking_uri, args.correction, args.draws, sesoi=sesoi)


def cmd_data(args) -> int:
    from kdray.data.fetch import fetch_main
    from kdray.data.ffcv import ffcv_write_main

    tools = {"ffcv-write": ffcv_write_main, "fetch": fetch_main}
    return tools[args.tool](args.rest)


def cmd_ui(args) -> int:
    from kdray.tracking import check_sqlite_store, sqlite_path

    uri = args.tracking_uri
    if not uri:
        from kdray.sweep import default_tracking_uri, load_sweep

        uri = load_sweep(args.sweep).resolved_tracking_uri() if args.sweep else default_tracking_uri()
    if uri.startswith(("http://", "https://")):
        print(f"runs are on a tracking server: open {uri} in a browser")
        return 0
    db = sqlite_path(uri)
    if db is not None and not db.exists():   # MLflow would create an empty database here
        return _fail(f"nothing to show: no MLflow database at {db}; run `kdray sweep` first")
    check_sqlite_store(uri)
    taken = _port_taken(args.host, args.port)
    if taken:
        return _fail(f"port {args.port} on {args.host} is taken ({taken}); pass --port with a free one")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    print(" ".join(cmd), flush=True)
    os.execvp(cmd[0], cmd)
    return 0  # not reached


def _port_taken(host: str, port: int) -> str:
    """Why the UI could not listen on host:port ('' when it can): uvicorn's own error is buried in its log."""
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as uvicorn does
        try:
            s.bind((host, port))
        except OSError as e:
            return e.strerror or str(e)
    return ""


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


CORRECTIONS = ("bh", "by", "holm")     # kdray.analysis.corrections.CORRECTIONS, without importing numpy here


def _correction(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--correction", choices=CORRECTIONS, default="bh",
                    help="multiple-comparison correction over each comparison's four functional metrics: "
                         "bh Benjamini-Hochberg (default), by Benjamini-Yekutieli, holm Holm")


def _pilot_options(sp: argparse.ArgumentParser, tracking: bool = True) -> None:
    sp.add_argument("--pilot", help="a finished sweep (file or MLflow experiment) whose noise sizes the study: "
                                    "the student seeds needed for 80%% power at each metric's SESOI")
    if tracking:
        sp.add_argument("--tracking-uri", help="MLflow tracking URI of the pilot (default: its sweep's)")
    _sesoi_option(sp)


def _sesoi_option(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--sesoi", action="append", metavar="METRIC=VALUE",
                    help="smallest effect of interest of a metric, in its units (repeatable; defaults in "
                         "docs/statistics.md: 1%% of each metric's range, e.g. prediction_disagreement=0.01)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kdray", description="Ray-distributed sweeps for the functional study of knowledge distillation.")
    sub = p.add_subparsers(dest="command", required=True)
    commands: dict[str, Callable] = {}

    def add(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=fn)
        commands[name] = fn
        return sp

    def max_trials(sp: argparse.ArgumentParser) -> None:
        from kdray.checks import MAX_TRIALS
        sp.add_argument("--max-trials", type=_positive_int, default=MAX_TRIALS,
                        help=f"refuse grids larger than this (default {MAX_TRIALS:,})")

    sp = add("validate", cmd_validate, "check a sweep file; one error line and exit 2 when it is wrong")
    sp.add_argument("sweep")
    max_trials(sp)
    sp = add("plan", cmd_plan, "print the trials sweep files expand to, per setup and condition")
    sp.add_argument("sweep", nargs="+")
    sp.add_argument("--list", action="store_true", help="also list every trial key and label")
    _correction(sp)
    _pilot_options(sp)
    max_trials(sp)
    sp = add("sweep", cmd_sweep, "run a sweep (re-running it resumes: finished trials are skipped)")
    sp.add_argument("sweep")
    max_trials(sp)
    sp.add_argument("--storage", help="override the sweep file's storage")
    sp.add_argument("--tracking-uri", help="override the MLflow tracking URI")
    sp.add_argument("--quiet", action="store_true", help="no progress lines, only the summary")
    sp.add_argument("--verbose", action="store_true", help="Ray Tune's own status tables instead of kdray's progress lines")
    sp = add("audit", cmd_audit, "what did a distillation transfer? writes and runs the paired study (SIDDO, "
                                 "the method, RCD) for your teacher, student and method, then answers in plain words")
    from kdray.audit import add_arguments
    add_arguments(sp)
    _correction(sp)
    _pilot_options(sp, tracking=False)
    sp = add("status", cmd_status, "a sweep's trials per stage (done, running, pending, failed) from MLflow and storage")
    sp.add_argument("target", help="a sweep file or an MLflow experiment name")
    sp.add_argument("--tracking-uri", help="MLflow tracking URI (default: the sweep's)")
    sp = add("report", cmd_report, "paired tests, transfer decisions, tables and figures from a sweep's MLflow runs")
    sp.add_argument("target", help="a sweep file or an MLflow experiment name")
    sp.add_argument("--out", help="output folder (default <storage>/<sweep>/report)")
    sp.add_argument("--tracking-uri", help="MLflow tracking URI (default: the sweep's)")
    sp.add_argument("--threshold", type=float, default=0.01, help="marginal-transfer threshold on the prediction-agreement gain")
    sp.add_argument("--exclude-below", type=float, default=None,
                    help="drop controls whose mean accuracy is this far below SIDDO's from best-control selection")
    _correction(sp)
    sp.add_argument("--min-metrics", type=int, choices=range(1, 5), default=3, metavar="{1..4}",
                    help="functional metrics that must be significant against every control for transfer "
                         "to count as supported (default 3 of 4, the paper's rule)")
    sp.add_argument("--jobs", type=_positive_int, default=None,
                    help="worker processes for fetching runs and drawing figures (default: one per core; 1: none)")
    _sesoi_option(sp)
    sp.add_argument("--decision-correction", choices=("none", "holm", "bh"), default="none",
                    help="correct over each setup's transfer decisions (treated conditions x alphas x temperatures "
                         "x teacher seeds): holm (family-wise error rate) or bh (false discovery rate); default none")
    sp = add("data", cmd_data, "data tools: fetch NAME downloads a full data set (--list: the sources); "
                               "ffcv-write SRC DST converts an ImageFolder tree to an FFCV .beton")
    sp.add_argument("tool", choices=["fetch", "ffcv-write"])
    sp.add_argument("rest", nargs=argparse.REMAINDER, help="the tool's own arguments (--help for them)")
    sp = add("ui", cmd_ui, "open the MLflow UI on a sweep's runs")
    sp.add_argument("sweep", nargs="?")
    sp.add_argument("--tracking-uri")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=5000)
    sp = add("power", cmd_power, "power to support transfer at 5..30 student seeds, from a pilot sweep's runs")
    sp.add_argument("target", help="a sweep file or an MLflow experiment name (the pilot)")
    sp.add_argument("--tracking-uri", help="MLflow tracking URI (default: the sweep's)")
    sp.add_argument("--draws", type=_positive_int, default=2000, help="simulated studies per estimate (default 2000)")
    _correction(sp)
    _sesoi_option(sp)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    from kdray.errors import ClusterError, DataNotFoundError
    from kdray.registry import UnknownNameError
    from kdray.sweep import SweepError
    from kdray.tracking import TrackingError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (SweepError, TrackingError, DataNotFoundError, UnknownNameError, ClusterError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("kdray: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
