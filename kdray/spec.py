"""TrialSpec: the one object that travels from the plan to MLflow.

A trial is a pure function of its spec.  ``trial_key`` hashes the fields that
change what a trial computes (resources and distribution do not), so the key
identifies a result anywhere: Tune trial name, MLflow tag, storage path.

Keys are stable as the schema grows: a field, recipe option or condition
parameter added after key schema 1 is hashed only when it differs from its
declared default, so adding one leaves every stored trial's key unchanged.
The fields schema 1 started with (``V1_FIELDS``, ``V1_RECIPE``) are always
hashed, as they were then; condition parameters that were TrialSpec fields
then (alpha, temperature, block) are hashed under those names.  Change
``KEY_SCHEMA`` on purpose, and only when a trial's meaning changes.
"""
from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, Optional

from kdray import conditions

KEY_SCHEMA = 1
# Fields that do not change what a trial computes, so they stay out of its key.
NON_KEY_FIELDS = ("resources", "distributed", "sweep", "data_root", "plugins", "checkpoint")
# A pretrained teacher is its weights (the checkpoint's SHA-256) on an architecture and data set:
# seeds and training recipe do not change it.
CHECKPOINT_KEY_FIELDS = ("role", "method", "dataset", "dataset_args", "arch", "arch_args", "evals", "checkpoint_sha256")
V1_FIELDS = ("setup", "role", "method", "dataset", "arch", "teacher_seed", "init_seed", "data_seed",
             "student_seed", "width", "dataset_args", "arch_args", "recipe", "evals", "teacher")
V1_PARAMS = {"alpha": 0.0, "temperature": 1.0, "block": None}     # hashed by every schema-1 key
V1_RECIPE = frozenset((
    "optimizer", "lr", "momentum", "nesterov", "weight_decay", "batch_size", "epochs", "iterations", "log_every",
    "schedule", "cosine_t_max", "step_size", "gamma", "warmup_epochs", "grad_clip", "eval_every",
    "eval_batch_size", "checkpoint_every", "train", "precision", "channels_last", "compile"))


