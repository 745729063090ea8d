"""ResNet18 / ResNet50 from torchvision, adapted to kdray's inputs.

* ``small_input``: for 32x32 and 64x64 images (SVHN, TinyImageNet) the 7x7
  stride-2 stem and the max-pool throw away most of the resolution, so the stem
  becomes a 3x3 stride-1 conv and the max-pool is dropped (the usual CIFAR
  adaptation).  Default: on when the input height is <= 64.
* ``in_channels`` comes from ``input_shape[0]``.
* ``width`` multiplies every stage's channel count (64, 128, 256, 512 and the
  stem); 1.0 is torchvision's model exactly.
* ``blurpool``: the anti-aliased ResNet of FFCV's ImageNet example: every
  conv with stride > 1 and at least 16 input channels is preceded by a fixed
  3x3 binomial blur (``BlurPool2d``).
* ``weights``: a torchvision weight name (e.g. ``"IMAGENET1K_V2"`` for the
  paper's ImageNet ResNet50 teacher); only for torchvision's own geometry
  (224px stem, 3 channels, 1000 classes, width 1, no blurpool).  It downloads
  into the torch hub cache, so a cluster must allow it or pre-seed the cache.
* ``weights_path``: a local state_dict file (e.g. torchvision's
  ``resnet50-11ad3fa6.pth``, the IMAGENET1K_V2 weights) loaded with
  ``torch.load(weights_only=True)`` into the model as configured (strict keys; a
  ``module.`` prefix from DDP and a ``{"model"|"state_dict": ...}`` wrapper are accepted).
  For clusters without internet access.

Initialisation is torchvision's (Kaiming-normal convs, BN 1/0), drawn from the
torch global RNG only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv   # ~1.5 s; only a trial that builds a ResNet imports this module


class BlurPool2d(nn.Module):
    """Per-channel 3x3 binomial low-pass filter ([1,2,1] x [1,2,1] / 16), stride 1.

    As in FFCV's ``BlurPoolConv2d``, the blur keeps the resolution and the conv
    that follows keeps its own stride, so blur-then-strided-conv is an
    anti-aliased downsampling.
    """

    def __init__(self, channels: int):
        super().__init__()
        k = torch.tensor([1.0, 2.0, 1.0])
        k = torch.outer(k, k) / 16.0
        self.channels = channels
        self.register_buffer("kernel", k.expand(channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel.to(x.dtype), padding=1, groups=self.channels)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


def apply_blurpool(module: nn.Module) -> None:
    """Replace, in place, every strided conv with >= 16 input channels by blur-then-conv."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and max(child.stride) > 1 and child.in_channels >= 16:
            setattr(module, name, nn.Sequential(BlurPool2d(child.in_channels), child))
        else:
            apply_blurpool(child)


def _scaled(channels: int, width: float) -> int:
    return max(1, round(channels * width))


class WideResNet(tv.ResNet):
    """torchvision's ResNet with every stage ``width`` times as wide."""

    def __init__(self, block, layers: list[int], num_classes: int, width: float):
        self.width = width  # read by _make_layer, which ResNet.__init__ calls
        super().__init__(block, layers, num_classes=num_classes)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:  # layer1: its input is the stem, scaled below
            self.inplanes = _scaled(64, self.width)
        return super()._make_layer(block, _scaled(planes, self.width), blocks, stride, dilate)


def _build(block: str, layers: list[int], tv_builder: str, num_classes: int, input_shape: tuple[int, ...],
           small_input: Optional[bool], width: float, blurpool: bool, weights: Optional[str],
           weights_path: Optional[str] = None) -> nn.Module:
    if weights is not None and weights_path is not None:
        raise ValueError("give weights (a torchvision name) or weights_path (a local file), not both")
    if weights_path is not None:
        model = _build(block, layers, tv_builder, num_classes, input_shape, small_input, width, blurpool, None)
        load_local_weights(model, weights_path)
        return model
    in_channels, height = input_shape[0], input_shape[1]
    if small_input is None:
        small_input = height <= 64
    if weights is not None:
        if small_input or in_channels != 3 or num_classes != 1000 or width != 1.0 or blurpool:
            raise ValueError("pretrained weights need the ImageNet geometry: small_input=False, "
                             "3 channels, 1000 classes, width 1, no blurpool")
        return getattr(tv, tv_builder)(weights=weights)

    block = getattr(tv, block)
    model = WideResNet(block, layers, num_classes, width)
    stem = _scaled(64, width)
    new_stem = None
    if small_input:
        new_stem = nn.Conv2d(in_channels, stem, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3 or width != 1.0:
        new_stem = nn.Conv2d(in_channels, stem, kernel_size=7, stride=2, padding=3, bias=False)
    if new_stem is not None:
        nn.init.kaiming_normal_(new_stem.weight, mode="fan_out", nonlinearity="relu")
        model.conv1 = new_stem
    if width != 1.0:
        model.bn1 = nn.BatchNorm2d(stem)
        model.fc = nn.Linear(_scaled(512, width) * block.expansion, num_classes)
    if blurpool:
        apply_blurpool(model)
    return model


def load_local_weights(model: nn.Module, path: str) -> None:
    """Load a state_dict saved with torch.save (no pickled code: weights_only=True)."""
    from pathlib import Path

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"weights_path {p}: no such file")
    state = torch.load(p, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"weights_path {p} does not fit this model: {str(e).splitlines()[0]} "
                         f"(check num_classes, input size/small_input, width, blurpool)") from None


def resnet18(num_classes: int, input_shape: tuple[int, ...], small_input: Optional[bool] = None,
             width: float = 1.0, blurpool: bool = False, weights: Optional[str] = None,
             weights_path: Optional[str] = None) -> nn.Module:
    return _build("BasicBlock", [2, 2, 2, 2], "resnet18", num_classes, input_shape,
                  small_input, width, blurpool, weights, weights_path)


def resnet50(num_classes: int, input_shape: tuple[int, ...], small_input: Optional[bool] = None,
             width: float = 1.0, blurpool: bool = False, weights: Optional[str] = None,
             weights_path: Optional[str] = None) -> nn.Module:
    return _build("Bottleneck", [3, 4, 6, 3], "resnet50", num_classes, input_shape,
                  small_input, width, blurpool, weights, weights_path)
