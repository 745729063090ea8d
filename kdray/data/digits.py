"""scikit-learn's digits (1,797 8x8 grey images, 10 classes): ships with sklearn, no download."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from kdray.data.bundle import DataBundle


def digits(root: Optional[Path] = None, test_size: float = 0.2, split_seed: int = 0,
           flatten: bool = False) -> DataBundle:
    """A stratified train/test split fixed by ``split_seed`` (not by any trial seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images * (255.0 / 16.0)).round().astype(np.uint8)[:, None]  # [N, 1, 8, 8]
    xtr, xte, ytr, yte = train_test_split(x, d.target, test_size=test_size,
                                          random_state=split_seed, stratify=d.target)
    t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a), dtype=dt)  # noqa: E731
    mean, std = 0.5, 0.5

    def preprocess(xb: torch.Tensor, train: bool, gen) -> torch.Tensor:
        xb = (xb.float() / 255.0 - mean) / std
        return xb.flatten(1) if flatten else xb

    shape = (64,) if flatten else (1, 8, 8)
    return DataBundle("classification", 10, shape, t(xtr, torch.uint8), t(ytr, torch.int64),
                      t(xte, torch.uint8), t(yte, torch.int64), preprocess=preprocess)


