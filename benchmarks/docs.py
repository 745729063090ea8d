"""Write benchmark records into docs/benchmarks.md.

The file keeps hand-written text outside generated blocks.  Each benchmark owns
one block::

    <!-- bench:NAME:start -->
    ... (regenerated on every run of NAME) ...
    <!-- bench:NAME:end -->

and the summary table between ``<!-- bench:summary:start/end -->`` is rebuilt
from the records embedded (as one JSON comment line) in every block, so
running a single benchmark updates its row and leaves the others as they were.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from benchmarks import NAMES
from benchmarks.common import fmt

HEADER = """# Benchmarks

Generated blocks below are rewritten by `python -m benchmarks NAME|all [--quick]`;
text outside them is kept.

## Summary

<!-- bench:summary:start -->
<!-- bench:summary:end -->
"""

_JSON = re.compile(r"^<!-- record: (?P<json>.*) -->$", re.M)


def _met(r: dict) -> str:
    if r.get("error"):
        return "error"
    return {True: "yes", False: "**no**", None: "n/a"}[r.get("met")]


def render_block(r: dict, run: dict) -> str:
    """Markdown for one benchmark record; ``run`` holds command, date and machine."""
    m = run["machine"]
    machine = (f"{m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}, device {m.get('device')}"
               + (f" ({m['gpu']})" if m.get("gpu") else "")
               + (f"; load average {m['load_avg_1m']} at start" if "load_avg_1m" in m else "")
               + (f"; effective parallel cores at start {m['effective_cores']['effective_cores']}"
                  if isinstance(m.get("effective_cores"), dict) else ""))
    lines = [f"### {r['benchmark']}: {r['title']}", "",
             f"- command: `{run['command']}`",
             f"- date: {run['date']}",
             f"- machine: {machine}"]
    if r.get("error"):
        lines += [f"- **error**: `{r['error']}`", ""]
    else:
        ratio = "n/a" if r.get("ratio") is None else f"**{r['ratio']:.3g}**"
        lines += [f"- ratio: {ratio} ({r['ratio_def']}); target: {r['target']}; met: {_met(r)}"
                  + (f"; per case: {r['ratio_text']}" if r.get("ratio_text") else ""),
                  f"- benchmark wall time: {r['seconds']:.0f} s", "",
                  "| measurement | value |", "|---|---|"]
        for k, v in r["measurements"].items():
            if isinstance(v, (list, tuple)):
                v = ", ".join(fmt(x) for x in v)
            lines.append(f"| {k} | {fmt(v)} |")
        lines.append("")
        lines += [f"- {n}" for n in r.get("notes", [])]
        lines.append(f"- parameters: `{json.dumps(r.get('params', {}), sort_keys=True, default=str)}`")
        lines.append("")
    record = {k: r.get(k) for k in ("benchmark", "title", "ratio", "ratio_text", "ratio_def", "target", "met",
                                     "error")}
    record.update(date=run["date"], command=run["command"], device=m.get("device"),
                  quick=bool(r.get("params", {}).get("quick")))
    lines.append(f"<!-- record: {json.dumps(record, default=str)} -->")
    return "\n".join(lines) + "\n"


def render_summary(records: list[dict]) -> str:
    lines = ["| # | benchmark | measured ratio | ratio means | target | met | run |", "|---|---|---|---|---|---|---|"]
    for r in records:
        i = NAMES.index(r["benchmark"]) + 1 if r["benchmark"] in NAMES else "?"
        ratio = "error" if r.get("error") else ("n/a" if r.get("ratio") is None else f"{r['ratio']:.3g}")
        if r.get("ratio_text") and not r.get("error"):
            ratio += f" ({r['ratio_text']})"
        run = f"{r['date'][:10]}, {r['device']}" + (", quick" if r.get("quick") else "")
        lines.append(f"| {i} | [{r['benchmark']}](#{r['benchmark']}) | {ratio} | {r.get('ratio_def', '')} | "
                     f"{r.get('target', '')} | {_met(r)} | {run} |")
    return "\n".join(lines) + "\n"


def update(path: Path, results: list[dict], run: dict) -> None:
    """Replace (or append) each result's block, then rebuild the summary."""
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    if "<!-- bench:summary:start -->" not in text:
        text += "\n## Summary\n\n<!-- bench:summary:start -->\n<!-- bench:summary:end -->\n"
    for r in results:
        name = r["benchmark"]
        block = f"<!-- bench:{name}:start -->\n<a id=\"{name}\"></a>\n\n{render_block(r, run)}<!-- bench:{name}:end -->\n"
        pattern = re.compile(rf"<!-- bench:{name}:start -->\n.*?<!-- bench:{name}:end -->\n?", re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text, count=1)
        else:
            text = _insert_in_order(text, name, block)
    records = [json.loads(mt.group("json")) for mt in _JSON.finditer(text)]
    records.sort(key=lambda r: NAMES.index(r["benchmark"]) if r["benchmark"] in NAMES else 99)
    summary = f"<!-- bench:summary:start -->\n{render_summary(records)}<!-- bench:summary:end -->\n"
    text = re.sub(r"<!-- bench:summary:start -->\n.*?<!-- bench:summary:end -->\n?", lambda _: summary, text,
                  count=1, flags=re.S)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _insert_in_order(text: str, name: str, block: str) -> str:
    """Before the block of the next benchmark in NAMES order that exists, else at the end of the results."""
    later = NAMES[NAMES.index(name) + 1:] if name in NAMES else ()
    for other in later:
        mark = f"<!-- bench:{other}:start -->"
        if mark in text:
            return text.replace(mark, block + "\n" + mark, 1)
    end = "<!-- bench:results:end -->"
    if end in text:
        return text.replace(end, block + "\n" + end, 1)
    return text.rstrip("\n") + "\n\n" + block


def read_records(path: Path) -> list[dict]:
    text = Path(path).read_text() if Path(path).exists() else ""
    return [json.loads(m.group("json")) for m in _JSON.finditer(text)]


def last_record(path: Path, name: str) -> Optional[dict]:
    return next((r for r in read_records(path) if r["benchmark"] == name), None)
