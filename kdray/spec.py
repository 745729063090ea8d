"""TrialSpec: the one object that travels from the plan to MLflow.

A trial is a pure function of its spec.  ``trial_key`` hashes the fields that
change what a trial computes (resources and distribution do not), so the key
identifies a result anywhere: Tune trial name, MLflow tag, storage path.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

# Fields that do not change what a trial computes, so they stay out of its key.
NON_KEY_FIELDS = ("resources", "distributed", "sweep")


@dataclass(frozen=True)
class TrialSpec:
    setup: str                       # setup name from the sweep file
    role: str                        # "teacher" | "student"
    method: str                      # teacher | siddo | kd | rcd | ls | fm | fm_rcd
    dataset: str
    arch: str
    teacher_seed: int
    init_seed: int                   # seeds the model's initial weights
    data_seed: int                   # seeds data order, augmentation, dropout
    student_seed: Optional[int] = None
    alpha: float = 0.0
    temperature: float = 1.0
    block: Optional[int] = None      # FM: 1-indexed block
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

    # --- identity -------------------------------------------------------
    def key_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in NON_KEY_FIELDS}
        d["teacher"] = self.teacher.trial_key if self.teacher else None
        d["evals"] = list(self.evals)
        d.pop("data_root")  # where the data lives does not change what it is
        if self.role == "teacher":
            d.pop("setup")  # one teacher serves every setup (and sweep) that plans it
        return d

    @property
    def trial_key(self) -> str:
        blob = json.dumps(self.key_dict(), sort_keys=True, default=str, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def teacher_key(self) -> Optional[str]:
        return self.teacher.trial_key if self.teacher else None

    @property
    def label(self) -> str:
        """A short human name: setup, role/method, condition, seeds."""
        parts = [self.setup, self.method]
        if self.method in ("kd", "rcd", "ls", "fm", "fm_rcd"):
            parts.append(f"a{self.alpha:g}")
        if self.method in ("kd", "rcd") and self.temperature != 1.0:
            parts.append(f"T{self.temperature:g}")
        if self.block is not None:
            parts.append(f"b{self.block}")
        if self.width != 1.0:
            parts.append(f"w{self.width:g}")
        parts.append(f"t{self.teacher_seed}")
        if self.student_seed is not None:
            parts.append(f"s{self.student_seed}")
        return "-".join(parts)

    # --- (de)serialisation ------------------------------------------------
    def to_dict(self) -> dict:
        d = asdict(self)
        d["evals"] = list(self.evals)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrialSpec":
        d = dict(d)
        if d.get("teacher") is not None:
            d["teacher"] = cls.from_dict(d["teacher"])
        d["evals"] = tuple(d.get("evals", ()))
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
            elif f.name == "evals":
                out["evals"] = ",".join(self.evals)
            else:
                put(f.name, v)
        out["trial_key"] = self.trial_key
        return out

    def with_(self, **changes) -> "TrialSpec":
        return replace(self, **changes)
