"""Test-only fault injection, so the reliability tests kill a process at a known point.

``KDRAY_TEST_EXIT_AT="<where>:<label substring>:<epoch>[:<marker file>]"`` makes the
process ``where`` ("worker": the trial's Ray worker, after it reported that epoch;
"driver": the sweep driver, once that trial's run is logged FINISHED with that many
epochs) hard-exit with status 87, like a crash.  With a marker file it fires only
once (the file is created first), so a restarted worker carries on.  Unset (always,
outside tests) it costs one environment lookup.

``KDRAY_TEST_SIGINT_AT="<point>"`` makes the process send itself SIGINT at that named
point (``ray_start``: the driver, just as it starts Ray), so a Ctrl-C lands there
every time instead of whenever a test's timer happens to fire.

``KDRAY_TEST_HOLD_AT="<label substring>:<epoch>:<folder>"`` makes a trial's Ray worker, once it
reported that epoch and if the folder exists, write ``<folder>/<pid>`` and wait until ``<folder>/release`` exists (at
most 10 minutes), so a test can act (kill the node a worker is on) while a trial is surely
running, not after it happened to finish.  A DDP trial's ranks hold too, each on its own node.

``KDRAY_TEST_DRIVER_HOLD="<folder>"`` makes the sweep driver, at its next write to MLflow once the
folder exists, write ``<folder>/held`` and wait the same way (``<folder>/release``), so a test can
lose a node while the driver is writing to MLflow.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

ENV = "KDRAY_TEST_EXIT_AT"
EXIT_STATUS = 87
SIGINT_ENV = "KDRAY_TEST_SIGINT_AT"
HOLD_ENV = "KDRAY_TEST_HOLD_AT"
DRIVER_HOLD_ENV = "KDRAY_TEST_DRIVER_HOLD"
RELEASE = "release"


def maybe_exit(where: str, label: str, epoch) -> None:
    value = os.environ.get(ENV)
    if not value:
        return
    w, sub, at, *marker = value.split(":", 3)
    if w != where or sub not in label or str(epoch) != at:
        return
    if marker:
        try:
            os.close(os.open(marker[0], os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
    os._exit(EXIT_STATUS)


def maybe_interrupt(point: str) -> None:
    """Deliver SIGINT to this process now when the test asked for it at ``point``."""
    if os.environ.get(SIGINT_ENV) == point:
        os.kill(os.getpid(), signal.SIGINT)


def maybe_hold(label: str, epoch) -> None:
    """Wait here (this worker's pid written first) until the test releases the hold."""
    value = os.environ.get(HOLD_ENV)
    if not value:
        return
    sub, at, folder = value.split(":", 2)
    if sub not in label or str(epoch) != at:
        return
    _hold(Path(folder), str(os.getpid()), label)


def maybe_hold_driver() -> None:
    """The driver's hold, before an MLflow write (kdray/tracking.py): once, while the folder is there."""
    folder = os.environ.get(DRIVER_HOLD_ENV)
    if folder and not (Path(folder) / RELEASE).exists():
        _hold(Path(folder), "held", str(os.getpid()))


def _hold(folder: Path, name: str, text: str) -> None:
    if not folder.is_dir():
        return
    (folder / name).write_text(text)
    deadline = time.monotonic() + 600
    while not (folder / RELEASE).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
