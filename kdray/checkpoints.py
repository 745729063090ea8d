"""A pretrained teacher: a state dict on disk or in object storage, identified by its SHA-256.

``teacher: {arch: ..., checkpoint: PATH_OR_URI}`` in a sweep file replaces
training the teacher with loading these weights.  The teacher trial's key is
the file's SHA-256 (with the architecture and data set), so the same weights
under another name are the same teacher, and changed weights a new one.
Everything here raises ``CheckpointError`` with one line naming the file.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import pyarrow.fs as pafs


class CheckpointError(ValueError):
    """A checkpoint that is missing, not a state dict, or does not fit its architecture."""


def locate(path: str) -> str:
    """An absolute local path (relative paths are taken from the current folder) or the URI itself."""
    if "://" in path and not path.startswith("file://"):
        return path
    return str(Path(path.removeprefix("file://")).expanduser().resolve())


def _fs(where: str):
    if "://" in where:
        try:
            return pafs.FileSystem.from_uri(where)
        except Exception as e:  # unknown scheme, no credentials, ...
            raise CheckpointError(f"checkpoint {where}: cannot open its storage ({type(e).__name__}: {e})") from None
    return pafs.LocalFileSystem(), where


def exists(path: str) -> bool:
    fs, p = _fs(locate(path))
    return fs.get_file_info(p).type == pafs.FileType.File


def read(path: str) -> bytes:
    where = locate(path)
    fs, p = _fs(where)
    info = fs.get_file_info(p)
    if info.type != pafs.FileType.File:
        what = "is a folder" if info.type == pafs.FileType.Directory else "does not exist"
        raise CheckpointError(f"checkpoint {where} {what}; give the file torch.save(model.state_dict(), PATH) wrote")
    with fs.open_input_stream(p) as f:
        return f.read()


_digests: dict[tuple, str] = {}


def sha256(path: str) -> str:
    """The file's SHA-256 (cached per path, size and modification time)."""
    where = locate(path)
    stamp = None
    if "://" not in where:
        st = os.stat(where) if os.path.isfile(where) else None
        stamp = (where, st.st_size, st.st_mtime_ns) if st else None
    if stamp and stamp in _digests:
        return _digests[stamp]
    digest = hashlib.sha256(read(path)).hexdigest()
    if stamp:
        _digests[stamp] = digest
    return digest


def load_state_dict(path: str, expect_sha256: str | None = None) -> dict:
    """The state dict in the file (``weights_only``: nothing but tensors and plain containers is
    unpickled); with ``expect_sha256``, the file must still be the one the sweep was planned with."""
    import torch

    data = read(path)
    if expect_sha256 and hashlib.sha256(data).hexdigest() != expect_sha256:
        raise CheckpointError(f"checkpoint {locate(path)} changed since the sweep was planned "
                              f"(SHA-256 was {expect_sha256[:12]}...); plan the sweep again")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        text = _plain(str(e))
        pickled = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if pickled:   # torch.save(model, PATH): a pickled object, which weights_only never unpickles
            raise CheckpointError(f"checkpoint {locate(path)} holds a whole pickled object ({pickled.group(1)}), not a "
                                  f"state dict; save the weights with torch.save(model.state_dict(), PATH)") from None
        first = text.splitlines()[0][:160] if text else ""
        raise CheckpointError(f"checkpoint {locate(path)} is not a PyTorch file torch.load can read "
                              f"({type(e).__name__}: {first})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]        # Lightning's and many training scripts' wrapper
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        got = type(state).__name__ if not isinstance(state, dict) else "a dict whose values are not all tensors"
        raise CheckpointError(f"checkpoint {locate(path)} is not a state dict (a mapping of parameter names to "
                              f"tensors, as model.state_dict() returns); it holds {got}")
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state.items() if v.is_floating_point() or v.is_complex()}
    bad = {k: n for k, n in bad.items() if n}
    if bad:   # a teacher that cannot teach: every student and control would train for nothing
        first = next(iter(bad))
        raise CheckpointError(f"checkpoint {locate(path)} has NaN or infinite weights ({sum(bad.values())} values in "
                              f"{len(bad)} tensors, e.g. {first!r}); a teacher must have finite weights")
    return state


def _plain(text: str) -> str:
    """An error message without terminal colour codes (torch's have them), stripped."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text).strip()


def mismatch(model, state: dict) -> str:
    """What stops ``model.load_state_dict(state)`` (missing or unexpected keys, shapes), '' when nothing."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [f"{k} is {tuple(state[k].shape)} in the checkpoint, {tuple(own[k].shape)} in the model"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
    parts = ([f"missing keys {few(missing)}"] if missing else []) + \
            ([f"unexpected keys {few(extra)}"] if extra else []) + \
            ([f"shape of {shapes[0]}" + (f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else "")] if shapes else [])
    return "; ".join(parts)


def load_into(model, path: str, arch: str, args: dict, expect_sha256: str | None = None) -> None:
    """Load the checkpoint's weights into ``model`` (built as ``arch``), or one CheckpointError line
    saying what does not fit; the one place the preflight and the teacher trial both call."""
    state = load_state_dict(path, expect_sha256)
    wrong = mismatch(model, state)
    if wrong:
        raise CheckpointError(f"checkpoint {locate(path)} does not fit architecture {arch!r} with args {dict(args)}: {wrong}")
    model.load_state_dict(state)
