"""VGG19 / VGG19-BN from torchvision, adapted to small images.

For inputs of height <= 64 (SVHN 32x32, TinyImageNet 64x64) torchvision's head
(7x7 adaptive pool, 25088 -> 4096 -> 4096 -> K, 120M parameters) is replaced by
a 1x1 adaptive average pool and a small classifier ``512 -> hidden -> K`` (the
usual CIFAR adaptation); the 16 conv layers are torchvision's configuration
"E".  Larger inputs get torchvision's model unchanged.  ``in_channels`` comes
from ``input_shape[0]``.  Initialisation is torchvision's (Kaiming-normal
convs, BN 1/0, Linear N(0, 0.01)), drawn from the torch global RNG only.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torchvision.models import vgg as tv   # only a trial that builds a VGG imports this module



def _init_like_torchvision(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.constant_(m.bias, 0)


class SmallVGG(nn.Module):
    """torchvision's VGG feature stack with a global-pool head for small images."""

    def __init__(self, batch_norm: bool, num_classes: int, in_channels: int, hidden: int, dropout: float):
        super().__init__()
        self.features = tv.make_layers(tv.cfgs["E"], batch_norm=batch_norm)
        if in_channels != 3:
            self.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(512, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        _init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def _build(batch_norm: bool, num_classes: int, input_shape: tuple[int, ...], small_input: Optional[bool],
           hidden: int, dropout: float) -> nn.Module:
    in_channels, height = input_shape[0], input_shape[1]
    if small_input is None:
        small_input = height <= 64
    if small_input:
        return SmallVGG(batch_norm, num_classes, in_channels, hidden, dropout)
    model = (tv.vgg19_bn if batch_norm else tv.vgg19)(weights=None, num_classes=num_classes, dropout=dropout)
    if in_channels != 3:
        model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
        _init_like_torchvision(model.features[0])
    return model


def vgg19(num_classes: int, input_shape: tuple[int, ...], small_input: Optional[bool] = None,
          hidden: int = 512, dropout: float = 0.5) -> nn.Module:
    return _build(False, num_classes, input_shape, small_input, hidden, dropout)


def vgg19_bn(num_classes: int, input_shape: tuple[int, ...], small_input: Optional[bool] = None,
             hidden: int = 512, dropout: float = 0.5) -> nn.Module:
    return _build(True, num_classes, input_shape, small_input, hidden, dropout)
