"""UrbanSound8K (8,732 clips -> 6,985 train / 1,747 test, 10 classes).

On disk, the folder of the official archive (https://urbansounddataset.weebly.com)::

    <root>/UrbanSound8K/metadata/UrbanSound8K.csv    slice_file_name,fsID,start,end,salience,fold,classID,class
    <root>/UrbanSound8K/audio/fold<k>/<slice_file_name>

Neither torchvision nor torchaudio ships a downloader for it; fetch it by hand.
Split (docs/protocol.md §6.1): ``sklearn.model_selection.train_test_split`` over the metadata
rows in file order with ``test_size=0.2, random_state=42, shuffle=True`` (not the
official 10 folds).  Labels: ``classID`` (0-9).  Clips are mixed to mono, resampled
from their own rates (mostly 44.1/48 kHz) to 16 kHz and padded/cropped to 4 s
(``seconds``): ``float32 [N, 32, 251]``; see ``kdray.data.audio``.  Some clips are
24-bit or ADPCM WAVs: scipy reads 24-bit; install ``soundfile`` for anything it cannot.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kdray.data import DataNotFoundError, require_root
from kdray.data.bundle import DataBundle
from kdray.data.audio import cached_spectrograms, input_shape

FOLDER = "UrbanSound8K"
CSV = Path("metadata") / "UrbanSound8K.csv"


def urbansound8k(root: Optional[Path] = None, seconds: float = 4.0, log_mel: bool = False,
                 test_size: float = 0.2, random_state: int = 42, cache_dir: Optional[str] = None) -> DataBundle:
    from sklearn.model_selection import train_test_split

    root = require_root(root, "urbansound8k", f"{FOLDER}/{CSV}")
    base = root / FOLDER
    meta = base / CSV
    if not meta.is_file():
        raise DataNotFoundError(f"dataset 'urbansound8k': expected {meta} (the UrbanSound8K archive unpacked "
                                f"under the data root)")
    with meta.open(newline="") as f:
        rows = list(csv.DictReader(f))
    paths, labels = [], []
    for r in rows:
        p = base / "audio" / f"fold{int(r['fold'])}" / r["slice_file_name"]
        if not p.is_file():
            raise DataNotFoundError(f"dataset 'urbansound8k': expected {p} (listed in {meta})")
        paths.append(p)
        labels.append(int(r["classID"]))
    tr, te = train_test_split(np.arange(len(rows)), test_size=test_size, random_state=random_state, shuffle=True)
    split = {"train": [paths[i] for i in tr], "test": [paths[i] for i in te]}
    specs, path, hit = cached_spectrograms("urbansound8k", base, split, seconds, log_mel, cache_dir)
    y = torch.tensor(labels, dtype=torch.int64)
    classes = {int(r["classID"]): r.get("class", str(r["classID"])) for r in rows}
    return DataBundle("classification", 10, input_shape(seconds), specs["train"], y[torch.as_tensor(tr)],
                      specs["test"], y[torch.as_tensor(te)],
                      extras={"classes": [classes.get(i, str(i)) for i in range(10)], "cache": str(path),
                              "cache_hit": hit, "train_rows": tr.tolist(), "test_rows": te.tolist()})
