"""How far packed students drift from their unpacked runs on the quickstart's own recipe, and what
that does to its decisions (issue 25): not a speed ratio, a measurement of numbers.

``python -m benchmarks.pack_drift [--dir DIR] [--pack K]`` runs the quickstart twice with `kdray
sweep` (students one per trial, then packed K per trial; each with its own storage under DIR),
compares every student's final metrics between the two by trial key, and compares the two
reports' transfer decisions.  Re-running with the same DIR resumes (finished sweeps are skipped),
so the comparison can be repeated without training again.  Prints a Markdown block for
docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"
METRICS = ("test_acc", "test_loss", "activation_distance", "js_divergence", "rank_disagreement",
           "prediction_disagreement", "correct_agreement", "incorrect_agreement")


def _write(dir_: Path, name: str, pack: int) -> Path:
    d = yaml.safe_load(QUICKSTART.read_text())
    d = copy.deepcopy(d)
    d["storage"] = str(dir_ / name)
    d["setups"][0].setdefault("resources", {}).setdefault("student", {})["pack"] = pack
    path = dir_ / f"{name}.yaml"
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    return path


def _sweep(path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "kdray.cli", "sweep", str(path), "--quiet"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"kdray sweep {path} failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def _analysis(path: Path):
    from kdray.analysis.report import load_target
    from kdray.analysis.pipeline import analyse

    df = load_target(str(path), None)[0]
    return df, analyse(df, power_draws=0)


def compare(dir_: Path, pack: int) -> str:
    paths = {"unpacked": _write(dir_, "unpacked", 1), f"packed {pack}": _write(dir_, "packed", pack)}
    for p in paths.values():
        _sweep(p)
    (ua, a), (pa, b) = (_analysis(p) for p in paths.values())
    u = ua[ua["role"] == "student"].set_index("trial_key")
    p = pa[pa["role"] == "student"].set_index("trial_key")
    keys = sorted(set(u.index) & set(p.index))
    lines = [f"Quickstart ({len(keys)} students, its own CNN: Adam, BatchNorm, dropout), packed {pack} per trial "
             f"vs one per trial, same trial keys; |packed - unpacked| per student:", "",
             "| metric | max | median | students that differ at all |", "|---|---|---|---|"]
    for m in METRICS:
        d = np.abs(p.loc[keys, m].to_numpy(float) - u.loc[keys, m].to_numpy(float))
        lines.append(f"| {m} | {d.max():.3g} | {np.median(d):.3g} | {int((d > 0).sum())} of {len(keys)} |")

    def decided(an) -> dict:
        return {(r.setup, r.teacher_seed, r.condition.label): (bool(r.supported), bool(r.marginal), r.asymmetry)
                for r in an.decisions.itertuples()}
    da, db = decided(a), decided(b)
    moved = [k for k in da if da[k] != db.get(k)]
    lines += ["", f"Transfer decisions: {len(da) - len(moved)} of {len(da)} the same."]
    for k in moved:
        lines.append(f"- {k[0]} t{k[1]} {k[2]}: unpacked supported={da[k][0]} marginal={da[k][1]} {da[k][2]}; "
                     f"packed supported={db[k][0]} marginal={db[k][1]} {db[k][2]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pack_drift", description=__doc__.splitlines()[0])
    ap.add_argument("--dir", help="where the two sweeps run (default: a temporary folder)")
    ap.add_argument("--pack", type=int, default=16, help="students per packed trial (default 16)")
    args = ap.parse_args(argv)
    if args.dir:
        Path(args.dir).mkdir(parents=True, exist_ok=True)
        print(compare(Path(args.dir).resolve(), args.pack))
    else:
        with tempfile.TemporaryDirectory(prefix="kdray-pack-drift-") as d:
            print(compare(Path(d), args.pack))
    return 0


if __name__ == "__main__":
    sys.exit(main())
