"""Where a sweep keeps its trial artefacts: a local folder or s3://, gs:// (pyarrow).

Layout under ``<storage>/``::

    trials/<trial_key>/model.pt            teachers: the trained weights (students load them)
    trials/<trial_key>/test_logits.npy     teachers: float32 test logits (students compare to them)
    trials/<trial_key>/test_outputs.npz    every trial: float16 logits + labels, compressed
    trials/<trial_key>/result.json         every trial: its final metrics and history
    trials/<trial_key>/run.json            every trial: how it was run (spec, fingerprint, data
                                           checksum, pack, seconds): provenance, not a result
    <sweep>/tune/                          Ray Tune's own experiment state, per sweep

Trial folders are keyed by trial key alone, not by sweep: a teacher trained by
one sweep file (self-distillation) is found and reused by another (standard
KD, temperature, width) that plans the same teacher.

Writes go to a temporary name first and are renamed, so a crash never leaves
a half-written artefact that a later stage would trust.

Every result file is a pure function of what it holds: no timestamps (archives are written
with a fixed date), no timings (those go to run.json), so a trial run twice on one machine
stores the same bytes (``RESULT_FILES``; tests and ``kdray verify`` compare them).
"""
from __future__ import annotations

import io
import json
import os
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs


# A trial's results (what ``kdray verify`` and the resume tests compare byte for byte); run.json
# is how it was run (timings, fingerprint), not a result.
RESULT_FILES = ("result.json", "test_outputs.npz", "model.pt", "test_logits.npy", "train_logits.npy")
RUN_FILE = "run.json"
ZIP_DATE = (1980, 1, 1, 0, 0, 0)     # the earliest date a zip entry holds: no clock in the bytes


def npz_bytes(**arrays: np.ndarray) -> bytes:
    """``np.savez``'s archive (stored, not deflated), with a fixed date on every entry: numpy
    stamps each with the current time, so two saves of the same arrays would differ."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for name, arr in arrays.items():
            body = io.BytesIO()
            np.lib.format.write_array(body, np.asanyarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_DATE)
            info.external_attr = 0o600 << 16
            z.writestr(info, body.getvalue())
    return buf.getvalue()


def _is_uri(path: str) -> bool:
    return "://" in path


class Store:
    def __init__(self, storage: str, sweep: str):
        base = storage if _is_uri(storage) else str(Path(storage).expanduser().resolve())
        self.uri = base.rstrip("/")
        self.sweep = sweep
        if _is_uri(base):
            self.fs, root = pafs.FileSystem.from_uri(self.uri)
        else:
            self.fs, root = pafs.LocalFileSystem(), self.uri
        self.root = root.rstrip("/")

    # ------------------------------------------------------------- paths
    def trial_dir(self, key: str) -> str:
        return f"{self.root}/trials/{key}"

    def tune_path(self) -> str:
        """Tune's storage_path: a local absolute path or the URI itself."""
        return f"{self.uri if _is_uri(self.uri) else self.root}/{self.sweep}/tune"

    def local_dir(self, key: str) -> Path | None:
        """The trial folder on this machine, when storage is local."""
        return None if _is_uri(self.uri) else Path(self.trial_dir(key))

    # ------------------------------------------------------------- bytes
    def write_bytes(self, key: str, name: str, data: bytes) -> None:
        d = self.trial_dir(key)
        self.fs.create_dir(d, recursive=True)
        tmp = f"{d}/.{name}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, f"{d}/{name}")

    def read_bytes(self, key: str, name: str) -> bytes:
        with self.fs.open_input_stream(f"{self.trial_dir(key)}/{name}") as f:
            return f.read()

    def exists(self, key: str, name: str) -> bool:
        return self.fs.get_file_info(f"{self.trial_dir(key)}/{name}").type == pafs.FileType.File

    # ------------------------------------------------------------- arrays
    def save_npy(self, key: str, name: str, arr: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        self.write_bytes(key, name, buf.getvalue())

    def load_npy(self, key: str, name: str) -> np.ndarray:
        return np.load(io.BytesIO(self.read_bytes(key, name)), allow_pickle=False)

    def save_npz(self, key: str, name: str, **arrays: np.ndarray) -> None:
        """Stored, not deflated: float16 logits shrink by only 8-12 % at ~20x the time
        (docs/benchmarks.md, "Packed trials"); ``np.load`` reads either."""
        self.write_bytes(key, name, npz_bytes(**arrays))

    def save_json(self, key: str, name: str, obj) -> None:
        self.write_bytes(key, name, json.dumps(obj, indent=1, sort_keys=True).encode())

    def load_json(self, key: str, name: str):
        return json.loads(self.read_bytes(key, name))

    def load_result(self, key: str) -> dict:
        """result.json with the trial's ``train_seconds`` from run.json put back into its final
        record (as the trial reported it), for logging a stored trial to MLflow."""
        result = self.load_json(key, "result.json")
        if "train_seconds" not in result["final"] and self.exists(key, RUN_FILE):
            result["final"]["train_seconds"] = self.load_json(key, RUN_FILE).get("seconds")
        return result

    def load_run(self, key: str) -> dict:
        """run.json (spec, fingerprint, data checksum, pack, seconds), or {} for a trial stored
        before kdray wrote it."""
        return self.load_json(key, RUN_FILE) if self.exists(key, RUN_FILE) else {}

    def fetch_to(self, key: str, name: str, dest_dir: str | os.PathLike) -> Path:
        """A local copy of an artefact (for logging it to MLflow)."""
        local = self.local_dir(key)
        if local is not None:
            return local / name
        out = Path(dest_dir) / name
        out.write_bytes(self.read_bytes(key, name))
        return out
