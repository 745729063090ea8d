"""Which students pack, and why not: decided with the plan, from the specs and the declarations.

A student that asks to be packed (``resources.student.pack`` > 1) joins a pack unless one of
these holds (checked in this order; the first is its reason):

* its data set cannot give K students their own batches: a streaming loader (FFCV,
  ``Dataset(batches="streaming")``) or a data set that draws its own batches
  (``Dataset(batches="own")``);
* its recipe compiles, trains in bf16 or channels-last;
* its model runs under vmap (no stacked forward in ``kdray/stacked`` for it) and has
  BatchNorm, or dropout > 0 (``Architecture(packs=Packs(...))`` says which);
* its condition matches features (block hooks), or declares why it trains alone
  (``Condition.alone``: sequence-level KD and on-policy GKD train on generated text).

For the built-in models and data sets this is read from their declarations
(``kdray.models.Packs``, ``kdray.data.Dataset.batches``) and the spec: torch-free, no
model is built and no data set is loaded, so ``kdray plan`` shows it.  A plug-in model or
data set that declares nothing is looked at instead (``looked_reasons``: one model is
built and one data set loaded per architecture and data set, as the check always did);
that is the one path here that imports torch, and it runs only for such plug-ins.

``unpackable`` is the same rule on a built model and a loaded data set: the fallback's
check, and ``packing.run_pack``'s run-time safety net (a pack whose student turns out
unpackable fails with the plan's disagreement named, it never trains differently).

Packs are cut from every planned student that packs (``jobs``), never from what is left
to run, so a pack is the same students whatever ran before.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Optional, Sequence

from kdray.data import DATASETS
from kdray.models import MODELS
from kdray.spec import TrialSpec
from kdray.sweep import Recipe

# Why a student trains alone (one line each; the same words whichever path decided).
STREAMING = "streaming data sets (FFCV) share one loader, which K students cannot drive apart"
OWN_BATCHES = "the data set draws its own batches (train_batches), which a pack does not call"
RECIPE = "compile/bf16/channels_last recipes are trained alone"
BATCH_NORM = "BatchNorm running statistics are not stacked under vmap"
DROPOUT = "dropout > 0: vmap cannot give each student its own dropout stream"
FEATURES = "feature-matching conditions hook module blocks, which vmap does not see"
BATCHES = {"indexed": None, "streaming": STREAMING, "own": OWN_BATCHES}   # Dataset.batches -> reason


def asks_to_pack(spec: TrialSpec) -> bool:
    """The sweep asks for this student to be packed (``resources.student.pack`` > 1)."""
    return int(spec.resources.get("pack", 1)) > 1


# ------------------------------------------------------------------ the decision


def _recipe_reason(spec: TrialSpec) -> Optional[str]:
    r = Recipe(**spec.recipe)
    return RECIPE if r.compile or r.precision == "bf16" or r.channels_last else None


def _features_reason(spec: TrialSpec) -> Optional[str]:
    """The condition's own reason: the one it declares (``alone``: generated training data), or block hooks."""
    cond = spec.condition
    if cond is None:
        return None
    return cond.alone or (FEATURES if cond.features else None)


class Undeclared(Exception):
    """The model or data set says nothing about packing: look at a built one (``looked_reasons``)."""


def _arg(arch, args: dict, name: str):
    """A builder argument as the trial gets it: the spec's, else the builder's default."""
    if name in args:
        return args[name]
    return arch.args().get(name, (None, None))[1]


def _data_reason(spec: TrialSpec) -> Optional[str]:
    batches = DATASETS.get(spec.dataset).batches
    if batches is None:
        raise Undeclared(spec.dataset)
    return BATCHES[batches]


