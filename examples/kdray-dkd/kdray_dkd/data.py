"""The example's own data set: overlapping Gaussian classes, fixed by ``split_seed`` (no download)."""
from pathlib import Path
from typing import Optional

import torch

from kdray.data.bundle import DataBundle


def blobs(root: Optional[Path] = None, n: int = 2000, features: int = 16, split_seed: int = 0) -> DataBundle:
    """5 classes whose centres are 1.5 standard deviations apart: hard enough that a teacher errs."""
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=n, n_features=features, n_informative=8, n_classes=5,
                               n_clusters_per_class=2, class_sep=1.0, flip_y=0.05, random_state=split_seed)
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    cut = int(0.8 * n)
    return DataBundle("classification", 5, (features,), x[:cut], y[:cut], x[cut:], y[cut:])
