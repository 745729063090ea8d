"""Shared helpers: the result record, timing, the machine, a synthetic SVHN-shaped data set.

Every benchmark returns a ``result(...)`` dict::

    {"benchmark": name, "title": ..., "ratio": float | None, "ratio_def": "what / what",
     "target": "<= 0.8" (text), "met": bool | None, "measurements": {...}, "notes": [...],
     "params": {...sizes...}, "seconds": wall time of the benchmark itself}

Ratios are taken between runs made in the same process, interleaved (A B A B)
where the budget allows, and summarised by medians: the machine this was
written on has 2 cores shared with other jobs, so absolute times drift.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Optional

import numpy as np
import torch


# ------------------------------------------------------------------ results

def result(name: str, title: str, ratio: Optional[float], ratio_def: str, target: str,
           met: Optional[bool], measurements: dict, params: dict, notes: Iterable[str] = (),
           seconds: float = 0.0) -> dict:
    return {"benchmark": name, "title": title, "ratio": None if ratio is None else float(ratio),
            "ratio_def": ratio_def, "target": target, "met": met, "measurements": measurements,
            "params": params, "notes": list(notes), "seconds": float(seconds)}


def median(xs: Iterable[float]) -> float:
    xs = [float(x) for x in xs]
    return statistics.median(xs) if xs else float("nan")


def now() -> float:
    return time.perf_counter()


@contextmanager
def torch_threads(n: Optional[int]):
    """Temporarily set torch's intra-op thread count (None: leave it)."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, list]:
    """Call each function once per repetition, in the order given (A B A B ...); collect the returns."""
    out: dict[str, list] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            out[k].append(fn())
    return out


# ------------------------------------------------------------------ the machine

def resolve_device(device: Optional[str] = None) -> str:
    """``None``/``"auto"``: cuda when available, else cpu."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine(device: str) -> dict:
    info = {"cpu": cpu_model(), "cores": cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


_SPIN = "import time; t = time.perf_counter(); s = 0\nfor i in range({n}): s += i * i\nprint(time.perf_counter() - t)"


def effective_cores(procs: Optional[int] = None, n: int = 6_000_000, reps: int = 3) -> dict:
    """How much parallel CPU this machine gives right now (other jobs share it).

    Times one single-threaded pure-Python loop alone, then ``procs`` copies at
    once (``reps`` times, interleaved, medians); ``effective = procs * t_alone / t_together`` (``procs`` on idle cores,
    about 1 when the other cores are busy).  About a second per phase.
    """
    import subprocess
    import sys

    procs = procs or cpu_count()
    code = _SPIN.format(n=n)

    def batch(k: int) -> float:
        ps = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(k)]
        return max(float(p.communicate()[0]) for p in ps)

    runs = interleaved({"alone": lambda: batch(1), "together": lambda: batch(procs)}, reps)
    alone, together = median(runs["alone"]), median(runs["together"])
    return {"procs": procs, "alone_s": round(alone, 3), "together_s": round(together, 3),
            "effective_cores": round(procs * alone / together, 2)}


def load_avg() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


# ------------------------------------------------------------------ synthetic data

SYNTHETIC_SVHN = "bench_svhn_synthetic"


def svhn_like_arrays(n: int, seed: int = 0, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """SVHN-shaped data: uint8 [n, 3, 32, 32] (smooth random images, not noise) and int64 labels."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(n, 3, 8, 8), dtype=np.uint8)
    x = np.repeat(np.repeat(low, 4, axis=2), 4, axis=3)          # 8x8 blocks -> 32x32
    x = (x.astype(np.int16) + rng.integers(-12, 13, size=x.shape)).clip(0, 255).astype(np.uint8)
    y = rng.integers(0, classes, size=n).astype(np.int64)
    return x, y


def register_synthetic_svhn() -> None:
    """Register ``bench_svhn_synthetic`` (args: n_train, n_test, augment) once per process.

    The same tensors as kdray's ``svhn`` loader produces (uint8 [N, 3, 32, 32],
    mean/std 0.5 normalisation), drawn at random, so benchmarks need no download.
    """
    from kdray.data import DATASETS, register_dataset
    from kdray.data.bundle import DataBundle
    from kdray.data.images import image_preprocess

    if SYNTHETIC_SVHN in DATASETS:
        return

    @register_dataset(SYNTHETIC_SVHN, classes=10, reads_files=False, batches="indexed")
    def bench_svhn_synthetic(root=None, n_train: int = 20000, n_test: int = 2000, augment=None) -> DataBundle:
        xtr, ytr = svhn_like_arrays(n_train, 0)
        xte, yte = svhn_like_arrays(n_test, 1)
        return DataBundle("classification", 10, (3, 32, 32), torch.from_numpy(xtr), torch.from_numpy(ytr),
                          torch.from_numpy(xte), torch.from_numpy(yte),
                          preprocess=image_preprocess(0.5, 0.5, augment))


def fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a == 0:
            return "0"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.3g}" if a < 10 else f"{v:.1f}"
        return f"{v:.3g}"
    return str(v)
