"""The sweep file schema: what a researcher writes, validated at the edge.

A sweep is a list of *setups* (dataset x teacher architecture x student
architecture x recipe), each crossed with teacher seeds, student seeds and
conditions.  Pydantic rejects unknown keys and bad values; ``load_sweep``
turns every failure into one ``SweepError`` line naming the file and field.
"""
from __future__ import annotations

import functools
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError, create_model, field_validator, model_validator

from kdray import conditions
from kdray.conditions import enabled_conditions  # noqa: F401 - re-exported (kdray.plan)
from kdray.data import DATASETS
from kdray.errors import SweepError  # noqa: F401 - re-exported: every caller catches kdray.sweep.SweepError
from kdray.evals import EVALS
from kdray.models import MODELS
from kdray.registry import PluginError
from kdray.setup_checks import check_sweep

DEFAULT_STORAGE = "./results"
MAX_SEED = 2**63          # seeds are whole numbers in [0, 2^63): torch and numpy generators take them
# Sweep and setup names become folder names and MLflow names: letters, digits, "_", "-", single dots.
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$"


def _no_dots(v: str) -> str:
    if ".." in v:
        raise ValueError(f"a name must not contain '..' (it names folders), got {v!r}")
    return v


class _Strict(BaseModel):
    """Unknown keys are errors, and so are values of the wrong type ("10" for 10 is not coerced)."""
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _conditions_model() -> type[BaseModel]:
    """The ``conditions:`` mapping, one optional key per condition that a sweep file can name,
    built from the declarations in kdray/conditions (their defaults, grids and checks).

    A condition with a grid is switched off by ``false`` (or ``null``) and on, at its default grid,
    by ``true``; one without a grid (SIDDO) by ``true`` and ``false`` (or ``null``)."""
    fields: dict[str, Any] = {}
    grids: list[str] = []
    switches_only: list[str] = []
    for cond in conditions.all_conditions():
        if not cond.sweep_key:
            continue
        model = conditions.grid_model(cond)
        if model is bool:
            fields[cond.sweep_key] = (StrictBool, cond.enabled_by_default)
            switches_only.append(cond.sweep_key)
        else:
            fields[cond.sweep_key] = (Optional[model], model() if cond.enabled_by_default else None)
            grids.append(cond.sweep_key)

    def switches(cls, data):
        if isinstance(data, dict):
            data = {k: ({} if v is True else None if v is False else v) if k in grids
                    else (False if v is None and k in switches_only else v) for k, v in data.items()}
        return data
    return create_model("Conditions", __base__=_Strict,
                        __validators__={"_switches": model_validator(mode="before")(classmethod(switches))}, **fields)


Conditions = _conditions_model()


def _registered(registry, name: str) -> str:
    if name not in registry:
        raise ValueError(f"unknown {registry.kind} {name!r}; valid: {', '.join(registry.valid_names())}")
    return name


def _known(field: str, registry):
    """A validator for ``field``: the name must be one the registry holds."""
    return field_validator(field)(lambda cls, v: _registered(registry, v))


class ModelRef(_Strict):
    arch: str
    args: dict[str, Any] = {}
    _arch = _known("arch", MODELS)

    @model_validator(mode="before")
    @classmethod
    def _prepared(cls, data):
        """Args as trials get them: e.g. a pretrained folder's path made absolute and its hash added."""
        if not (isinstance(data, dict) and isinstance(data.get("arch"), str) and isinstance(data.get("args", {}), dict)):
            return data
        try:
            arch = MODELS.get(data["arch"])
        except (KeyError, PluginError):      # reported at the arch field by its own validator
            return data
        if arch.prepare is not None:
            data = {**data, "args": arch.prepared(data.get("args", {}))}
        return data


class TeacherRef(ModelRef):
    """The teacher: trained by the sweep, or loaded from ``checkpoint`` (a state dict; kdray/checkpoints.py)."""
    checkpoint: Optional[str] = None

    @field_validator("checkpoint")
    @classmethod
    def _ckpt(cls, v):
        if v is not None and not v.strip():
            raise ValueError("checkpoint must be a path or URI of a state dict, got an empty string")
        return v


