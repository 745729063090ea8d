"""SVHN (cropped digits, 73,257 train / 26,032 test, 10 classes) from torchvision's .mat files.

On disk: ``<root>/svhn/train_32x32.mat`` and ``<root>/svhn/test_32x32.mat``, the files
``torchvision.datasets.SVHN(root=<root>/svhn, split=..., download=True)`` fetches (each
holds ``X`` uint8 ``[32, 32, 3, N]`` and ``y`` ``[N, 1]`` with digit 0 stored as 10).
With ``download: true`` a missing file is fetched through that torchvision code path
(checksums included).  Read like torchvision: labels 10 -> 0, ``X`` transposed to
``[N, 3, 32, 32]``.

Tensors: ``uint8 [N, 3, 32, 32]`` images, ``int64 [N]`` labels.  Preprocess: normalise
with mean 0.5 / std 0.5 (docs/protocol.md §6.1); no augmentation by default (flipping digits
changes them); ``augment`` takes the names of ``kdray.data.images``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kdray.data import DataNotFoundError, require_root
from kdray.data.bundle import DataBundle
from kdray.data.images import image_preprocess

FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}


def read_svhn_mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """One torchvision SVHN .mat file -> (uint8 [N, 3, 32, 32], int64 [N])."""
    from scipy.io import loadmat

    mat = loadmat(str(path))
    x = np.transpose(mat["X"], (3, 2, 0, 1))                       # [H, W, C, N] -> [N, C, H, W]
    y = mat["y"].astype(np.int64).reshape(-1)
    y[y == 10] = 0
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.uint8)), torch.from_numpy(y)


def svhn(root: Optional[Path] = None, augment: Optional[str] = None, crop_padding: int = 4,
         download: bool = False) -> DataBundle:
    root = require_root(root, "svhn", "svhn/train_32x32.mat and svhn/test_32x32.mat")
    folder = root / "svhn"
    out = {}
    for split, fname in FILES.items():
        path = folder / fname
        if not path.is_file():
            if not download:
                raise DataNotFoundError(f"dataset 'svhn': expected {path} (torchvision's SVHN file); "
                                        f"set download: true to fetch it")
            from torchvision.datasets import SVHN
            SVHN(str(folder), split=split, download=True)
        out[split] = read_svhn_mat(path)
    (xtr, ytr), (xte, yte) = out["train"], out["test"]
    return DataBundle("classification", 10, tuple(xtr.shape[1:]), xtr, ytr, xte, yte,
                      preprocess=image_preprocess(0.5, 0.5, augment, crop_padding))
