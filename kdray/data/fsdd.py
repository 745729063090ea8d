"""Free Spoken Digit Dataset (3,000 recordings -> 2,700 train / 300 test, 10 classes).

On disk, the ``recordings`` folder of github.com/Jakobovski/free-spoken-digit-dataset::

    <root>/fsdd/recordings/{digit}_{speaker}_{index}.wav      mono, 8 kHz

Official split: ``index`` 0-4 test, 5-49 train.  Label: the digit.  Files ordered by
name within each split.  8 kHz -> 16 kHz, padded/cropped to 1 s (``seconds``):
``float32 [N, 32, 63]``; see ``kdray.data.audio`` for the pipeline and its cache
(``<root>/fsdd/.kdray_cache``, or ``cache_dir``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch

from kdray.data import DataNotFoundError, require_root
from kdray.data.bundle import DataBundle
from kdray.data.audio import cached_spectrograms, input_shape

NAME = re.compile(r"^(\d)_([A-Za-z0-9-]+)_(\d+)\.wav$")
TEST_INDICES = range(0, 5)


def fsdd(root: Optional[Path] = None, seconds: float = 1.0, log_mel: bool = False,
         cache_dir: Optional[str] = None) -> DataBundle:
    root = require_root(root, "fsdd", "fsdd/recordings/*.wav")
    rec = root / "fsdd" / "recordings"
    files = sorted(rec.glob("*.wav")) if rec.is_dir() else []
    if not files:
        raise DataNotFoundError(f"dataset 'fsdd': expected {rec}/{{digit}}_{{speaker}}_{{index}}.wav "
                                f"(the recordings folder of the Free Spoken Digit Dataset)")
    split: dict[str, list] = {"train": [], "test": []}
    labels: dict[str, list] = {"train": [], "test": []}
    for p in files:
        m = NAME.match(p.name)
        if not m:
            raise ValueError(f"{p}: not an FSDD file name ({{digit}}_{{speaker}}_{{index}}.wav)")
        k = "test" if int(m.group(3)) in TEST_INDICES else "train"
        split[k].append(p)
        labels[k].append(int(m.group(1)))
    specs, path, hit = cached_spectrograms("fsdd", root / "fsdd", split, seconds, log_mel, cache_dir)
    y = {k: torch.tensor(v, dtype=torch.int64) for k, v in labels.items()}
    return DataBundle("classification", 10, input_shape(seconds), specs["train"], y["train"],
                      specs["test"], y["test"], extras={"cache": str(path), "cache_hit": hit})