def _dataset_prepared(name: Any, args: Any) -> Any:
    """A data set's args as trials get them (e.g. a saved tokenizer's path made absolute and its hash
    added, kdray/data/tokenizer_identity.py); args it cannot read are left to their own validators."""
    if not (isinstance(name, str) and isinstance(args, dict)):
        return args
    try:
        data = DATASETS.get(name)
    except (KeyError, PluginError):      # reported at the name field by its own validator
        return args
    return data.prepared(args) if data.prepare is not None else args


class DatasetRef(_Strict):
    name: str
    args: dict[str, Any] = {}
    _name = _known("name", DATASETS)

    @model_validator(mode="before")
    @classmethod
    def _prepared(cls, data):
        if isinstance(data, dict) and "args" in data:
            data = {**data, "args": _dataset_prepared(data.get("name"), data["args"])}
        return data


class Recipe(_Strict):
    """One training recipe; identical across a setup's conditions (docs/protocol.md §2)."""
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0, le=1000, allow_inf_nan=False)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    batch_size: int = Field(256, ge=1, le=1 << 20)
    epochs: Optional[int] = Field(None, ge=1)
    iterations: Optional[int] = Field(None, ge=1)   # language models count iterations
    log_every: int = Field(500, ge=1)                # lm: iterations per logged "epoch"
    schedule: Literal["none", "cosine", "step", "warmup_step"] = "none"
    cosine_t_max: Optional[int] = Field(None, ge=1)  # in epochs; default = epochs
    step_size: int = Field(30, ge=1)                 # step schedule: epochs per decay
    gamma: float = Field(0.1, gt=0, allow_inf_nan=False)
    warmup_epochs: float = Field(0, ge=0)
    grad_clip: Optional[float] = Field(None, gt=0, allow_inf_nan=False)
    eval_every: int = Field(0, ge=0)                 # evaluate the test set every N epochs (0: at the end)
    eval_batch_size: int = Field(1024, ge=1)
    checkpoint_every: int = Field(0, ge=0)           # epochs between Tune checkpoints (0: never)
    train: bool = True                               # False: evaluate the model as built (a pretrained teacher)
    # GPU speed features; all off by default, so a CPU trial is bit-reproducible.
    precision: Literal["fp32", "bf16"] = "fp32"      # bf16: autocast forward and loss
    channels_last: bool = False                      # NHWC memory format for CNNs on 4-D inputs
    compile: bool = False                            # torch.compile the trained model

    @model_validator(mode="after")
    def _budget(self):
        if (self.epochs is None) == (self.iterations is None):
            raise ValueError("give exactly one of epochs (classification) or iterations (language models)")
        return self


class Resources(_Strict):
    cpu: float = Field(1, gt=0)
    gpu: float = Field(0, ge=0)
    # Students trained together in one trial (kdray/packing.py): K students of one architecture,
    # data set, recipe and teacher share one process and one stacked forward/backward.
    pack: int = Field(1, ge=1, le=1024)


class StageResources(_Strict):
    teacher: Resources = Resources()
    student: Resources = Resources()

    @model_validator(mode="after")
    def _students_only(self):
        if self.teacher.pack != 1:
            raise ValueError(f"teacher.pack: only students are packed (got {self.teacher.pack}); "
                             f"set resources.student.pack")
        return self


class Distributed(_Strict):
    workers: int = Field(2, ge=1)
    backend: Literal["gloo", "nccl"] = "gloo"
    use_gpu: bool = False


