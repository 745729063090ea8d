"""Checks that need more than the schema: does each setup's model fit its data and conditions?

The schema (kdray/sweep.py) checks each value on its own; these checks read
the declarations of architectures (kdray/models), data sets (kdray/data) and
conditions (kdray/conditions) to reject combinations that would fail or train
nonsense mid-sweep: unknown builder arguments, a CNN on text, ``epochs`` on a
data set that trains by iterations, a feature-map block beyond the model's
depth.  All of it runs without importing torch.  Each failure is one
``SweepError`` line naming the file and the field.

The schema calls ``check_sweep`` when it loads a file, so this module reads the
schema's objects without importing kdray.sweep (no import cycle).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from kdray import conditions, streamlimit
from kdray.conditions import enabled_conditions
from kdray.data import DATASETS, resolve_root
from kdray.errors import SweepError
from kdray.models import MODELS
from kdray.registry import check_value

if TYPE_CHECKING:   # annotations only: kdray.sweep imports this module
    from kdray.sweep import Setup, Sweep


def check_sweep(sweep: Sweep, source: str) -> None:
    """Every model/data/condition check of every setup, then the data roots."""
    for i, setup in enumerate(sweep.setups):
        _check_setup(setup, f"{source}: setups[{i}]")
        _check_checkpoint(setup, f"{source}: setups[{i}].teacher.checkpoint")
    _check_data_roots(sweep, source)
    try:   # read by every trial (kdray/streamed.py): a bad value would fail them all, one by one
        streamlimit.memory_limit()
    except ValueError as e:
        raise SweepError(str(e)) from None


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


def _check_args(where: str, args: dict, declared: dict, what: str, ranges=None) -> None:
    """Each argument must be one the builder takes, of its annotated type, inside its declared range."""
    for key, value in args.items():
        if key not in declared:
            raise SweepError(f"{where}.args.{key}: unknown argument of {what}; valid: {', '.join(declared) or 'none'}")
        annotation = declared[key][0]
        if not check_value(annotation, value):
            raise SweepError(f"{where}.args.{key}: {what} expects {annotation}, got {value!r}")
        why = (ranges or {}).get(key) and ranges[key].why_not(value)
        if why:
            raise SweepError(f"{where}.args.{key}: {what}: {key} {why}")


def _missing_extra(where: str, entry) -> None:
    """One line when a declared data set or architecture needs modules of an extra that is not installed."""
    missing = entry.missing()
    if missing:
        how = f"kdray[{entry.extra}]" if entry.extra else ", ".join(missing)
        raise SweepError(f"{where}: {entry.name!r} needs {', '.join(missing)}, which is not installed: install {how}")


def _check_setup(s: Setup, where: str) -> None:
    data = DATASETS.get(s.dataset.name)
    _missing_extra(f"{where}.dataset.name", data)
    _check_args(f"{where}.dataset", {**s.dataset.args, **s.teacher_dataset}, data.args(), f"dataset {data.name!r}",
                data.ranges)
    models = [("teacher", s.teacher)] + ([("student", s.student)] if s.student else [])
    for role, ref in models:
        arch = MODELS.get(ref.arch)
        _missing_extra(f"{where}.{role}.arch", arch)
        _check_args(f"{where}.{role}", ref.args, arch.args(), f"architecture {arch.name!r}", arch.ranges)
        if not arch.takes(data.modality):
            fits = [n for n in MODELS.names() if MODELS.get(n).takes(data.modality)]
            raise SweepError(f"{where}.{role}.arch: {arch.name!r} takes {' or '.join(arch.accepts)} inputs, but dataset "
                             f"{data.name!r} provides {data.modality}; "
                             + (f"pick an architecture for {data.modality}: {', '.join(fits)}" if fits else
                                f"no architecture declares {data.modality} inputs: declare one with "
                                f"accepts=({data.modality!r},) or ('any',)"))
    student = MODELS.get(s.student_model.arch)
    if any(w != 1.0 for w in s.widths) and "width" not in student.args():
        raise SweepError(f"{where}.widths: architecture {student.name!r} has no width argument to scale")
    for name, recipe in (("recipe", s.recipe.model_dump()), ("teacher_recipe", s.teacher_recipe),
                         ("student_recipe", s.student_recipe)):
        _check_budget(f"{where}.{name}", recipe, data)
    for cond, config in enabled_conditions(s.conditions):
        for method, params in cond.grid(config):
            _check_features(f"{where}.conditions.{cond.sweep_key}", conditions.get(method), params, s)
            _check_sequences(f"{where}.conditions.{cond.sweep_key}", conditions.get(method), params, s, data)


def _check_budget(where: str, recipe: dict, data) -> None:
    wrong = {"epochs": "iterations", "iterations": "epochs"}[data.budget]
    if recipe.get(wrong) is not None:
        raise SweepError(f"{where}.{wrong}: dataset {data.name!r} trains by {data.budget}, not {wrong}; "
                         f"give {data.budget} instead")


def _check_sequences(where: str, cond, params: dict, s: Setup, data) -> None:
    """A condition that trains on generated text (seqkd: the teacher's, gkd: the student's own) needs a
    language model, and a prompt shorter than the block."""
    if not cond.generates:
        return
    if data.task != "lm":
        raise SweepError(f"{where}: {cond.title} trains on generated text; dataset {data.name!r} "
                         f"is {data.task}, not a language model (lm)")
    block = s.dataset.args.get("block_size")
    prompt = params.get("prompt")
    if isinstance(block, int) and isinstance(prompt, int) and prompt >= block:
        raise SweepError(f"{where}.prompts: prompt {prompt} must be shorter than the data set's block_size {block}")


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