def _model_reason(spec: TrialSpec) -> Optional[str]:
    arch = MODELS.get(spec.arch)
    packs = arch.packs
    if packs is None:
        raise Undeclared(spec.arch)
    if packs.stacked:
        return None
    bn = packs.batch_norm
    if bn is True or (isinstance(bn, str) and _arg(arch, spec.arch_args, bn)):
        return BATCH_NORM
    if packs.dropout is not None:
        p = _arg(arch, spec.arch_args, packs.dropout)
        if isinstance(p, (int, float)) and not isinstance(p, bool) and p > 0:
            return DROPOUT
    return None


def declared_reason(spec: TrialSpec) -> Optional[str]:
    """Why ``spec`` trains alone (None: it packs), from the spec and the declarations alone;
    ``Undeclared`` when its model or data set declares nothing about packing."""
    return _data_reason(spec) or _recipe_reason(spec) or _model_reason(spec) or _features_reason(spec)


def reasons(students: Sequence[TrialSpec]) -> dict[str, str]:
    """{trial key: why it trains alone} for the students that ask to be packed and cannot be:
    declared where the model and data set declare it, else looked at (``looked_reasons``)."""
    out: dict[str, str] = {}
    undeclared = []
    for s in students:
        if not asks_to_pack(s):
            continue
        try:
            why = declared_reason(s)
        except Undeclared:
            undeclared.append(s)
            continue
        if why:
            out[s.trial_key] = why
    if undeclared:
        out.update(looked_reasons(undeclared))
    return out


# ------------------------------------------------------------------ the fallback: look at a built model


def unpackable(spec: TrialSpec, model, bundle=None) -> Optional[str]:
    """Why this spec must train alone, or None if it can join a pack: the rule of
    ``declared_reason``, read from a built model (and a loaded data set, when given)."""
    from torch import nn

    from kdray.data.bundle import DataBundle
    from kdray.stacked import stacked_forward

    if bundle is not None and hasattr(bundle, "set_epoch"):
        return STREAMING
    if bundle is not None and type(bundle).train_batches is not DataBundle.train_batches:
        return OWN_BATCHES
    why = _recipe_reason(spec)
    if why:
        return why
    if stacked_forward(model) is None:   # vmap: BatchNorm and dropout only in the stacked forwards
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            return BATCH_NORM
        if any((isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0)
               or (isinstance(getattr(m, "dropout", None), float) and m.dropout > 0) for m in model.modules()):
            return DROPOUT
    return _features_reason(spec)


def looked_reasons(specs: Sequence[TrialSpec]) -> dict[str, str]:
    """The fallback for models and data sets that declare nothing about packing: {trial key: why
    it trains alone} for the specs that ask to be packed, from one model built (and one data set
    loaded) per architecture and data set.  Imports torch."""
    import torch

    from kdray.data import load_dataset
    from kdray.models import build_model

    out: dict[str, str] = {}
    built: dict[tuple, tuple] = {}
    for s in specs:
        if not asks_to_pack(s):
            continue
        key = group_key(s)[:4]
        if key not in built:
            try:
                bundle = load_dataset(s.dataset, s.data_root, **s.dataset_args)
                with torch.random.fork_rng(devices=[]):    # the driver's generator is left as it was
                    torch.manual_seed(s.init_seed)
                    model = build_model(s.arch, bundle.num_classes, bundle.input_shape, **s.arch_args)
                built[key] = (model, bundle, None)
            except Exception as e:   # e.g. data only on the workers: do not guess, train alone
                built[key] = (None, None, f"cannot check it here ({type(e).__name__}: {str(e)[:120]})")
        model, bundle, failed = built[key]
        why = failed or unpackable(s, model, bundle)
        if why:
            out[s.trial_key] = why
    return out


# ------------------------------------------------------------------ cutting packs


def group_key(spec: TrialSpec) -> tuple:
    """What the students of one pack share: architecture, data set, recipe, teacher, resources."""
    return (spec.arch, json.dumps(spec.arch_args, sort_keys=True), spec.dataset,
            json.dumps(spec.dataset_args, sort_keys=True), json.dumps(spec.recipe, sort_keys=True),
            spec.teacher_key, json.dumps(spec.resources, sort_keys=True), spec.data_root)