class Setup(_Strict):
    name: str = Field(pattern=NAME)
    _name = field_validator("name")(_no_dots)
    dataset: DatasetRef
    teacher: TeacherRef
    student: Optional[ModelRef] = None            # default: the teacher's (self-distillation)
    recipe: Recipe
    student_recipe: dict[str, Any] = {}           # overrides of recipe for students
    teacher_recipe: dict[str, Any] = {}           # overrides of recipe for teachers (e.g. {train: false})
    teacher_dataset: dict[str, Any] = {}          # dataset args only the teacher sees (e.g. poison)
    teacher_seeds: list[int] = Field(default=[0, 1, 2], min_length=1)
    student_seeds: list[int] = Field(default=list(range(10, 20)), min_length=1)
    student_init: Literal["auto", "teacher", "student_seed"] = "auto"
    widths: list[float] = [1.0]                   # student width fractions (width sweep)
    conditions: Conditions = Conditions()
    evals: list[str] = []
    resources: StageResources = StageResources()
    distributed: Optional[Distributed] = None
    # For `kdray plan`'s estimate only: A100-hours one model of this setup takes. The default is
    # the paper's average, 2,216 GPU-hours over 4,189 models; set your own from a pilot trial.
    gpu_hours_per_model: float = Field(0.53, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _one_pretrained_teacher(cls, data):
        """A checkpoint is one teacher: its seed only names it (t0) unless the file gives one."""
        t = data.get("teacher") if isinstance(data, dict) else None
        if isinstance(t, dict) and t.get("checkpoint") is not None and "teacher_seeds" not in data:
            data = {**data, "teacher_seeds": [0]}
        return data

    @model_validator(mode="before")
    @classmethod
    def _teacher_dataset_prepared(cls, data):
        """The teacher's own data args (``teacher_dataset``) are prepared as the data set's are."""
        if isinstance(data, dict) and isinstance(data.get("teacher_dataset"), dict) and data["teacher_dataset"] \
                and isinstance(data.get("dataset"), dict):
            name = data["dataset"].get("name")
            prepared = _dataset_prepared(name, data["teacher_dataset"])
            if prepared is not data["teacher_dataset"]:
                data = {**data, "teacher_dataset": prepared}
        return data

    @field_validator("teacher_seeds", "student_seeds")
    @classmethod
    def _seed_range(cls, v):
        bad = [x for x in v if not 0 <= x < MAX_SEED]
        if bad:
            raise ValueError(f"seeds must be whole numbers in [0, 2^63), got {bad[0]}")
        return v

    @field_validator("widths")
    @classmethod
    def _w(cls, v):
        if not v or any(not 0 < w <= 1 for w in v):
            raise ValueError("widths must be a non-empty list of fractions in (0, 1]")
        return v

    @field_validator("evals", mode="before")
    @classmethod
    def _probes(cls, v):
        """A declared probe ({probe: {...}}) travels as its canonical name (kdray/probes.py)."""
        if not isinstance(v, list):
            return v
        from kdray.probes import canonical
        out = []
        for i, e in enumerate(v):
            if isinstance(e, dict) and set(e) == {"probe"}:
                try:
                    e = canonical(e["probe"])
                except ValueError as err:
                    raise ValueError(f"item {i}: {err}") from None
            out.append(e)
        return out

    @field_validator("evals")
    @classmethod
    def _e(cls, v):
        return [_registered(EVALS, name) for name in v]

    @model_validator(mode="after")
    def _seeds(self):
        for what, seeds in (("teacher_seeds", self.teacher_seeds), ("student_seeds", self.student_seeds)):
            if len(set(seeds)) != len(seeds):
                raise ValueError(f"{what} has duplicates: {seeds}")
        overlap = sorted(set(self.teacher_seeds) & set(self.student_seeds))
        if overlap:
            raise ValueError(f"student_seeds overlap teacher_seeds at {overlap}: a student would share the teacher's data order")
        if self.teacher.checkpoint is not None:
            if len(self.teacher_seeds) != 1:
                raise ValueError(f"teacher.checkpoint: a checkpoint is one teacher; give one teacher seed "
                                 f"(it names the teacher), got teacher_seeds {self.teacher_seeds}")
            if self.student_init == "teacher":
                raise ValueError("student_init: 'teacher' starts students from the teacher's initial weights, "
                                 "which a checkpoint does not hold; use 'auto' or 'student_seed'")
        if self.distributed is not None and self.resources.student.pack > 1:
            raise ValueError("resources.student.pack: DDP trials (distributed) are not packed; use pack: 1")
        for what, over in (("student_recipe", self.student_recipe), ("teacher_recipe", self.teacher_recipe)):
            try:
                Recipe(**{**self.recipe.model_dump(), **over})
            except ValidationError as e:
                raise ValueError(f"{what}: {_first_error(e, Recipe)}") from None
        if not enabled_conditions(self.conditions):
            names = ", ".join(Conditions.model_fields)
            raise ValueError(f"conditions: the grid is empty (enable at least one of {names})")
        return self

    @property
    def student_model(self) -> ModelRef:
        return self.student or ModelRef(arch=self.teacher.arch, args=self.teacher.args)


class Sweep(_Strict):
    name: str = Field(pattern=NAME)
    _name = field_validator("name")(_no_dots)
    description: str = ""
    storage: str = DEFAULT_STORAGE
    tracking_uri: Optional[str] = None            # default sqlite:///<storage>/mlflow.db
    data_root: Optional[str] = None               # default $KDRAY_DATA
    max_concurrent_trials: Optional[int] = Field(None, ge=1)
    max_failures: int = Field(1, ge=0)            # retries per trial (from its last checkpoint)
    # A trial sends its epochs' metrics to the driver (and so to MLflow) at most this often, and at
    # its end and checkpoints: every report is a round trip that stalls the trial. 0: every epoch.
    report_every_s: float = Field(10.0, ge=0)
    # Off a terminal (a log file, `ray job logs`), the progress lines are printed at most this often.
    progress_every_s: float = Field(30.0, ge=0)
    plugins: list[str] = []                       # modules that register conditions, models, data (docs/plugins.md)
    setups: list[Setup] = Field(min_length=1)

    @field_validator("storage")
    @classmethod
    def _storage(cls, v):
        if not v.strip():    # Path("") would silently be the working directory
            raise ValueError("an empty string is no folder; give a path (default ./results) or a URI "
                             "(s3://, gs://, file://)")
        return v

    @model_validator(mode="after")
    def _unique(self):
        names = [s.name for s in self.setups]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"setup names must be unique; repeated: {dup}")
        return self

    def resolved_tracking_uri(self) -> str:
        import os
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(self.storage)

    def local_storage(self) -> Path:
        return local_storage(self.storage)


