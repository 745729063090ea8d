"""Speech Commands v0.02 (84,843 train / 11,005 test, 35 classes), as torchaudio lays it out.

On disk (``torchaudio.datasets.SPEECHCOMMANDS(root, download=True)`` produces it)::

    <root>/SpeechCommands/speech_commands_v0.02/<label>/<speaker>_nohash_<n>.wav
    <root>/SpeechCommands/speech_commands_v0.02/validation_list.txt
    <root>/SpeechCommands/speech_commands_v0.02/testing_list.txt

Labels: the 35 label folders sorted (``_background_noise_`` excluded).  Split as
torchaudio's ``subset``: test = ``testing_list.txt``; train = every ``*/*_nohash_*.wav``
in neither list (the validation files are not used).  With ``download: true`` a
missing folder is fetched through torchaudio's download code (sha256-checked).

Tensors: ``float32 [N, 32, 63]`` mel spectrograms (1 s; ``seconds`` to change),
``int64`` labels; see ``kdray.data.audio`` for the pipeline and its cache
(``<...>/speech_commands_v0.02/.kdray_cache``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from kdray.data import DataNotFoundError, require_root
from kdray.data.bundle import DataBundle
from kdray.data.audio import cached_spectrograms, input_shape

FOLDER = Path("SpeechCommands") / "speech_commands_v0.02"
HASH_DIVIDER = "_nohash_"
EXCEPT_FOLDER = "_background_noise_"


def _read_list(path: Path) -> set[str]:
    if not path.is_file():
        raise DataNotFoundError(f"dataset 'speechcommands': expected {path}")
    return {os.path.normpath(line.strip()) for line in path.read_text().splitlines() if line.strip()}


def speechcommands(root: Optional[Path] = None, seconds: float = 1.0, log_mel: bool = False,
                   cache_dir: Optional[str] = None, download: bool = False) -> DataBundle:
    root = require_root(root, "speechcommands", str(FOLDER) + "/")
    base = root / FOLDER
    if not base.is_dir():
        if not download:
            raise DataNotFoundError(f"dataset 'speechcommands': expected {base} (torchaudio's SPEECHCOMMANDS layout); "
                                    f"set download: true to fetch it")
        from torchaudio.datasets import SPEECHCOMMANDS
        SPEECHCOMMANDS(str(root), download=True)
    testing = _read_list(base / "testing_list.txt")
    excluded = testing | _read_list(base / "validation_list.txt")
    labels = sorted(d.name for d in base.iterdir() if d.is_dir() and d.name != EXCEPT_FOLDER
                    and not d.name.startswith("."))
    index = {c: i for i, c in enumerate(labels)}

    train, test = [], []
    for c in labels:
        for p in sorted((base / c).glob("*.wav")):
            rel = os.path.normpath(f"{c}/{p.name}")
            if HASH_DIVIDER not in p.name or rel in excluded:
                continue
            train.append(p)
    for rel in sorted(testing):
        c = rel.split(os.sep)[0]
        if c not in index:
            raise ValueError(f"{base / 'testing_list.txt'}: {rel} has no label folder")
        if not (base / rel).is_file():
            raise DataNotFoundError(f"dataset 'speechcommands': {base / rel} is listed in testing_list.txt "
                                    f"but missing")
        test.append(base / rel)

    specs, path, hit = cached_spectrograms("speechcommands", base, {"train": train, "test": test},
                                           seconds, log_mel, cache_dir)
    lab = lambda ps: torch.tensor([index[p.parent.name] for p in ps], dtype=torch.int64)  # noqa: E731
    return DataBundle("classification", len(labels), input_shape(seconds), specs["train"], lab(train),
                      specs["test"], lab(test), extras={"classes": labels, "cache": str(path), "cache_hit": hit})