@dataclass(frozen=True)
class TrialSpec:
    setup: str                       # setup name from the sweep file
    role: str                        # "teacher" | "student"
    method: str                      # "teacher", or a condition's name (kdray.conditions)
    dataset: str
    arch: str
    teacher_seed: int
    init_seed: int                   # seeds the model's initial weights
    data_seed: int                   # seeds data order, augmentation, dropout
    student_seed: Optional[int] = None
    params: dict = field(default_factory=dict)   # the condition's parameters, complete (declared order)
    width: float = 1.0               # student width as a fraction of the teacher's
    dataset_args: dict = field(default_factory=dict)
    arch_args: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)
    evals: tuple = ()                # extra evaluations, e.g. ("tha_count",)
    data_root: Optional[str] = None
    teacher: Optional["TrialSpec"] = None   # students: the teacher's own spec
    resources: dict = field(default_factory=dict)
    distributed: dict = field(default_factory=dict)
    sweep: str = ""
    plugins: tuple = ()              # modules a worker imports before it runs the trial (kdray/plugins.py)
    checkpoint: Optional[str] = None        # a pretrained teacher: where its state dict is (kdray/checkpoints.py)
    checkpoint_sha256: Optional[str] = None  # ... and its identity

    # --- identity -------------------------------------------------------
    def key_dict(self) -> dict:
        if self.checkpoint_sha256:
            d = {name: getattr(self, name) for name in CHECKPOINT_KEY_FIELDS}
            d["evals"] = list(self.evals)
            d["precision"] = self.recipe.get("precision", "fp32")
            if self.dataset_args.get("tokenizer_sha256"):
                d["dataset_args"] = {k: v for k, v in self.dataset_args.items() if k != "tokenizer"}
            return d
        d: dict[str, Any] = dict(V1_PARAMS)
        for name, always, default in _key_fields():
            v = getattr(self, name)
            if always or v != default:
                d[name] = v
        d["teacher"] = self.teacher.trial_key if self.teacher else None
        d["evals"] = list(self.evals)
        d["recipe"] = stable_recipe(self.recipe)
        if self.dataset_args.get("tokenizer_sha256"):
            # a saved tokenizer (kdray/data/tokenizer_identity.py) is its files' hash, wherever it lies
            d["dataset_args"] = {k: v for k, v in self.dataset_args.items() if k != "tokenizer"}
        if self.arch_args.get("pretrained_sha256"):
            # a pretrained model folder (kdray/models/hf.py) is its files' hash, wherever it lies
            d["arch_args"] = {k: v for k, v in self.arch_args.items() if k != "pretrained"}
        if self.role == "teacher":
            d.pop("setup")  # one teacher serves every setup (and sweep) that plans it
        extra = {}
        cond = conditions.find(self.method)
        declared = {p.name: p for p in cond.params} if cond is not None else {}
        for name, value in self.params.items():
            p = declared.get(name)
            if p is not None and p.legacy:
                d[p.legacy] = value
            elif p is None or value != p.default:
                extra[name] = value
        if extra:
            d["params"] = extra
        if KEY_SCHEMA != 1:
            d["key_schema"] = KEY_SCHEMA
        return d

    @functools.cached_property
    def trial_key(self) -> str:
        """Computed once per spec (a spec is immutable; a student's key hashes its teacher's, and a
        100,000-trial plan asks for every key several times)."""
        blob = json.dumps(self.key_dict(), sort_keys=True, default=str, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def teacher_key(self) -> Optional[str]:
        return self.teacher.trial_key if self.teacher else None

    @property
    def condition(self) -> Optional[conditions.Condition]:
        """The declaration of this trial's condition (None for a teacher)."""
        return None if self.role == "teacher" else conditions.get(self.method)

    @property
    def label(self) -> str:
        """A short human name: setup, role/method, condition, seeds."""
        parts = [self.setup, self.method]
        if self.condition is not None:
            parts += self.condition.label(self.params, short=True)
        if self.width != 1.0:
            parts.append(f"w{self.width:g}")
        parts.append(f"t{self.teacher_seed}")
        if self.student_seed is not None:
            parts.append(f"s{self.student_seed}")
        return "-".join(parts)

    # --- (de)serialisation ------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["evals"], d["plugins"] = list(self.evals), list(self.plugins)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrialSpec":
        """The spec back from ``to_dict``; in a worker process this also imports its plug-ins, so the
        condition, model and data set it names are registered there."""
        from kdray import plugins

        d = dict(d)
        plugins.load(d.get("plugins", ()))
        if d.get("teacher") is not None:
            d["teacher"] = cls.from_dict(d["teacher"])
        d["evals"] = tuple(d.get("evals", ()))
        d["plugins"] = tuple(d.get("plugins", ()))
        return cls(**d)

    def flat_params(self) -> dict[str, Any]:
        """The spec flattened for MLflow params (nested dicts as dotted keys)."""
        out: dict[str, Any] = {}

        def put(prefix: str, v: Any) -> None:
            if isinstance(v, dict):
                for k, vv in v.items():
                    put(f"{prefix}.{k}", vv)
            else:
                out[prefix] = v

        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "teacher":
                out["teacher_key"] = self.teacher_key
                if self.teacher is not None:
                    out["teacher_arch"] = self.teacher.arch
            elif f.name in ("evals", "plugins"):
                out[f.name] = ",".join(v)
            else:
                put(f.name, v)
        out["trial_key"] = self.trial_key
        return out

    def with_(self, **changes) -> "TrialSpec":
        return replace(self, **changes)


def _default(f) -> Any:
    return f.default_factory() if f.default_factory is not MISSING else f.default


@functools.cache
def _key_fields() -> tuple[tuple[str, bool, Any], ...]:
    """(name, always hashed, default) of the fields a key may hash, in declaration order."""
    return tuple((f.name, f.name in V1_FIELDS, _default(f)) for f in fields(TrialSpec)
                 if f.name in V1_FIELDS or (f.name not in NON_KEY_FIELDS and f.name != "params"))


_stable: dict[int, tuple[dict, dict, int]] = {}   # id(recipe) -> (recipe, its stable form): a plan shares one recipe dict


def stable_recipe(recipe: dict) -> dict:
    """The recipe as keys hash it: schema-1 options always, later options only when not default
    (remembered per recipe object: the students of a setup share one, and a 100,000-trial plan
    would otherwise filter it 100,000 times)."""
    hit = _stable.get(id(recipe))
    if hit is not None and hit[0] is recipe and hit[2] == len(recipe):
        return dict(hit[1])
    from kdray.sweep import Recipe

    defaults = Recipe.model_fields
    out = {k: v for k, v in recipe.items() if k in V1_RECIPE or k not in defaults or v != defaults[k].default}
    if len(_stable) > 1024:
        _stable.clear()
    _stable[id(recipe)] = (recipe, out, len(recipe))
    return dict(out)