def local_storage(storage: str) -> Path:
    """The storage folder on this machine (a file:// URI's path); object stores have none."""
    if storage.startswith("file://"):
        return Path(storage.removeprefix("file://"))
    if "://" in storage:
        raise SweepError(f"storage {storage} is an object store: give tracking_uri "
                         "(or $MLFLOW_TRACKING_URI) for the MLflow server")
    return Path(storage).expanduser().resolve()


def default_tracking_uri(storage: str = DEFAULT_STORAGE) -> str:
    """The embedded default: MLflow in sqlite:///<storage>/mlflow.db."""
    return f"sqlite:///{local_storage(storage) / 'mlflow.db'}"


# ---------------------------------------------------------------- loading

def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.match(r"^function-|^function_", str(part)):
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _model_at(model: Any, loc: tuple) -> Optional[type[BaseModel]]:
    """The pydantic model that holds the value at ``loc`` (None where it is not a model)."""
    def unwrap(t, part=None):
        while True:
            origin, args = typing.get_origin(t), typing.get_args(t)
            if origin in (typing.Union, types.UnionType):
                t = next((a for a in args if a is not type(None)), t)
            elif origin in (list, tuple) and isinstance(part, int) and args:
                return args[0]
            else:
                return t
    t = model
    for part in loc:
        t = unwrap(t, part)
        if isinstance(part, int):
            continue
        if not (isinstance(t, type) and issubclass(t, BaseModel)) or part not in t.model_fields:
            return None
        t = t.model_fields[part].annotation
    t = unwrap(t)
    return t if isinstance(t, type) and issubclass(t, BaseModel) else None


