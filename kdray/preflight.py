"""Checks that need torch, run before anything starts: does a plug-in model's output fit the data
set's classes, and does a checkpoint teacher's state dict fit its architecture?

Only setups that need them pay for them (a sweep of built-in models and trained teachers
imports no torch here).  Each failure is one ``SweepError`` line naming the file and field.
"""
from __future__ import annotations

from kdray.data import DATASETS
from kdray.models import MODELS
from kdray.sweep import Setup, Sweep, SweepError


def _builtin(target) -> bool:
    return isinstance(target, str) and target.startswith("kdray.")


def needs_preflight(s: Setup) -> bool:
    refs = [s.teacher, s.student_model]
    return s.teacher.checkpoint is not None or not _builtin(DATASETS.get(s.dataset.name).target) or \
        any(not _builtin(MODELS.get(r.arch).target) or MODELS.get(r.arch).requires for r in refs)


def preflight(sweep: Sweep, source: str) -> None:
    for i, s in enumerate(sweep.setups):
        if needs_preflight(s):
            _check_setup(sweep, s, f"{source}: setups[{i}]")


def _check_setup(sweep: Sweep, s: Setup, where: str) -> None:
    import torch

    from kdray import checkpoints
    from kdray.data import load_dataset
    from kdray.models import build_model

    try:
        bundle = load_dataset(s.dataset.name, sweep.data_root, **s.dataset.args)
    except Exception as e:
        raise SweepError(f"{where}.dataset: loading {s.dataset.name!r} failed: {type(e).__name__}: {e}") from None
    xb, _ = next(iter(bundle.test_batches(2)))
    x = bundle.preprocess(xb, False, None)
    refs = [("teacher", s.teacher)] + ([("student", s.student)] if s.student else [])
    for role, ref in refs:
        try:
            with torch.random.fork_rng(devices=[]):
                model = build_model(ref.arch, bundle.num_classes, bundle.input_shape, **ref.args)
            ckpt = getattr(ref, "checkpoint", None)
            if ckpt is not None:
                checkpoints.load_into(model, ckpt, ref.arch, ref.args)
            with torch.no_grad():
                out = model.eval()(x)
        except checkpoints.CheckpointError as e:
            raise SweepError(f"{where}.teacher.checkpoint: {e}") from None
        except Exception as e:
            raise SweepError(f"{where}.{role}.arch: building {ref.arch!r} or running it on {s.dataset.name!r} inputs "
                             f"failed: {type(e).__name__}: {str(e).strip()[:200]}") from None
        if isinstance(out, torch.Tensor) and out.is_floating_point() and not bool(torch.isfinite(out).all()):
            field = "teacher.checkpoint" if getattr(ref, "checkpoint", None) else f"{role}.arch"
            what = f"checkpoint {checkpoints.locate(ref.checkpoint)}" if getattr(ref, "checkpoint", None) else repr(ref.arch)
            raise SweepError(f"{where}.{field}: {what} gives NaN or infinite outputs on {s.dataset.name!r} test inputs; "
                             f"a teacher that cannot teach would leave every student and control without a target")
        if not isinstance(out, torch.Tensor) or out.shape[0] != x.shape[0] or out.shape[-1] != bundle.num_classes:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise SweepError(f"{where}.{role}.arch: {ref.arch!r} returns outputs of shape {shape} for a batch of "
                             f"{x.shape[0]}, but dataset {s.dataset.name!r} has {bundle.num_classes} classes; "
                             f"the model must return logits [batch, {bundle.num_classes}]")
