"""Checks of a loaded sweep that the CLI runs before anything starts: its size and where its
results go (storage, sweep name, tracking URI).

Whether each setup's model fits its data and conditions is checked while the file is loaded
(kdray/setup_checks.py, re-exported here as ``check_sweep``).  Each failure is one
``SweepError`` line naming the file and the field.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from kdray.setup_checks import check_sweep  # noqa: F401 - re-exported
from kdray.sweep import Sweep, SweepError, enabled_conditions
from kdray.tracking import TrackingError, check_sqlite_store

MAX_TRIALS = 100_000          # above this a sweep needs an explicit --max-trials
# Names of what storage itself holds: a sweep so named would collide with it.
RESERVED_NAMES = ("mlflow.db", "trials", "mlartifacts")
TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


# ------------------------------------------------------------------ size

def count_trials(sweep: Sweep) -> int:
    """How many trials the sweep plans, counted without building them (an upper bound when setups
    share teachers)."""
    total = 0
    for s in sweep.setups:
        per_seed = 0
        for cond, config in enabled_conditions(s.conditions):
            if cond.expand is None:
                per_seed += math.prod(len(getattr(config, p.grid)) for p in cond.params)
            else:
                per_seed += len(cond.grid(config))
        total += len(s.teacher_seeds) * (1 + len(s.widths) * len(s.student_seeds) * per_seed)
    return total


def check_size(sweep: Sweep, source: str, max_trials: int = MAX_TRIALS) -> int:
    n = count_trials(sweep)
    if n > max_trials:
        raise SweepError(f"{source}: the grid expands to {n:,} trials, more than the limit of {max_trials:,}; "
                         f"shrink the grid or pass --max-trials {n}")
    return n


# ------------------------------------------------------------------ where results go

def check_destinations(sweep: Sweep, source: str, reach_storage: bool = True) -> None:
    """Storage that can be written, a sweep name that is free in it, and a tracking URI MLflow can use
    (an existing sqlite file must be an intact MLflow database), checked before Ray starts.
    ``reach_storage=False`` (``kdray plan``, a preview that may run where the bucket's credentials
    are not): an object store is not contacted and may still lack its tracking URI."""
    if sweep.name in RESERVED_NAMES:
        raise SweepError(f"{source}: name: {sweep.name!r} is the name of storage's own "
                         f"{'file' if '.' in sweep.name else 'folder'} ({', '.join(RESERVED_NAMES)} are taken); rename the sweep")
    if "://" not in sweep.storage or sweep.storage.startswith("file://"):
        _check_writable(sweep.local_storage(), f"{source}: storage")
        own = sweep.local_storage() / sweep.name
        if own.exists() and not own.is_dir():
            raise SweepError(f"{source}: name: {sweep.name!r} collides with the file {own} in storage; rename the sweep")
    uri = sweep.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        _check_tracking_uri(uri, f"{source}: tracking_uri" if sweep.tracking_uri else "$MLFLOW_TRACKING_URI")
    from kdray.objectstore import is_object_store
    if is_object_store(sweep.storage):
        if not reach_storage and not uri:
            return
        if reach_storage:
            _check_object_store(sweep, source, uri)
    try:
        check_sqlite_store(sweep.resolved_tracking_uri())
    except TrackingError as e:
        raise SweepError(f"{source}: {e}") from None


def _check_object_store(sweep: Sweep, source: str, uri: str | None) -> None:
    """An object store holds no MLflow database, must answer with the bucket and take a write
    (kdray/objectstore.py), and MLflow needs its client library to put artifacts there."""
    from kdray.objectstore import artifact_client_missing, check_storage
    if not uri:
        raise SweepError(f"{source}: storage: {sweep.storage} is an object store, which cannot hold the MLflow "
                         "database; give tracking_uri (sqlite:///PATH on this machine, or http://HOST:PORT of an "
                         "MLflow server) or set $MLFLOW_TRACKING_URI")
    check_storage(sweep.storage, f"{source}: storage")
    missing = artifact_client_missing(sweep.storage) if uri.startswith("sqlite") else ""
    if missing:
        raise SweepError(f"{source}: storage: MLflow writes this sweep's artifacts to {sweep.storage} with "
                         f"{missing}, which is not installed; pip install {missing}")


def _check_writable(path: Path, where: str) -> None:
    """The folder, or its nearest existing parent, must be a directory this process can write in
    (tested by creating and removing a temporary folder: nothing is left behind)."""
    probe = Path(path)
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise SweepError(f"{where}: {path} cannot be created: {probe} is a file, not a folder")
    try:
        tempfile.TemporaryDirectory(dir=probe).cleanup()
    except OSError as e:
        raise SweepError(f"{where}: {path} is not writable ({e.strerror or e}); choose a folder you can write") from None


def _check_tracking_uri(uri: str, where: str) -> None:
    u = urlparse(uri)
    if u.scheme not in TRACKING_SCHEMES:
        raise SweepError(f"{where}: {uri!r} is not a tracking URI; expected sqlite:///PATH, http(s)://HOST[:PORT], "
                         f"postgresql://..., or file:///PATH")
    if u.scheme in ("http", "https", "postgresql", "mysql", "mssql") and not u.hostname:
        raise SweepError(f"{where}: {uri!r} names no host")
    if u.scheme == "sqlite":
        if not uri.startswith("sqlite:///") or len(uri) <= len("sqlite:///"):
            raise SweepError(f"{where}: {uri!r}: a sqlite URI is sqlite:///RELATIVE/PATH or sqlite:////ABSOLUTE/PATH")
        _check_writable(Path(uri.removeprefix("sqlite:///")).expanduser().parent, where)