def loss_key(spec: TrialSpec, i: int) -> tuple:
    """Students with one key get their losses from one call: the same condition and params,
    declared ``rowwise`` (kdray/conditions: a mean over rows of per-row terms); the rest alone."""
    cond = spec.condition
    if cond is None:                       # teachers: cross-entropy
        return ("",)
    if cond.rowwise:
        return (cond.name, json.dumps(spec.params, sort_keys=True, default=str))
    return ("~alone", i)


def by_loss_group(specs: Sequence[TrialSpec]) -> list[TrialSpec]:
    """The specs ordered by ``loss_key`` (stably): each loss group becomes one run."""
    return [s for _, s in sorted(((loss_key(s, i), s) for i, s in enumerate(specs)), key=lambda p: p[0])]


def pack_groups(specs: Sequence[TrialSpec], cap: Optional[int] = None) -> list[list[TrialSpec]]:
    """Specs grouped by (arch, dataset, recipe, teacher, resources), each group cut into packs of at
    most ``cap`` (default: the group's ``resources.pack``) of even sizes; a pack waits for one teacher
    only.  A group is cut in the order of its students' loss groups (``loss_key``), so that a pack
    holds few of them: each is one loss call per step."""
    groups: dict[tuple, list[TrialSpec]] = {}
    for s in specs:
        groups.setdefault(group_key(s), []).append(s)
    out = []
    for g in groups.values():
        g = by_loss_group(g)
        k = max(1, cap or int(g[0].resources.get("pack", 1)))
        n, p = len(g), -(-len(g) // k)           # as few packs as the cap allows, of even sizes (21, 16: 10 + 11)
        out += [g[i * n // p:(i + 1) * n // p] for i in range(p)]
    return out


def jobs(students: Sequence[TrialSpec], why: Optional[dict[str, str]] = None
         ) -> tuple[list[list[TrialSpec]], list[str]]:
    """Students cut into Tune trials: packs where asked and possible, one student per trial
    otherwise; and one line per setup and reason saying what was not packed (``why``:
    ``reasons`` of these students or more, if already known)."""
    why = reasons(students) if why is None else why
    packed = [s for s in students if asks_to_pack(s) and s.trial_key not in why]
    keys = {s.trial_key for s in packed}     # a set: a sweep may hand over thousands of students
    out = [[s] for s in students if s.trial_key not in keys] + pack_groups(packed)
    return out, notes(students, why)


def notes(students: Sequence[TrialSpec], why: dict[str, str]) -> list[str]:
    """One line per setup and reason: how many students train one per trial, and why."""
    said: dict[tuple, int] = {}
    for s in students:
        if s.trial_key in why:
            said[(s.setup, why[s.trial_key])] = said.get((s.setup, why[s.trial_key]), 0) + 1
    return [f"setup {setup}: {n} students trained one per trial, not packed: {w}" for (setup, w), n in said.items()]


@dataclass(frozen=True)
class Packing:
    """The plan's Tune trials for its students: ``jobs`` (packs, and one student per trial),
    ``reasons`` ({trial key: why it trains alone} of those that asked to pack) and ``notes``."""
    jobs: list[list[TrialSpec]]
    reasons: dict[str, str]
    notes: list[str]

    def for_todo(self, todo: set[str]) -> list[list[TrialSpec]]:
        """The jobs that finish the ``todo`` students: the plan's packs (whole) that hold one of
        them, and one trial per unpacked one."""
        return [j for j in self.jobs if any(s.trial_key in todo for s in j)]


def packing(students: Sequence[TrialSpec]) -> Packing:
    """The packs of these students (a plan's, all of them) and why the others train alone."""
    why = reasons(students)
    cut, said = jobs(students, why)
    return Packing(cut, why, said)
