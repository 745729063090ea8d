"""Trials that finished but mean nothing: test accuracy at chance (1/K), a training loss that rose.

Such a sweep exits like a good one unless someone looks; the sweep summary and the
report flag it.  Read from a trial's final record (``chance_acc`` and
``train_loss_first`` are logged with it), so the driver and the report decide alike.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

CHANCE_FACTOR = 1.25     # test accuracy at most 1.25 x chance (1/K) counts as chance
SHOW = 10                # suspect trials listed


def _num(v) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def suspicion(record: dict) -> str:
    """Why a finished trial's results look like nonsense ('' when they do not)."""
    acc, chance = _num(record.get("test_acc")), _num(record.get("chance_acc"))
    if acc is not None and chance and acc <= CHANCE_FACTOR * chance:
        return f"test accuracy {acc:.3f} is at chance (1/{round(1 / chance)} = {chance:.3f})"
    first, last = _num(record.get("train_loss_first")), _num(record.get("train_loss"))
    if first is not None and last is not None and last > first:
        return f"training loss rose from {first:.4g} (first epoch) to {last:.4g} (last): diverging"
    return ""


def sanity_lines(trials: Iterable[tuple[str, str, str]], finished: int) -> list[str]:
    """The summary's sanity section from (role, label, reason) of the suspect trials."""
    trials = list(trials)
    if not trials:
        return []
    teachers = sum(role == "teacher" for role, _, _ in trials)
    head = "WARNING: every finished trial" if len(trials) == finished else f"warning: {len(trials)} of {finished} finished trials"
    out = [f"{head} looks like nonsense ({teachers} teacher(s)): accuracy at chance or a diverging loss; "
           f"check the recipe (lr, epochs) before reading the results"]
    out += [f"  suspect {role} {label}: {reason}" for role, label, reason in trials[:SHOW]]
    if len(trials) > SHOW:
        out.append(f"  ... and {len(trials) - SHOW} more")
    return out


def report_lines(runs: list[dict]) -> list[str]:
    """The report's sanity section from its runs (one dict per run: role, status, metrics, names):
    teachers' test accuracy against chance, and every suspect trial."""
    done = [r for r in runs if r.get("status") == "FINISHED"]
    teachers = [r for r in done if r.get("role") == "teacher" and _num(r.get("test_acc")) is not None]
    chance = sorted({round(_num(r.get("chance_acc")), 4) for r in done if _num(r.get("chance_acc"))})
    out = []
    if teachers:
        accs = [_num(r["test_acc"]) for r in teachers]
        out.append(f"sanity: teachers' test accuracy {min(accs):.3f}..{max(accs):.3f} over {len(accs)} teacher(s); "
                   f"chance (1/K) {', '.join(f'{c:.3f}' for c in chance) or 'not logged'}")
    suspects = [(r.get("role", "?"), _label(r), suspicion(r)) for r in done]
    return out + sanity_lines([s for s in suspects if s[2]], len(done))


def _label(r: dict) -> str:
    parts = [r.get("setup"), r.get("method"), f"t{r.get('teacher_seed')}"]
    if r.get("role") == "student":
        parts.append(f"s{r.get('student_seed')}")
    return "-".join(str(p) for p in parts)
