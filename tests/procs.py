"""The processes a test started, found by parentage (``/proc``), never by name or command line."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path


def default_sigint() -> None:
    """``preexec_fn`` for a child that a test interrupts: SIGINT back to its default.  A test runner
    started with SIGINT ignored (``pytest &`` in a script) passes the ignoring on to its children,
    and Python then never turns a SIGINT into KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ppid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])      # the field after the state


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren, ...)."""
    parent = {int(p.name): _ppid(int(p.name)) for p in Path("/proc").iterdir() if p.name.isdigit()}
    out, frontier = [], [pid]
    while frontier:
        kids = [c for c, pp in parent.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return _ppid(pid) is not None and "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def stop_tree(pid: int, grace: float = 15.0, root_first: bool = False) -> None:
    """SIGTERM ``pid`` and its descendants, then SIGKILL whatever is left after ``grace`` seconds.
    ``root_first``: SIGTERM ``pid`` alone first and give it ``grace`` seconds to stop its own processes
    (`ray start --block` stops a node's in order in ~3 s; a SIGTERM to each at once leaves a head's GCS
    waiting out the whole grace), then the same to whatever of the tree is left."""
    pids = [pid] + descendants(pid)
    if root_first:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.time() + grace
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not any(_alive(p) for p in pids):
            break
        for p in pids:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants at once: a machine that vanishes, not one that shuts down."""
    for p in [pid] + descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def terminate(proc, timeout: float = 10.0) -> None:
    """SIGTERM a subprocess.Popen this test started, SIGKILL it if it is still there after ``timeout``."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