def _first_error(e: ValidationError, model: Any = None) -> str:
    """One line for the first error (and how many more): where, what, and what would be valid."""
    err = e.errors()[0]
    msg = err["msg"].removeprefix("Value error, ")
    loc = tuple(p for p in err["loc"] if not str(p).startswith(("function-", "tagged-")))
    if err["type"] == "extra_forbidden":
        owner = _model_at(model, loc[:-1]) if model is not None else None
        msg = "unknown key" + (f"; valid: {', '.join(owner.model_fields)}" if owner is not None else "")
    elif err["type"] == "missing":
        msg = "required field missing"
    where = _loc(loc)
    if err["type"] not in ("missing", "extra_forbidden") and "input" in err and not isinstance(err["input"], (dict, list)):
        msg += f" (got {err['input']!r})"
    more = len(e.errors()) - 1
    return f"{where}: {msg}" + (f" (+{more} more)" if more else "")


def _load_plugins(data: dict, source: str) -> None:
    """The plug-in modules a sweep names are imported before it is validated: they register the
    names (and condition keys) the file uses."""
    from kdray import plugins

    names = data.get("plugins", [])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise SweepError(f"{source}: plugins: expected a list of module names (my_pkg.kdray_plugin), got {names!r}")
    plugins.load_entry_points()     # a broken one is a warning, not an error (kdray/plugins.py)
    for i, name in enumerate(names):
        try:
            plugins.load([name])
        except PluginError as e:
            raise SweepError(f"{source}: plugins[{i}]: {e}") from None


def sweep_model() -> type[Sweep]:
    """The schema for the conditions registered now: ``Sweep`` for the built-ins; with plug-in
    conditions, a Sweep whose setups' ``conditions:`` also take their keys."""
    keys = tuple(c.sweep_key for c in conditions.all_conditions() if c.sweep_key)
    return Sweep if keys == tuple(Conditions.model_fields) else _sweep_model_for(keys)


@functools.cache
def _sweep_model_for(keys: tuple[str, ...]) -> type[Sweep]:
    conds = _conditions_model()
    setup = create_model("Setup", __base__=Setup, conditions=(conds, conds()))
    return create_model("Sweep", __base__=Sweep, setups=(list[setup], Field(min_length=1)))


def parse_sweep(data: Any, source: str = "<sweep>") -> Sweep:
    if not isinstance(data, dict):
        raise SweepError(f"{source}: the file must hold a mapping with name and setups")
    _load_plugins(data, source)
    model = sweep_model()
    try:
        sweep = model(**data)
    except ValidationError as e:
        raise SweepError(f"{source}: {_first_error(e, model)}") from None
    check_sweep(sweep, source)
    return sweep


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML where a key given twice in one mapping is an error (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(p: Path):
    """A sweep file's YAML, or one SweepError line (not a file, not UTF-8, bad YAML, duplicate keys)."""
    if not p.is_file():
        raise SweepError(f"{p}: no such sweep file" + (" (it is a folder)" if p.is_dir() else ""))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise SweepError(f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                         "save the file as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise SweepError(f"{p}:{where} not valid YAML ({getattr(e, 'problem', None) or e})") from None


def _anchor_checkpoints(data: Any, folder: Path) -> Any:
    """A relative ``teacher.checkpoint`` is read from the sweep file's folder (not the working
    directory), so a sweep file and its teacher travel together."""
    if not isinstance(data, dict) or not isinstance(data.get("setups"), list):
        return data
    setups = []
    for s in data["setups"]:
        t = s.get("teacher") if isinstance(s, dict) else None
        c = t.get("checkpoint") if isinstance(t, dict) else None
        if isinstance(c, str) and c.strip() and "://" not in c and not Path(c).expanduser().is_absolute():
            s = {**s, "teacher": {**t, "checkpoint": str((folder / c).resolve())}}
        setups.append(s)
    return {**data, "setups": setups}


def load_sweep(path: str | Path) -> Sweep:
    p = Path(path)
    return parse_sweep(_anchor_checkpoints(read_yaml(p), p.resolve().parent), str(p))
