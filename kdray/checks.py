"""Checks that need more than the schema: does each setup's model fit its data and conditions?

The schema (kdray/sweep.py) checks each value on its own; these checks read
the declarations of architectures (kdray/models), data sets (kdray/data) and
conditions (kdray/conditions) to reject combinations that would fail or train
nonsense mid-sweep: unknown builder arguments, a CNN on text, ``epochs`` on a
data set that trains by iterations, a feature-map block beyond the model's
depth.  All of it runs without importing torch.  Each failure is one
``SweepError`` line naming the file and the field.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from kdray import conditions
from kdray.data import DATASETS, resolve_root
from kdray.models import ANY, MODELS
from kdray.registry import check_value
from kdray.sweep import Setup, Sweep, SweepError, enabled_conditions
from kdray.tracking import TrackingError, check_sqlite_store

MAX_TRIALS = 100_000          # above this a sweep needs an explicit --max-trials
# Names of what storage itself holds: a sweep so named would collide with it.
RESERVED_NAMES = ("mlflow.db", "trials", "mlartifacts")
TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks")


def check_sweep(sweep: Sweep, source: str) -> None:
    """Every model/data/condition check of every setup, then the data roots."""
    for i, setup in enumerate(sweep.setups):
        _check_setup(setup, f"{source}: setups[{i}]")
        _check_checkpoint(setup, f"{source}: setups[{i}].teacher.checkpoint")
    _check_data_roots(sweep, source)


def _check_checkpoint(s: Setup, where: str) -> None:
    """A checkpoint teacher's file must exist (whether it fits its architecture: kdray/preflight.py)."""
    if s.teacher.checkpoint is None:
        return
    from kdray import checkpoints
    try:
        found = checkpoints.exists(s.teacher.checkpoint)
    except checkpoints.CheckpointError as e:     # its storage cannot be opened
        raise SweepError(f"{where}: {str(e).removeprefix('checkpoint ')}") from None
    if not found:
        raise SweepError(f"{where}: {checkpoints.locate(s.teacher.checkpoint)} does not exist; give the file "
                         "torch.save(model.state_dict(), PATH) wrote")


def _check_args(where: str, args: dict, declared: dict, what: str) -> None:
    for key, value in args.items():
        if key not in declared:
            raise SweepError(f"{where}.args.{key}: unknown argument of {what}; valid: {', '.join(declared) or 'none'}")
        annotation = declared[key][0]
        if not check_value(annotation, value):
            raise SweepError(f"{where}.args.{key}: {what} expects {annotation}, got {value!r}")


def _check_setup(s: Setup, where: str) -> None:
    data = DATASETS.get(s.dataset.name)
    missing = data.missing()
    if missing:
        how = f"kdray[{data.extra}]" if data.extra else ", ".join(missing)
        raise SweepError(f"{where}.dataset.name: {data.name!r} needs {', '.join(missing)}, which is not installed: "
                         f"install {how}")
    _check_args(f"{where}.dataset", {**s.dataset.args, **s.teacher_dataset}, data.args(), f"dataset {data.name!r}")
    models = [("teacher", s.teacher)] + ([("student", s.student)] if s.student else [])
    for role, ref in models:
        arch = MODELS.get(ref.arch)
        missing = arch.missing()
        if missing:
            how = f"kdray[{arch.extra}]" if arch.extra else ", ".join(missing)
            raise SweepError(f"{where}.{role}.arch: {arch.name!r} needs {', '.join(missing)}, which is not "
                             f"installed: install {how}")
        _check_args(f"{where}.{role}", ref.args, arch.args(), f"architecture {arch.name!r}")
        if data.modality != ANY and data.modality not in arch.accepts:
            raise SweepError(f"{where}.{role}.arch: {arch.name!r} takes {' or '.join(arch.accepts)} inputs, but dataset "
                             f"{data.name!r} provides {data.modality}; pick an architecture for {data.modality}: "
                             + ", ".join(n for n in MODELS.names() if data.modality in MODELS.get(n).accepts))
    student = MODELS.get(s.student_model.arch)
    if any(w != 1.0 for w in s.widths) and "width" not in student.args():
        raise SweepError(f"{where}.widths: architecture {student.name!r} has no width argument to scale")
    for name, recipe in (("recipe", s.recipe.model_dump()), ("teacher_recipe", s.teacher_recipe),
                         ("student_recipe", s.student_recipe)):
        _check_budget(f"{where}.{name}", recipe, data)
    for cond, config in enabled_conditions(s.conditions):
        for method, params in cond.grid(config):
            _check_features(f"{where}.conditions.{cond.sweep_key}", conditions.get(method), params, s)


def _check_budget(where: str, recipe: dict, data) -> None:
    wrong = {"epochs": "iterations", "iterations": "epochs"}[data.budget]
    if recipe.get(wrong) is not None:
        raise SweepError(f"{where}.{wrong}: dataset {data.name!r} trains by {data.budget}, not {wrong}; "
                         f"give {data.budget} instead")


def _check_features(where: str, cond, params: dict, s: Setup) -> None:
    """A condition that reads block outputs needs that block in the student (and teacher, if used)."""
    if not cond.features:
        return
    block = params[cond.features]
    models = [s.student_model] + ([s.teacher] if cond.teacher == "features" else [])
    for ref in models:
        arch = MODELS.get(ref.arch)
        n = arch.n_blocks(ref.args)
        if n is None:
            with_blocks = [m for m in MODELS.names() if MODELS.get(m).blocks]
            raise SweepError(f"{where}: {cond.title} reads block outputs, but architecture {arch.name!r} has no "
                             f"blocks; use one of {', '.join(with_blocks)}")
        if block > n:
            raise SweepError(f"{where}.{cond.param(cond.features).grid}: block {block} is beyond {arch.name!r}'s "
                             f"{n} blocks (valid: 1..{n})")


def _check_data_roots(sweep: Sweep, source: str) -> None:
    """Data sets that read files need a data root that exists (checked before anything starts)."""
    root = resolve_root(sweep.data_root)
    for i, s in enumerate(sweep.setups):
        if not DATASETS.get(s.dataset.name).needs_root(s.dataset.args):
            continue
        if root is None:
            raise SweepError(f"{source}: setups[{i}].dataset: {s.dataset.name!r} reads files; set data_root or $KDRAY_DATA")
        if not root.is_dir():
            raise SweepError(f"{source}: data_root: {root} is not a directory")


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

def check_destinations(sweep: Sweep, source: str) -> None:
    """Storage that can be written, a sweep name that is free in it, and a tracking URI MLflow can use
    (an existing sqlite file must be an intact MLflow database), checked before Ray starts."""
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
    if uri or "://" not in sweep.storage or sweep.storage.startswith("file://"):
        # (object storage without a tracking server: the sweep names its server at run time)
        try:
            check_sqlite_store(sweep.resolved_tracking_uri())
        except TrackingError as e:
            raise SweepError(f"{source}: {e}") from None


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
