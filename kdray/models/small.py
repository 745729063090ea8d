"""Small models for CPU-sized runs (the quickstart on scikit-learn digits)."""
from __future__ import annotations

import math

from torch import nn



def mlp(num_classes: int, input_shape: tuple[int, ...], hidden: int = 128, depth: int = 2,
        dropout: float = 0.1, width: float = 1.0) -> nn.Module:
    """A plain ReLU MLP on flattened inputs; ``width`` scales the hidden size."""
    h = max(1, round(hidden * width))
    layers: list[nn.Module] = [nn.Flatten()]
    d_in = math.prod(input_shape)
    for _ in range(depth):
        layers += [nn.Linear(d_in, h), nn.ReLU(), nn.Dropout(dropout)]
        d_in = h
    layers.append(nn.Linear(d_in, num_classes))
    return nn.Sequential(*layers)


def small_cnn(num_classes: int, input_shape: tuple[int, ...], channels: int = 32,
              dropout: float = 0.1, width: float = 1.0, batch_norm: bool = True) -> nn.Module:
    """Two conv blocks and a linear head, for small (e.g. 8x8) grey images.

    ``batch_norm=False`` puts Identity in BatchNorm's place (same layer indices).  Packed
    students (kdray/packing.py) train either way: kdray/stacked/sequential.py runs BatchNorm and
    dropout per student."""
    c = max(1, round(channels * width))
    c_in = input_shape[0]
    norm = nn.BatchNorm2d if batch_norm else (lambda n: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(c_in, c, 3, padding=1), norm(c), nn.ReLU(),
        nn.Conv2d(c, 2 * c, 3, padding=1), norm(2 * c), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(dropout),
        nn.Linear(2 * c * 4, num_classes),
    )
