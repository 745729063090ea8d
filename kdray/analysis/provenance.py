"""What an answer came from: the fingerprints of its runs, its data and checkpoint checksums, and
the paired comparisons whose two sides ran on different fingerprints.

A paired test assumes the two runs of a seed differ only by their condition.  Two runs with
different fingerprints (another library build, CPU instruction set or GPU) can differ in their
last bits for that reason alone, which distillation's small effects can be the size of; such
pairs are counted per test (``fingerprint_mismatches`` in tests.csv) and in the summary.
Pure functions on the analysis' frames.
"""
from __future__ import annotations

import json
from collections import Counter

import pandas as pd

from kdray.provenance import describe


def _known(v) -> bool:
    return isinstance(v, str) and bool(v)


def mismatches(students: pd.DataFrame, tests: pd.DataFrame) -> list[int]:
    """Per test row: how many of its paired seeds have runs with two different fingerprints (runs
    without one, logged before kdray recorded them, are not counted)."""
    if "fingerprint" not in students or tests.empty:
        return [0] * len(tests)
    fp = {(r.setup, r.teacher_seed, r.condition, r.student_seed): r.fingerprint for r in students.itertuples()}
    seeds: dict[tuple, set] = {}
    for key in fp:
        seeds.setdefault(key[:3], set()).add(key[3])
    out = []
    for r in tests.itertuples():
        a, b = (r.setup, r.teacher_seed, r.condition), (r.setup, r.teacher_seed, r.control)
        both = seeds.get(a, set()) & seeds.get(b, set())
        out.append(sum(_known(fp[a + (s,)]) and _known(fp[b + (s,)]) and fp[a + (s,)] != fp[b + (s,)]
                       for s in both))
    return out


def summary_lines(runs: pd.DataFrame, tests: pd.DataFrame) -> list[str]:
    """The provenance block of a report's summary: fingerprints (with what they are), data and
    checkpoint checksums, teachers, and the paired comparisons that mix fingerprints."""
    lines = []
    used = runs[runs["status"] == "FINISHED"] if "status" in runs else runs
    col = {c: used[c].tolist() if c in used else [None] * len(used)
           for c in ("fingerprint", "fingerprint_json", "metrics_streamed", "setup", "data_sha256")}
    fps = Counter(v for v in col["fingerprint"] if _known(v))
    unknown = int(len(used) - sum(fps.values()))
    text = {fp: js for fp, js in zip(col["fingerprint"], col["fingerprint_json"]) if _known(fp) and _known(js)}
    lines.append(f"provenance: runs from {len(fps)} fingerprint{'s' if len(fps) != 1 else ''}"
                 + (f" ({unknown} runs recorded none)" if unknown else ""))
    for fp, n in fps.most_common():
        try:
            what = describe(json.loads(text[fp]))
        except (KeyError, ValueError):
            what = "no description recorded"
        lines.append(f"  fingerprint {fp} ({n} runs): {what}")
    simulated = sum('"simulated"' in str(js or "") for js in col["fingerprint_json"])
    if simulated:
        lines.append(f"  SIMULATED: {simulated} runs are GPU trials run on a CPU (KDRAY_SIMULATE_GPU=1): "
                     f"no GPU numbers in them")
    streamed = [v for v in col["metrics_streamed"] if _known(v)]
    if streamed:
        lines.append(f"  STREAMED: {len(streamed)} runs computed their functional metrics from files, without "
                     f"procrustes_distance (their test logits exceed $KDRAY_METRICS_MEMORY_BYTES; e.g. "
                     f"{streamed[0]})")
    data = sorted({(setup, sha) for setup, sha in zip(col["setup"], col["data_sha256"]) if _known(sha)})
    for setup, sha in data:
        lines.append(f"  data {setup}: sha256 {sha[:16]}")
    teachers = used[used["role"] == "teacher"] if "role" in used else used.iloc[0:0]
    for r in teachers.sort_values(["setup", "teacher_seed"]).itertuples():
        ckpt = f", checkpoint sha256 {r.checkpoint[:16]}" if _known(getattr(r, "checkpoint", None)) else ""
        lines.append(f"  teacher {r.setup} t{r.teacher_seed}: trial {r.trial_key}{ckpt}")
    if "fingerprint_mismatches" in tests and len(tests):
        mixed = tests[tests["fingerprint_mismatches"] > 0]
        if len(mixed):
            lines.append(f"  WARNING: {len(mixed)} paired tests compare runs with different fingerprints "
                         f"({int(mixed['fingerprint_mismatches'].sum())} seed pairs; tests.csv "
                         f"fingerprint_mismatches): part of a difference may be the machine's")
        else:
            lines.append("  every paired comparison's two runs share a fingerprint")
    return lines
