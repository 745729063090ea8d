"""A VGGish-style CNN (Hershey et al. 2017) for log-mel spectrograms, from scratch.

Input ``(n_mels, frames)`` or ``(1, n_mels, frames)`` (a missing channel
dimension is added).  Four conv stages as in VGGish, 64 | 128 | 256-256 |
512-512 (3x3 convs, BatchNorm, ReLU), each followed by a 2x2 max-pool that
rounds up and leaves an axis alone once it is 1 long, so anything from 8x8 to
32 mels x 100 frames and beyond passes; then global average pooling and a
classifier ``512 -> hidden -> K`` in place of VGGish's 4096-4096-128 head.
``width`` multiplies every channel count.  ``batch_norm`` (not in the original
VGGish) keeps SGD at lr 0.01 stable from scratch; turn it off for the
original's plain convs.  Initialisation: Kaiming-normal convs, BN 1/0, PyTorch
default linears, all from the torch global RNG.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


STAGES = [[64], [128], [256, 256], [512, 512]]


class Pool2x2(nn.Module):
    """2x2 max-pool (ceil mode) that skips an axis already of length 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel = (2 if x.shape[-2] > 1 else 1, 2 if x.shape[-1] > 1 else 1)
        return F.max_pool2d(x, kernel, ceil_mode=True)


class VGGish(nn.Module):
    def __init__(self, num_classes: int, in_channels: int, width: float, hidden: int, dropout: float,
                 batch_norm: bool):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for stage in STAGES:
            for channels in stage:
                c = max(1, round(channels * width))
                layers += [nn.Conv2d(c_in, c, kernel_size=3, padding=1, bias=not batch_norm)]
                layers += [nn.BatchNorm2d(c)] if batch_norm else []
                layers += [nn.ReLU(inplace=True)]
                c_in = c
            layers.append(Pool2x2())
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        h = max(1, round(hidden * width))
        self.classifier = nn.Sequential(
            nn.Linear(c_in, h), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(h, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:                                             # [B, n_mels, frames]
            x = x.unsqueeze(1)
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vggish(num_classes: int, input_shape: tuple[int, ...], width: float = 1.0, hidden: int = 256,
           dropout: float = 0.2, batch_norm: bool = True) -> nn.Module:
    in_channels = 1 if len(input_shape) == 2 else input_shape[0]
    return VGGish(num_classes, in_channels, width, hidden, dropout, batch_norm)
