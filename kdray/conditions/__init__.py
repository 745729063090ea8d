"""Conditions as plug-ins: one module per distillation method or control.

A *condition* is what a student is trained under (KD, SIDDO, RCD, ...).  Each
module in this package declares one or more ``Condition`` objects and
registers them; everything else (the sweep schema, the plan, trial keys and
labels, the training objective, the report's controls, tables and figures)
reads these declarations and names no method.  Adding a control is one new
file here (see docs/design.md, "How to add a condition").

This package is torch-free: ``kdray validate`` and ``kdray report`` read the
declarations without importing torch; a condition's objective imports its
tensor code (kdray.losses) only when a trial builds it.
"""
from __future__ import annotations

import importlib
import itertools
import math
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictInt, create_model, field_validator

from kdray.registry import Registry

TREATMENT, CONTROL = "treatment", "control"


class StrictModel(BaseModel):
    """Sweep-file entries: unknown keys and silent type coercion ("10" for 10) are errors."""
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


@dataclass(frozen=True)
class Param:
    """One parameter of a condition, e.g. KD's ``alpha``.

    ``grid`` is the sweep file's key for the list of values (``alphas``), with
    ``grid_default`` when the file gives none (None: the list is required).
    ``default`` is the value a trial key and a label leave out.  ``legacy``
    names the TrialSpec field the value was stored in before conditions were
    plug-ins, so the keys of trials stored then stay the same.
    """
    name: str
    grid: str
    default: Any = None
    grid_default: Optional[list] = None
    type: type = float
    low: Optional[float] = None          # inclusive bounds, unless *_open
    high: Optional[float] = None
    low_open: bool = False
    legacy: Optional[str] = None
    symbol: str = ""                     # report label: symbol + sep + value, "α=0.5", "b4"
    sep: str = "="
    short: str = ""                      # trial label: short + value, "a0.5"
    always: bool = True                  # labels show the value even when it is the default
    facet: bool = False                  # figures draw one panel row per value (temperature)

    def check(self, value: Any) -> Any:
        """The value, or ValueError naming what would be valid."""
        if self.type is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ValueError(f"{self.name} must be a whole number, got {value!r}")
        if self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{self.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{self.name} must be finite, got {value!r}")
            value = float(value)
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        if below or (self.high is not None and value > self.high):
            if self.high is None:
                raise ValueError(f"{self.name} must be {'>' if self.low_open else '>='} {self.low:g}, got {value!r}")
            raise ValueError(f"{self.name} must be in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}], "
                             f"got {value!r}")
        return value

    def fmt(self, value: Any, short: bool = False) -> str:
        v = f"{value:g}" if isinstance(value, float) else str(value)
        return f"{self.short}{v}" if short else f"{self.symbol}{self.sep}{v}"


@dataclass(frozen=True)
class ControlRule:
    """The conditions of ``method`` that equal the treated condition on ``match`` (param names or
    "width"); ``fallback`` relaxes params when nothing matches (RCD at T=1 for KD at T=2)."""
    method: str
    match: tuple[str, ...]
    fallback: tuple[tuple[str, Any], ...] = ()


def Alpha(grid_default=(0.1, 0.5, 0.9), legacy: Optional[str] = "alpha") -> Param:
    """The loss weight alpha in [0, 1] that most conditions share."""
    return Param("alpha", "alphas", 0.0, list(grid_default), float, 0.0, 1.0, legacy=legacy, symbol="α", short="a")


def Temperature(legacy: Optional[str] = "temperature") -> Param:
    """A softmax temperature T > 0; figures give each temperature its own row of panels."""
    return Param("temperature", "temperatures", 1.0, [1.0], float, 0.0, None, low_open=True, legacy=legacy,
                 symbol="T", short="T", always=False, facet=True)


@dataclass(frozen=True)
class Condition:
    """Everything kdray needs to know about one condition.

    - ``params``: its parameters; ``expand`` turns the sweep file's entry into
      the list of (condition name, params) a student seed is trained under
      (default: the cartesian product of the param grids, in declared order).
    - ``objective(params)``: the training loss, a callable on a
      ``kdray.losses.Batch``; ``teacher`` says what the batch must carry from the
      teacher ("logits", "features", "sequences": its greedy continuations of
      the training contexts, which replace the corpus batches (kdray/generation.py), or None), ``features`` names the param that
      picks the student block whose output the loss reads (None: no features).
    - ``role``: "treatment" (tested against controls, gets transfer decisions)
      or "control".  ``controls`` (for a treatment) and ``control_of`` (for a
      control, keyed by treatment) say who is tested against whom, matched on
      which params; ``best_pool``/``best_pool_of`` the same for the best-control
      candidates (highest mean accuracy).  ``random_control``: a teacher-free
      stand-in for the teacher (the paper's "RCD is often best" check).
    - ``sweep_key``: the key under ``conditions:`` in a sweep file (None: only
      produced by another condition's expand, like FM's random control);
      ``enabled_by_default``: present when the file does not mention it.
    - ``on_policy(params)`` (None: never): a per-step replacement of the corpus batch by the
      student's own samples, ``f(model, x, seed, step) -> (x, y) or None`` (None keeps the batch;
      GKD's lambda, kdray/conditions/gkd.py).  The replaced batch reaches the objective with
      ``Batch.sampled`` set, and the teacher scores it live.
    - ``alone``: why a student of this condition never trains in a pack ("" : it may pack).
    - ``rowwise``: the objective is a mean over rows, taken by
      ``kdray.losses``' helpers (``cross_entropy``, ``distillation_term``), of
      terms that read only that row's logits, label and teacher logits (no
      seed, step or features); packed students of one such condition and
      params then get their losses from one call (``kdray.losses.per_student``).
    """
    name: str
    title: str
    params: tuple[Param, ...] = ()
    objective: Callable[[dict], Callable] = None
    teacher: Optional[str] = None
    features: Optional[str] = None
    role: str = CONTROL
    controls: tuple[ControlRule, ...] = ()
    control_of: dict = field(default_factory=dict)
    best_pool: tuple[ControlRule, ...] = ()
    best_pool_of: dict = field(default_factory=dict)
    random_control: bool = False
    sweep_key: Optional[str] = None
    enabled_by_default: bool = False
    order: int = 100
    expand: Optional[Callable[[Any], list[tuple[str, dict]]]] = None
    config: Any = None                   # a pydantic model for the sweep entry (default: from params)
    description: str = ""
    rowwise: bool = False                # a pack computes its students' losses in one call
    on_policy: Optional[Callable[[dict], Callable]] = None
    alone: str = ""

    @property
    def generates(self) -> bool:
        """It trains on generated text (the teacher's or its own): a language model only."""
        return self.teacher == "sequences" or self.on_policy is not None

    def param(self, name: str) -> Param:
        return {p.name: p for p in self.params}[name]

    def full_params(self, given: dict) -> dict:
        """``given`` completed with declared defaults, in declared order (unknown names dropped)."""
        return {p.name: given.get(p.name, p.default) for p in self.params}

    def label(self, params: dict, short: bool = False) -> list[str]:
        """The parts of a label that show its params (a value at its default only if ``always``)."""
        shown = ((p, params.get(p.name, p.default)) for p in self.params)
        return [p.fmt(v, short) for p, v in shown if v is not None and (p.always or v != p.default)]

    def x_param(self) -> Optional[Param]:
        """The param figures put on the x axis: the first one that is not a facet or a block."""
        return next((p for p in self.params if not p.facet and p.name != self.features), None)

    def grid(self, config: Any) -> list[tuple[str, dict]]:
        if self.expand is not None:
            return self.expand(config)
        lists = [getattr(config, p.grid) for p in self.params]
        return [(self.name, dict(zip((p.name for p in self.params), values))) for values in itertools.product(*lists)]


def _import_builtins() -> None:
    """Import every module of this package: each registers its conditions."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


CONDITIONS: Registry[Condition] = Registry("condition", load=_import_builtins)


def register(cond: Condition) -> Condition:
    CONDITIONS.register(cond.name)(cond)
    return cond


def get(name: str) -> Condition:
    return CONDITIONS.get(name)


def all_conditions() -> list[Condition]:
    return sorted((CONDITIONS.get(n) for n in CONDITIONS.names()), key=lambda c: (c.order, c.name))


def enabled_conditions(c: BaseModel) -> list[tuple[Condition, Any]]:
    """(declaration, sweep-file entry) of every condition a setup's ``conditions:`` turns on, in
    declared order.  (A condition registered after the schema was built, e.g. by a module an import
    path named, cannot be in that ``conditions:`` model.)"""
    return [(cond, getattr(c, cond.sweep_key)) for cond in all_conditions()
            if cond.sweep_key in type(c).model_fields and getattr(c, cond.sweep_key) not in (None, False)]


def find(name: str) -> Optional[Condition]:
    """The declaration, or None for a name no installed module declares (a report on runs of a
    plug-in that is not installed here)."""
    return CONDITIONS.get(name) if name in CONDITIONS else None


def _rules(cond: Condition, own: str, of: str) -> tuple[ControlRule, ...]:
    """A treatment's own rules plus those every control declares for it."""
    extra = [r for c in all_conditions() for r in getattr(c, of).get(cond.name, ())]
    return tuple(getattr(cond, own)) + tuple(extra)


def controls_of(name: str) -> tuple[ControlRule, ...]:
    cond = find(name)
    return _rules(cond, "controls", "control_of") if cond is not None and cond.role == TREATMENT else ()


def best_pool_of(name: str) -> tuple[ControlRule, ...]:
    cond = find(name)
    return _rules(cond, "best_pool", "best_pool_of") if cond is not None and cond.role == TREATMENT else ()


def grid_model(cond: Condition):
    """The sweep-file model of a condition's entry: one list per param (``alphas: [...]``), each
    value checked by its Param; the condition's own ``config`` wins where it declares one."""
    if cond.config is not None:
        return cond.config

    def checker(p: Param):
        def check(cls, values):
            return [p.check(v) for v in values]
        return field_validator(p.grid)(check)

    fields = {p.grid: (list[StrictInt if p.type is int else float],
                       Field(default=list(p.grid_default) if p.grid_default is not None else ..., min_length=1))
              for p in cond.params}
    return create_model(f"{cond.title}Grid", __base__=StrictModel,
                        __validators__={f"_check_{p.grid}": checker(p) for p in cond.params}, **fields)


def build_objective(method: str, params: Optional[dict] = None) -> Callable:
    """The training loss of a condition at these params (imports torch)."""
    cond = get(method)
    return cond.objective(cond.full_params(params or {}))


def teacher_objective() -> Callable:
    """A teacher trains on plain cross-entropy."""
    from kdray.losses import cross_entropy
    return lambda b: cross_entropy(b.logits, b.y)
