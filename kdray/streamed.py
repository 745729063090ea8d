"""A trial's test outputs when its N x V logits are too large to hold (language models at GPT-2's
vocabulary: 59k test tokens x 50,257 classes are 11.9 GB of float32).

Above ``memory_limit()`` bytes a trial never builds an N x V array: its test pass writes its
float32 logits batch by batch into a temporary .npy (``evaluate_to_file``), the teacher's stored
logits are memory-mapped (``teacher_test_logits``), and the loss, accuracy, finiteness check,
functional metrics (``functional_metrics_streamed``: every metric but Procrustes, whose V x V
cross-product no vocabulary-size V affords) and stored artefacts are all read from those files
in blocks of rows.  Below the limit nothing here runs: a trial's in-memory path, and so its stored
bytes, are as they were.
"""
from __future__ import annotations

import io
import os
import tempfile
import uuid
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch import nn

from kdray.storage import ZIP_DATE, Store
from kdray.streamlimit import DEFAULT_LIMIT, ENV, memory_limit, streams  # noqa: F401  - this module's names too

BLOCK_ELEMENTS = 1 << 20     # logits read, evaluated or written at once (float32/float64: 4-8 MiB per array)


def outputs_shape(bundle) -> Optional[tuple[int, int]]:
    """(N test positions, K classes) of a data bundle, or None for one whose test set is not a
    tensor (streaming loaders: those keep the in-memory path)."""
    y = getattr(bundle, "test_y", None)
    return (int(y.numel()), int(bundle.num_classes)) if isinstance(y, torch.Tensor) and len(y) else None


def bundle_streams(bundle) -> bool:
    shape = outputs_shape(bundle)
    return shape is not None and streams(*shape)


def reason(n: int, k: int) -> str:
    """Why a streamed trial has no ``procrustes_distance`` (run.json, the run's tag)."""
    return (f"functional metrics streamed from files, procrustes_distance not computed: {n} x {k} test "
            f"logits or Procrustes' {k} x {k} matrix exceed ${ENV}={memory_limit()} bytes")


# ------------------------------------------------------------------ reading

def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype


def teacher_test_logits(store: Store, key: str, name: str = "test_logits.npy") -> np.ndarray:
    """A teacher's stored test logits: read whole when small (as always), memory-mapped when they
    stream (a store off this machine is first copied, in blocks, to a local file that is unlinked
    once mapped: the mapping keeps it until the array goes)."""
    with store.fs.open_input_stream(f"{store.trial_dir(key)}/{name}") as f:
        shape, _ = _npy_header(f)
    if len(shape) != 2 or not streams(*shape):
        return store.load_npy(key, name)
    local = store.local_dir(key)
    if local is not None:
        return np.load(local / name, mmap_mode="r")
    fd, path = tempfile.mkstemp(suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as out, store.fs.open_input_stream(f"{store.trial_dir(key)}/{name}") as f:
            while chunk := f.read(4 * BLOCK_ELEMENTS):
                out.write(chunk)
        return np.load(path, mmap_mode="r")
    finally:
        os.unlink(path)          # the mapping keeps the data until the array goes


# ------------------------------------------------------------------ the test pass

# this module's temporary files in a trial's folder: the logits memmaps, and test_outputs.npz or
# test_logits.npy on their way in (store_outputs, store_file)
STALE = (".test_logits.*.tmp.npy", ".test_*.tmp")

@contextmanager
def logits_files(n: int, k: int, folders: list[Optional[Path]]) -> Iterator[list[np.ndarray]]:
    """One writable [N, K] float32 memmap per folder, each a hidden temporary .npy there (the
    trial's folder when storage is local; else the system's), removed on leaving whatever happens,
    and should the process be killed, by the trial's next attempt."""
    paths = []
    try:
        for folder in folders:
            if folder is not None:
                folder.mkdir(parents=True, exist_ok=True)
                for pattern in STALE:   # an earlier, killed attempt's temporary files
                    for stale in folder.glob(pattern):
                        stale.unlink(missing_ok=True)
            fd, path = tempfile.mkstemp(prefix=f".test_logits.{uuid.uuid4().hex}.", suffix=".tmp.npy",
                                        dir=None if folder is None else str(folder))
            os.close(fd)
            paths.append(path)
        yield [np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, k)) for path in paths]
    finally:
        for path in paths:
            Path(path).unlink(missing_ok=True)


def read_only(written: np.ndarray) -> np.ndarray:
    """A written ``logits_files`` memmap, flushed and mapped again read-only."""
    written.flush()
    return np.load(written.filename, mmap_mode="r")


