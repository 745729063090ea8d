"""When a trial's metrics stream from files (kdray/streamed.py): a limit in bytes, read from the
environment.  Torch-free, so ``kdray validate`` refuses a bad value in one line before anything
starts, and the plan could say which trials will stream."""
from __future__ import annotations

import os

ENV = "KDRAY_METRICS_MEMORY_BYTES"
DEFAULT_LIMIT = 1 << 30      # bytes: an N x V float32 array or Procrustes' V x V float64 matrix above this streams


def memory_limit() -> int:
    """``$KDRAY_METRICS_MEMORY_BYTES`` (a whole number of bytes) or ``DEFAULT_LIMIT``."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_LIMIT
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"${ENV} must be a whole number of bytes >= 0, not {raw!r}")
    return value


def streams(n: int, k: int) -> bool:
    """Whether a trial with N test positions and K classes computes its metrics from files: when its
    float32 logits (N x K x 4 bytes) or Procrustes' K x K float64 cross-product exceed the limit."""
    return max(n * k * 4, k * k * 8) > memory_limit()
