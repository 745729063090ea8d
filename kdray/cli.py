"""The ``kdray`` command: validate, plan, sweep, audit, status, report, ui.

User mistakes (a bad sweep file, missing data, unreachable MLflow) print one
``kdray: error: ...`` line and exit 2; nothing is started.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable, Optional

EXIT_USAGE = 2


def _fail(msg: str) -> int:
    print(f"kdray: error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def _load(path: str, max_trials: int, overrides: Optional[dict] = None, reach_storage: bool = True):
    """The checked sweep (with command-line overrides) and its plan; the size is checked before the
    plan is built, so an absurd grid is refused at once.  ``reach_storage``: contact an object
    store (``kdray plan`` does not)."""
    from kdray.checks import check_destinations, check_size
    from kdray.plan import build_plan
    from kdray.sweep import load_sweep

    sweep = load_sweep(path)
    if overrides:
        sweep = sweep.model_copy(update={k: v for k, v in overrides.items() if v})
    check_size(sweep, path, max_trials)
    check_destinations(sweep, path, reach_storage)
    from kdray.preflight import preflight
    preflight(sweep, path)
    return sweep, build_plan(sweep)


def cmd_validate(args) -> int:
    from kdray.workers import check_workers_import

    sweep, plan = _load(args.sweep, args.max_trials)
    check_workers_import(sweep, args.sweep)     # on the cluster RAY_ADDRESS names, if any
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
        sweep, plan = _load(path, args.max_trials, reach_storage=False)
        print(format_plan(plan))     # with the packs and why students that asked to pack do not
        total += len(plan.all)
        for spec in plan.all:
            keys.setdefault(spec.trial_key, spec.role)
        for s in sweep.setups:
            if smallest_p_text:
                print(f"  {s.name}: {smallest_p_text(len(s.student_seeds), args.correction)}")
            w = significance_warning and significance_warning(len(s.student_seeds), correction=args.correction)
            if w:
                print(f"  warning: {s.name}: {w}")
        if args.list:
            for spec in plan.all:
                print(f"{spec.trial_key}  {spec.label}")
    if args.pilot:
        from kdray.analysis.planning import seed_lines
        from kdray.analysis.runs import ReportError

        try:
            print("\n".join(seed_lines(args.pilot, args.tracking_uri, args.correction, _sesoi(args))))
        except (ReportError, ValueError) as e:
            return _fail(str(e))
    if len(args.sweep) > 1:
        shared = total - len(keys)
        print(f"all {len(args.sweep)} files: {len(keys)} distinct trials "
              f"({shared} planned by more than one file, trained once: same trial key, shared storage)")
    return 0


def cmd_sweep(args) -> int:
    from kdray.cluster import quiet_ray_notices
    from kdray.engine import run_sweep
    from kdray.plan import format_plan

    quiet_ray_notices()

    sweep, plan = _load(args.sweep, args.max_trials, {"storage": args.storage, "tracking_uri": args.tracking_uri})
    from kdray import simulation
    if args.simulate_gpu:
        os.environ[simulation.ENV] = "1"
    print(format_plan(plan), flush=True)
    if simulation.requested():
        print(f"kdray: {simulation.ENV}=1: trials that ask for GPUs run on CPUs where there is no CUDA device; "
              "their runs are tagged kdray.simulated and the report says SIMULATED", file=sys.stderr, flush=True)
    from kdray.provenance import sha256_bytes

    summary = run_sweep(sweep, plan, verbose=1 if args.verbose else 0, progress=not (args.quiet or args.verbose),
                        source_sha256=sha256_bytes(Path(args.sweep).read_bytes()))
    print("\n".join(summary.lines()))
    return summary.exit_code


def cmd_audit(args) -> int:
    from kdray.audit import run_audit

    if args.seeds < 1:
        return _fail(f"--seeds: expected at least 1 student seed, got {args.seeds}")
    too_few = _too_few_seeds(args.seeds, args.correction)
    if too_few:
        return _fail(too_few)
    return run_audit(args)


def _too_few_seeds(seeds: int, correction: str) -> Optional[str]:
    """Why an audit of ``seeds`` paired seeds could never show transfer (None when it could): before
    anything trains, with the smallest seed count that can (issue 27)."""
    from kdray.analysis.stats import significance_warning

    why = significance_warning(seeds, correction=correction)
    return f"--seeds {seeds}: {why} (--correction {correction}; the paper used 10)" if why else None


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
                      decision_correction=args.decision_correction, figures_for=args.figures)


def cmd_verify(args) -> int:
    from kdray.verify import run_verify

    if args.sample < 1:
        return _fail(f"--sample: expected at least 1 trial, got {args.sample}")
    if not args.tolerance >= 0:
        return _fail(f"--tolerance: expected a number >= 0, got {args.tolerance}")
    return run_verify(args.target, args.sample, args.seed, args.tracking_uri, args.storage, args.tolerance)


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
    name = None
    if not uri:
        from kdray.sweep import default_tracking_uri, load_sweep

        sweep = load_sweep(args.sweep) if args.sweep else None
        uri, name = (sweep.resolved_tracking_uri(), sweep.name) if sweep else (default_tracking_uri(), None)
    elif args.sweep:
        from kdray.sweep import load_sweep
        name = load_sweep(args.sweep).name
    if uri.startswith(("http://", "https://")):
        # (not asked for the experiment's id: an unreachable server would hold the command in MLflow's retries)
        print(f"runs are on a tracking server: open {uri.rstrip('/')}/#/experiments in a browser"
              + (f" and pick experiment {name!r}" if name else ""))
        return 0
    db = sqlite_path(uri)
    if db is not None and not db.exists():   # MLflow would create an empty database here
        return _fail(f"nothing to show: no MLflow database at {db}; run `kdray sweep` first")
    check_sqlite_store(uri)
    taken = _port_taken(args.host, args.port)
    if taken:
        return _fail(f"port {args.port} on {args.host} is taken ({taken}); pass --port with a free one")
    host = f"[{args.host}]" if ":" in args.host else args.host
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", args.host, "--port", str(args.port)]
    print(" ".join(cmd), flush=True)
    url = _runs_url(f"http://{host}:{args.port}", uri, name)
    print(f"kdray ui: the runs are at {url}", flush=True)
    if not args.no_browser and sys.stdout.isatty():
        _open_when_listening_in_a_child(url, args.host, args.port)
    os.execvp(cmd[0], cmd)
    return 0  # not reached


def _open_when_listening_in_a_child(url: str, host: str, port: int) -> None:
    """A child process opens ``url`` in the browser once the UI listens; this process goes on to become
    the UI (exec), so it cannot wait itself."""
    if os.fork():
        return
    try:
        os.setsid()
        open_when_listening(url, host, port)
    finally:
        os._exit(0)


def open_when_listening(url: str, host: str, port: int, timeout: float = 120.0, opener: Optional[Callable] = None) -> bool:
    """Open ``url`` (webbrowser.open) as soon as something listens on host:port; False if nothing did in time."""
    import socket
    import time
    import webbrowser

    target = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((target, port), timeout=1.0):
                pass
        except OSError:
            time.sleep(0.3)
            continue
        (opener or webbrowser.open)(url)
        return True
    return False


def _runs_url(base: str, uri: str, name: Optional[str]) -> str:
    """The URL of an experiment's runs table.  MLflow 3 opens a fresh browser on its GenAI overview,
    where a sweep's runs are not; its runs view is ``#/experiments/ID/runs``.  Without a sweep name,
    the store's only experiment (besides MLflow's Default); else the experiment list."""
    ids = _experiment_ids(uri, name)
    return f"{base}/#/experiments/{ids[0]}/runs" if len(ids) == 1 else f"{base}/#/experiments"


def _experiment_ids(uri: str, name: Optional[str]) -> list[str]:
    """The ids of the experiment ``name`` (or of every experiment but Default), [] when unknown."""
    from kdray.tracking import sqlite_path

    db = sqlite_path(uri)
    try:
        if db is not None:   # read-only: opening the UI must not write the store
            import sqlite3
            with sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True) as c:
                rows = c.execute("select experiment_id, name from experiments where lifecycle_stage = 'active'")
                found = [(str(i), n) for i, n in rows]
        else:
            from mlflow.tracking import MlflowClient
            found = [(e.experiment_id, e.name) for e in MlflowClient(uri).search_experiments()]
    except Exception:   # a store it cannot read: the experiment list, and MLflow says why
        return []
    return [i for i, n in found if (n == name if name else n != "Default")]


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

    sp = add("validate", cmd_validate, "check a sweep file; one error line and exit 2 when it is wrong (with "
                                       "RAY_ADDRESS set, also that the cluster's workers import its plug-ins)")
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
    sp.add_argument("--simulate-gpu", action="store_true",
                    help="rehearse a GPU sweep without GPUs: trials that ask for GPUs train on CPUs (placed on nodes "
                         "that advertise logical GPUs) and are tagged simulated (also: KDRAY_SIMULATE_GPU=1)")
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
    sp.add_argument("--figures", choices=("auto", "all", "none"), default="auto",
                    help="per-setup figures: auto (every setup's, up to 24 setups; none above), all, or none")
    sp = add("verify", cmd_verify, "does a study reproduce? re-trains a seeded sample of its stored trials and "
                                   "compares each with what was stored (bit for bit where the fingerprint matches)")
    from kdray.verify import add_arguments as verify_arguments
    verify_arguments(sp)
    sp = add("data", cmd_data, "data tools: fetch NAME downloads a full data set (--list: the sources); "
                               "ffcv-write SRC DST converts an ImageFolder tree to an FFCV .beton")
    sp.add_argument("tool", choices=["fetch", "ffcv-write"])
    sp.add_argument("rest", nargs=argparse.REMAINDER, help="the tool's own arguments (--help for them)")
    sp = add("ui", cmd_ui, "open the MLflow UI on a sweep's runs (its runs view: the URL is printed, and opened "
                           "in the browser on a terminal)")
    sp.add_argument("sweep", nargs="?")
    sp.add_argument("--tracking-uri")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=5000)
    sp.add_argument("--no-browser", action="store_true",
                    help="only print the runs' URL (default on a terminal: also open it once the UI listens)")
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