def eval_rows(bundle, batch_size: int, models: int = 1) -> int:
    """Test inputs per batch: ``batch_size``, fewer when ``models`` x an input's positions x K would
    exceed ``BLOCK_ELEMENTS`` (one at least)."""
    n, k = outputs_shape(bundle)
    return max(1, min(batch_size, BLOCK_ELEMENTS // (models * max(1, n // len(bundle.test_y)) * k)))


@contextmanager
def evaluate_to_file(model: nn.Module, bundle, device, batch_size: int,
                     folder: Optional[Path]) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """The model's float32 test logits as a read-only [N, K] memmap, and the labels, written batch by
    batch to a ``logits_files`` file in ``folder`` (batches of ``eval_rows``)."""
    n, k = outputs_shape(bundle)
    with logits_files(n, k, [folder]) as (out,):
        ys, at = [], 0
        model.eval()
        with torch.inference_mode():
            for xb, yb in bundle.test_batches(eval_rows(bundle, batch_size)):
                logits = model(bundle.preprocess(xb.to(device), False, None)).float().reshape(-1, k)
                out[at:at + len(logits)] = logits.cpu().numpy()
                at += len(logits)
                ys.append(yb.reshape(-1))
        if at != n:
            raise RuntimeError(f"the test pass gave {at} rows of logits for {n} test positions")
        yield read_only(out), torch.cat(ys)


def _blocks(n: int, k: int) -> Iterator[slice]:
    rows = max(1, BLOCK_ELEMENTS // k)
    for s in range(0, n, rows):
        yield slice(s, min(n, s + rows))


def loss_and_accuracy(logits: np.ndarray, y: torch.Tensor) -> tuple[float, float]:
    """``recipe.loss_and_accuracy`` read in blocks of rows: the cross-entropy summed in float64 (so it
    can differ from the in-memory float32 mean in its last digits), the accuracy the same k/n."""
    n, k = logits.shape
    total, correct = 0.0, 0
    for r in _blocks(n, k):
        z, yb = torch.from_numpy(np.array(logits[r])), y[r]
        total += float(nn.functional.cross_entropy(z, yb, reduction="sum").double())
        correct += int((z.argmax(-1) == yb).sum())
    return total / n, correct / n


def all_finite(logits: np.ndarray) -> bool:
    return all(bool(np.isfinite(logits[r]).all()) for r in _blocks(*logits.shape))


# ------------------------------------------------------------------ writing

def write_outputs_npz(path: str, logits: np.ndarray, y: torch.Tensor) -> None:
    """The bytes ``storage.npz_bytes(logits=logits.astype(float16), labels=y)`` would give, written in
    blocks of rows: each entry's size is set before it is opened, as ``ZipFile.writestr`` does."""
    n, k = logits.shape
    head = _io_bytes(lambda f: np.lib.format.write_array_header_1_0(
        f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": (n, k)}))
    labels = _io_bytes(lambda f: np.lib.format.write_array(f, y.numpy(), allow_pickle=False))
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as z:
        info = _info("logits.npy")
        info.file_size = len(head) + n * k * 2
        with z.open(info, "w") as dest:
            dest.write(head)
            for r in _blocks(n, k):
                dest.write(np.ascontiguousarray(logits[r], dtype=np.float16).tobytes())
        z.writestr(_info("labels.npy"), labels)


def _info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.external_attr = 0o600 << 16
    return info


def _io_bytes(write) -> bytes:
    buf = io.BytesIO()
    write(buf)
    return buf.getvalue()


def store_file(store: Store, key: str, name: str, path: str) -> None:
    """Copy a local file into the trial's folder as ``name`` (``Store.write_bytes``'s temporary name
    and rename, in pieces of one float32 block instead of one bytes object)."""
    d = store.trial_dir(key)
    store.fs.create_dir(d, recursive=True)
    tmp = f"{d}/.{name}.{uuid.uuid4().hex}.tmp"
    with open(path, "rb") as src, store.fs.open_output_stream(tmp) as out:
        while chunk := src.read(4 * BLOCK_ELEMENTS):
            out.write(chunk)
    store.fs.move(tmp, f"{d}/{name}")


def store_outputs(store: Store, key: str, name: str, logits: np.ndarray, y: torch.Tensor) -> None:
    """test_outputs.npz (float16 logits, labels) from the memmap, through a local temporary file
    (in the trial's folder when storage is local) that is removed whatever happens."""
    folder = store.local_dir(key)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=None if folder is None else str(folder))
    os.close(fd)
    try:
        write_outputs_npz(path, logits, y)
        store_file(store, key, name, path)
    finally:
        Path(path).unlink(missing_ok=True)
