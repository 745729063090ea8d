"""Rehearsing a GPU cluster where there is no GPU: an explicit switch, never a silent fallback.

A trial that asks for GPUs (``resources.teacher.gpu`` / ``resources.student.gpu`` > 0) trains
on CUDA.  Where torch sees no CUDA device it fails with one line saying so, unless the sweep
runs with ``KDRAY_SIMULATE_GPU=1`` (``kdray sweep --simulate-gpu``): then Ray still places it on
a node that advertises (logical) GPUs, it trains on that node's CPU, and its fingerprint
(run.json), its MLflow tag ``kdray.simulated`` and the report all say SIMULATED, so a simulated
run can never pass for a GPU run.
"""
from __future__ import annotations

import os
import socket
from typing import Optional

ENV = "KDRAY_SIMULATE_GPU"
LABEL = "GPU trial run on the CPU (KDRAY_SIMULATE_GPU=1)"


class NoGpuError(ValueError):
    """A trial asked for a GPU on a node where torch sees none, and simulation is off (a ValueError:
    the same node says the same on every retry)."""


def requested() -> bool:
    """The driver's switch: ``$KDRAY_SIMULATE_GPU`` set to 1/true/yes."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes")


def device_for(resources: dict, simulate: bool) -> tuple[str, Optional[str]]:
    """(torch device, what is simulated or None) for a trial with these resources."""
    import torch

    if float(resources.get("gpu", 0) or 0) <= 0:
        return "cpu", None
    if torch.cuda.is_available():
        return "cuda", None
    if simulate:
        return "cpu", LABEL
    raise NoGpuError(f"the trial asks for gpu: {resources.get('gpu')} but torch sees no CUDA device on node "
                     f"{socket.gethostname()}; to rehearse a GPU sweep on CPUs run it with {ENV}=1 "
                     f"(kdray sweep --simulate-gpu): its runs are then tagged simulated")
