"""The one sweep factory the tests share: a digits sweep as a dict, a YAML file or a parsed Sweep.

``sweep_dict(sweep_name, storage, top=..., **setup)`` starts from the smallest valid setup (digits, an MLP, one epoch, the
default seeds and conditions); callers override setup fields by keyword and
top-level fields through ``top``.  ``SMALL_GRID`` is the few-trial grid most
end-to-end tests run (1 teacher, 2 students, SIDDO + KD + RCD at alpha 0.5).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import yaml

BASE_SETUP = {"name": "s", "dataset": {"name": "digits"}, "teacher": {"arch": "mlp"}, "recipe": {"epochs": 1}}
SMALL_GRID = {"teacher_seeds": [0], "student_seeds": [10, 11],
              "conditions": {"siddo": True, "kd": {"alphas": [0.5]}, "rcd": {"alphas": [0.5]}}}


def sweep_dict(sweep_name: str = "t", storage: Optional[Path | str] = None, /, top: Optional[dict] = None,
               **setup) -> dict:
    s = copy.deepcopy({**BASE_SETUP, **setup})
    head = {"name": sweep_name} | ({"storage": str(storage)} if storage is not None else {})
    return {**head, **(top or {}), "setups": [s]}


def write_sweep(path: Path, data: dict | str) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def make_sweep(sweep_name: str = "t", storage: Optional[Path | str] = None, /, top: Optional[dict] = None, **setup):
    from kdray.sweep import parse_sweep
    return parse_sweep(sweep_dict(sweep_name, storage, top=top, **setup))
