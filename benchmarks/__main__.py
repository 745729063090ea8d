"""``python -m benchmarks NAME [NAME ...] | all [--quick] [--device auto|cpu|cuda] [--out FILE] [--no-write]``

Runs the named benchmarks in this process, prints each record, and updates
docs/benchmarks.md (the benchmark's block and the summary table) with the
command, the date and the machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import NAMES, load

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def parse(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description="kdray ratio benchmarks (issue 6)")
    p.add_argument("names", nargs="+", help=f"benchmarks to run: {', '.join(NAMES)}, or all")
    p.add_argument("--quick", action="store_true", help="smaller sizes (minutes, not a quarter of an hour)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="the Markdown file to update (default docs/benchmarks.md)")
    p.add_argument("--no-write", action="store_true", help="print only; leave the Markdown file alone")
    p.add_argument("--json", help="also write the raw records (with per-run timings) to this JSON file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    names = list(NAMES) if "all" in args.names else args.names
    try:
        for n in names:
            load(n)                               # unknown names fail before anything runs
    except KeyError as e:
        print(f"python -m benchmarks: error: {e.args[0]}", file=sys.stderr)
        return 2
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.pop("MLFLOW_TRACKING_URI", None)   # benchmarks write only to their own temporary stores
    from benchmarks.common import effective_cores, machine, resolve_device

    device = resolve_device(args.device)
    info = machine(device)
    info["effective_cores"] = effective_cores()
    run = {"command": "python -m benchmarks " + " ".join(shlex.quote(a) for a in argv),
           "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "machine": info}
    print(f"machine: {json.dumps(info)}", flush=True)
    results = []
    t0 = time.perf_counter()
    for n in names:
        mod = load(n)
        print(f"== {n}: {mod.TITLE}", flush=True)
        try:
            r = mod.run(quick=args.quick, device=device)
        except Exception as e:  # one failing benchmark must not lose the others' numbers
            traceback.print_exc()
            r = {"benchmark": n, "title": mod.TITLE, "ratio": None, "ratio_def": "", "target": "", "met": None,
                 "measurements": {}, "params": {"quick": args.quick, "device": device}, "notes": [],
                 "seconds": 0.0, "error": f"{type(e).__name__}: {e}"[:500]}
        results.append(r)
        shown = {k: r[k] for k in ("ratio", "target", "met", "seconds") if k in r}
        print(f"-> {n}: {json.dumps(shown)}", flush=True)
        for k, v in r["measurements"].items():
            print(f"   {k}: {v}", flush=True)
        if not args.no_write:                    # after each benchmark: a crash later keeps these numbers
            from benchmarks.docs import update

            update(Path(args.out), [r], run)
    if args.json:
        Path(args.json).write_text(json.dumps({"run": run, "results": results}, indent=1, default=str))
    print(f"done in {time.perf_counter() - t0:.0f} s" + ("" if args.no_write else f"; updated {args.out}"))
    return 1 if any(r.get("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
