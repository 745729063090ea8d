"""Benchmark: ``kdray sweep`` with packed students vs the plain sequential loop (issue 15).

The same comparison as ``benchmarks.sweep`` (one ``run_sweep`` into fresh
storage, Ray start-up counted, against ``run_trial`` over the same plan in one
process with torch on every core), on quickstart-size grids whose students
are packed (``resources.student.pack``):

* ``quickstart-tiny-packed`` (the headline): the quickstart's whole 86-trial
  grid (2 teachers, 6 student seeds, SIDDO and KD/RCD at 3 alphas) with its
  CNN at 4 channels (BatchNorm and dropout 0.1 as shipped), the kind of student
  whose CPU steps are bound by per-operation overhead: what packing is for.
* ``quickstart-packed``: the 44-trial quickstart grid of the sweep benchmark
  with the quickstart's own 16-channel CNN.  Its steps are bound by convolution arithmetic on a CPU; it is
  reported beside the headline, not counted in it (docs/benchmarks.md,
  "Packed trials", says why).

kdray and the all-core loop alternate ``reps`` times (3 in full mode) on the
headline grid (medians); a one-thread loop runs once after them.  The headline
compares kdray with the faster of the two loops.
"""
from __future__ import annotations

from typing import Optional

from benchmarks.common import cpu_count, now
from benchmarks.sweep import assemble, compare, grid

NAME = "packed_sweep"
TITLE = "kdray sweep with packed students vs a plain sequential loop"
TARGET = 0.5
HEADLINE = ("quickstart-tiny-packed",)

NOTES = [
    "Grids: 'quickstart-tiny-packed' is search_spaces/quickstart.yaml (all 86 trials) with its small_cnn at "
    "channels 4 (BatchNorm and dropout 0.1 kept) and resources.student.pack 16: each teacher's 42 students in "
    "3 packs of 14.  'quickstart-packed' is the sweep benchmark's 44-trial quickstart grid with the quickstart's "
    "own small_cnn(16), pack 16 (packs of 11 and 10).  The loops train the same plan one trial at a time.",
    "Headline ratio: the quickstart-tiny-packed grid's median kdray wall time (Ray start-up included) / the "
    "faster plain loop's (the median all-core loop or the one-thread loop); quickstart-packed is reported, not "
    "counted: its steps are bound by convolution arithmetic on a CPU, which packing does not reduce.",
]


def run(quick: bool = False, device: str = "cpu", grids: Optional[dict[str, dict]] = None,
        slots: Optional[int] = None, reps: Optional[int] = None) -> dict:
    t0 = now()
    slots = slots or cpu_count()
    reps = reps or (1 if quick else 3)
    grids = grids or {"quickstart-tiny-packed": grid("quickstart-tiny-packed", quick),
                      "quickstart-packed": grid("quickstart-packed", quick)}
    cases = [compare(name, d, device, (slots,), slots, reps if name in HEADLINE else 1, once=(1,))
             for name, d in grids.items()]
    headline = tuple(n for n in HEADLINE if n in grids) or None
    return assemble(cases, quick, device, slots, now() - t0, name=NAME, title=TITLE, target=TARGET,
                    headline=headline, notes=NOTES, reps=reps, baseline="ratio_best_loop")
