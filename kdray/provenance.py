"""What a result came from: the code, the libraries and the device (a *fingerprint*), and the data.

A stored trial result is a pure function of its trial key and its fingerprint: the same
trial run again where the fingerprint is the same gives the same bytes (``kdray verify``
checks it), and a paired comparison whose two runs have different fingerprints is flagged
by the report, since part of the difference it tests may be the machine's.

The fingerprint holds what can change a float: kdray's version and git commit (and whether
kdray's sources differ from it), Python, torch, CUDA, cuDNN, numpy and the BLAS builds,
the device (CPU model and the instruction set torch dispatches to, or the GPU model), the
torch thread count, and the versions of the plug-in packages a trial imported.  Nothing
that varies between identical runs (host name, time, process id) is in it.
"""
from __future__ import annotations

import functools
import hashlib
import json
import platform
import subprocess
from pathlib import Path
from typing import Iterable, Optional

ID_LENGTH = 12


@functools.cache
def _git() -> tuple[str, bool]:
    """(commit, dirty) of the checkout kdray is imported from; ("unknown", False) outside git."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here,
                             timeout=5).stdout.strip()
        if not sha:
            return "unknown", False
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", str(here)],
                                 capture_output=True, text=True, cwd=here, timeout=5).stdout.strip()
        return sha, bool(changed)
    except Exception:   # no git, a timeout: the version still says which release
        return "unknown", False


@functools.cache
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def _libraries() -> dict:
    import numpy as np
    import torch

    config = torch.__config__.show()
    blas = next((ln.split("=", 1)[1].strip() for ln in config.splitlines() if "BLAS_INFO=" in ln), "unknown")
    try:
        deps = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        np_blas = f"{deps.get('name', '?')} {deps.get('version', '')}".strip()
    except Exception:   # numpy's config layout is not a stable API
        np_blas = "unknown"
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": cudnn, "numpy": np.__version__, "torch_blas": blas, "numpy_blas": np_blas}


def _device(device: str) -> dict:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        return {"device": "cuda", "device_model": torch.cuda.get_device_name(torch.device(device))}
    return {"device": "cpu", "device_model": _cpu_model(), "isa": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine()}


def _plugin_versions(modules: Iterable[str]) -> dict:
    """{distribution: version} of the packages the plug-in modules come from (entry points too)."""
    return dict(_versions(tuple(sorted(set(modules)))))


@functools.lru_cache(maxsize=64)
def _versions(modules: tuple[str, ...]) -> tuple:
    """Once per process and set of modules: reading every installed distribution's metadata takes
    about 0.4 s, which a short trial would pay again each time."""
    from importlib.metadata import entry_points, packages_distributions, version

    tops = {m.split(".")[0].split(":")[0] for m in modules}
    tops |= {ep.value.split(".")[0].split(":")[0] for ep in entry_points(group="kdray.plugins")}
    owners = packages_distributions()
    out = {}
    for top in sorted(tops):
        for dist in owners.get(top, []) or [top]:
            try:
                out[dist] = version(dist)
            except Exception:   # a module on PYTHONPATH, not installed: named, no version
                out[dist] = "not installed"
    return tuple(sorted(out.items()))


def fingerprint(device: str = "cpu", plugins: Iterable[str] = (), simulated: Optional[str] = None) -> dict:
    """This process's fingerprint for a trial on ``device`` (call it after the thread count is set)."""
    import torch

    from kdray import __version__

    sha, dirty = _git()
    fp = {"kdray": __version__, "git": sha, "git_dirty": dirty, **_libraries(), **_device(device),
          "threads": torch.get_num_threads(), "plugins": _plugin_versions(plugins)}
    if simulated:
        fp["simulated"] = simulated
    return fp


def fingerprint_id(fp: dict) -> str:
    """A short stable name for a fingerprint (its canonical JSON's SHA-256)."""
    blob = json.dumps(fp, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:ID_LENGTH]


def ray_node() -> Optional[str]:
    """The Ray node this process runs on (where a trial ran: placement, not a fingerprint), or None
    outside Ray."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().get_node_id()


def ray_gpu_ids() -> Optional[list]:
    """The (logical) GPUs Ray gave this process, or None outside Ray: where a GPU trial was placed."""
    import sys

    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return [str(g) for g in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def describe(fp: dict) -> str:
    """One line a reader can compare: code, libraries, device, threads."""
    code = f"kdray {fp.get('kdray', '?')} git {str(fp.get('git', '?'))[:10]}" + (" (dirty)" if fp.get("git_dirty") else "")
    libs = f"python {fp.get('python', '?')}, torch {fp.get('torch', '?')}"
    if fp.get("cuda"):
        libs += f", CUDA {fp['cuda']}, cuDNN {fp.get('cudnn')}"
    dev = fp.get("device_model", "?") + (f" {fp['isa']}" if fp.get("isa") else "")
    sim = f", SIMULATED {fp['simulated']}" if fp.get("simulated") else ""
    plugins = fp.get("plugins") or {}
    plug = ("; plug-ins " + ", ".join(f"{k} {v}" for k, v in plugins.items())) if plugins else ""
    return f"{code}; {libs}; {fp.get('device', '?')} {dev}, {fp.get('threads', '?')} threads{sim}{plug}"


# ------------------------------------------------------------------ data and files

def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tensor_bytes(t) -> bytes:
    return t.detach().cpu().contiguous().numpy().tobytes()


def data_checksum(bundle) -> str:
    """SHA-256 over a data set's tensors as the trial sees them (shapes, dtypes and values of the
    train and test splits), computed once per loaded bundle.  A bundle with its own
    ``checksum()`` is named by it; a streaming one (FFCV) by its files' names and sizes, since
    hashing tens of GB per trial would cost more than the trial."""
    extras = getattr(bundle, "extras", None)
    cached = extras.get("kdray.data_sha256") if isinstance(extras, dict) else None
    if cached:
        return cached
    if callable(getattr(bundle, "checksum", None)):
        digest = bundle.checksum()
    elif hasattr(bundle, "set_epoch"):   # streaming files (FFCV, tens of GB): named by name and size
        files = [Path(extras[k]) for k in ("train", "val") if isinstance(extras, dict) and k in extras]
        digest = "files:" + sha256_bytes(json.dumps([(f.name, f.stat().st_size) for f in files if f.exists()]).encode())
    else:
        import torch

        h = hashlib.sha256()
        for name in ("train_x", "train_y", "test_x", "test_y"):
            t = getattr(bundle, name, None)
            h.update(name.encode())
            if isinstance(t, torch.Tensor):
                h.update(f"{tuple(t.shape)}{t.dtype}".encode())
                h.update(_tensor_bytes(t))
        digest = h.hexdigest()
    if isinstance(extras, dict):
        extras["kdray.data_sha256"] = digest
    return digest
