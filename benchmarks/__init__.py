"""kdray's ratio benchmarks (issue 6): ``python -m benchmarks NAME [--quick]`` or ``all``.

Each module has ``NAME``, ``TITLE`` and ``run(quick=False, device=..., **sizes) -> dict``
(see ``benchmarks.common.result`` for the record); ``benchmarks.docs`` writes the
records into docs/benchmarks.md.  Ratios are measured in one process against a
baseline run beside them, so they mean the same on this 2-core CPU machine and
on a GPU machine (``--device cuda``, the default when CUDA is available).
"""
from __future__ import annotations

import importlib

# name -> module, in the order
MODULES = {
    "sweep": "benchmarks.sweep",
    "train_step": "benchmarks.train_step",
    "kd_step": "benchmarks.kd_step",
    "data": "benchmarks.data",
    "functional": "benchmarks.functional",
    "report": "benchmarks.report",
    "report_scale": "benchmarks.report_scale",
    "ffcv": "benchmarks.ffcv_loading",
    "packing": "benchmarks.packing",
    "packed_sweep": "benchmarks.packed_sweep",
    "scale": "benchmarks.scale",
    "scale_server": "benchmarks.scale_server",     # needs PostgreSQL (apt) and psycopg2
    "lm_step": "benchmarks.lm_step",                # needs kdray[lm]
}
NAMES = tuple(MODULES)


def load(name: str):
    if name not in MODULES:
        raise KeyError(f"unknown benchmark {name!r}; valid: {', '.join(NAMES)}, all")
    return importlib.import_module(MODULES[name])
