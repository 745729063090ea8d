"""``kdray power`` and the seed recommendations of ``kdray plan --pilot`` and ``kdray audit --pilot``:
a finished sweep's runs as the pilot (their noise only), the power at each metric's SESOI, and the
student seeds a study needs, before anything new trains.

The top of the analysis pipeline beside report.py: it loads runs (report.load_target), analyses
them (pipeline.analyse) and renders (tables), so no lower module needs to import upwards.
"""
from __future__ import annotations

import sys
from typing import Optional

from kdray.analysis import corrections
from kdray.analysis.power import DRAWS, needs_text
from kdray.analysis.report import load_target
from kdray.analysis.runs import ReportError
from kdray.analysis.pipeline import analyse
from kdray.analysis.stats import LEVEL
from kdray.analysis.tables import power_table
from kdray.metric_names import TRANSFER_METRICS


def pilot_analysis(target: str, tracking_uri: Optional[str], correction: str = corrections.DEFAULT,
                   draws: int = 2 * DRAWS, level: float = LEVEL, sesoi: Optional[dict] = None):
    """(analysis, experiment name) of a pilot sweep; ReportError when there is nothing to analyse."""
    df, _, name, _, _ = load_target(target, tracking_uri)
    return analyse(df, level=level, correction=correction, power_draws=draws, sesoi=sesoi), name


def effect_text(a) -> str:
    return ("effect: every functional metric better than every control by its SESOI ("
            + ", ".join(f"{m} {a.sesoi[m]:g}" for m in TRANSFER_METRICS) + ")")


def seed_lines(target: str, tracking_uri: Optional[str], correction: str = corrections.DEFAULT,
               sesoi: Optional[dict] = None, draws: int = DRAWS) -> list[str]:
    """What ``kdray plan --pilot`` and ``kdray audit --pilot`` print: per setup of the pilot, the student
    seeds each treated condition needs for 80% power at the SESOI (pessimistic noise in brackets)."""
    a, name = pilot_analysis(target, tracking_uri, correction, draws, sesoi=sesoi)
    return [f"seeds from pilot {name!r} ({len(a.students)} student runs, their noise only; {effect_text(a)}):"] + [
        f"  {line}" for line in needs_text(a)]


def run_power(target: str, tracking_uri: Optional[str], correction: str = corrections.DEFAULT,
              draws: int = 2 * DRAWS, level: float = LEVEL, sesoi: Optional[dict] = None) -> int:
    """What ``kdray power`` does: the power table and the seeds each condition needs; exit code 2 on a user error."""
    try:
        a, name = pilot_analysis(target, tracking_uri, correction, draws, level, sesoi)
    except ReportError as e:
        print(f"kdray: error: {e}", file=sys.stderr)
        return 2
    print(f"kdray power: {name}: {len(a.students)} student runs as the pilot (their noise only), "
          f"{draws} simulated studies per estimate; {corrections.family_text(correction)}; level {level:g}; "
          f"{effect_text(a)}")
    print(power_table(a).markdown())
    print("\n".join(needs_text(a)))
    return 0
