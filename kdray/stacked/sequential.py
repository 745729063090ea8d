"""K stacked students of a plain ``nn.Sequential`` conv net run as grouped operations.

``vmap`` over a small convolution batches it per student, and its backward
for the weights is slow on a CPU.  The same K students are one convolution
with ``groups=K``: their channels side by side (``[B, K*C, H, W]``), each
student's filters seeing only its own.  Linear layers become one batched
matmul.  Measured fwd+bwd on one CPU thread (16 students of the tiny digits
CNN): 4.5 ms grouped against 6.0 ms vmapped and 11 ms one at a time
(docs/benchmarks.md, "Packed trials").

``grouped_forward(model)`` gives a function of (stacked parameters,
``x [K, B, ...]``) returning ``[K, B, ...]``, or None when the model has a
layer the registry below does not know (packing then uses vmap).  Grouping
changes the order of floating-point sums, not the arithmetic: results agree
with vmap within float32 rounding (tests/test_stacked.py).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

GROUPED, STACKED = "grouped", "stacked"   # [B, K*C, H, W] / [K, B, ...]


def _to_grouped(h: torch.Tensor, layout: str, k: int) -> torch.Tensor:
    """[K, B, C, H, W] -> [B, K*C, H, W], in channels-last memory: a CPU's grouped convolutions
    and their backward run 15-20 % faster in it than in NCHW here (one thread, K = 16)."""
    if layout == GROUPED:
        return h
    b, c, spatial = h.shape[1], h.shape[2], h.shape[3:]
    if len(spatial) != 2:
        return h.transpose(0, 1).reshape(b, k * c, *spatial)
    return h.permute(1, 3, 4, 0, 2).reshape(b, *spatial, k * c).permute(0, 3, 1, 2)


def _to_stacked(h: torch.Tensor, layout: str, k: int) -> torch.Tensor:
    if layout == STACKED:
        return h
    b = h.shape[0]
    return h.reshape(b, k, h.shape[1] // k, *h.shape[2:]).transpose(0, 1)


def _conv2d(layer: nn.Conv2d, p: dict, h, layout, k):
    w = p["weight"]
    bias = p["bias"].reshape(-1) if "bias" in p else None
    out = F.conv2d(_to_grouped(h, layout, k), w.reshape(-1, *w.shape[2:]), bias, layer.stride, layer.padding,
                   layer.dilation, layer.groups * k)
    return out, GROUPED


def _linear(layer: nn.Linear, p: dict, h, layout, k):
    h = _to_stacked(h, layout, k)
    flat = h.reshape(k, -1, h.shape[-1])
    w = p["weight"].transpose(1, 2)
    out = torch.baddbmm(p["bias"].unsqueeze(1), flat, w) if "bias" in p else torch.bmm(flat, w)
    return out.reshape(*h.shape[:-1], out.shape[-1]), STACKED


def _flatten(layer: nn.Flatten, p: dict, h, layout, k):
    if layout == GROUPED:       # [B, K*C, H, W] -> [K, B, C*H*W], each student's features in its order
        return h.reshape(h.shape[0], k, -1).transpose(0, 1), STACKED
    return h.reshape(k, h.shape[1], -1), STACKED


def _per_channel(layer: nn.Module, p: dict, h, layout, k):
    """Pooling acts on each channel of each image alone: the grouped layout is K students' channels."""
    return layer(_to_grouped(h, layout, k)), GROUPED


def _elementwise(layer: nn.Module, p: dict, h, layout, k):
    return layer(h), layout


def _conv_ok(m: nn.Conv2d) -> bool:
    return m.padding_mode == "zeros"


def _flatten_ok(m: nn.Flatten) -> bool:
    return m.start_dim == 1 and m.end_dim == -1


# layer type -> (how K students run it, when it applies).  Dropout is here for p = 0 only: packing
# refuses p > 0 (kdray/packing.py, ``unpackable``), and in eval mode it is the identity.
LAYERS: dict[type, tuple[Callable, Callable[[nn.Module], bool]]] = {
    nn.Conv2d: (_conv2d, _conv_ok),
    nn.Linear: (_linear, lambda m: True),
    nn.Flatten: (_flatten, _flatten_ok),
    nn.AdaptiveAvgPool2d: (_per_channel, lambda m: True),
    nn.AvgPool2d: (_per_channel, lambda m: True),
    nn.MaxPool2d: (_per_channel, lambda m: not m.return_indices),
    nn.ReLU: (_elementwise, lambda m: not m.inplace),
    nn.GELU: (_elementwise, lambda m: True),
    nn.SiLU: (_elementwise, lambda m: not m.inplace),
    nn.Tanh: (_elementwise, lambda m: True),
    nn.Identity: (_elementwise, lambda m: True),
    nn.Dropout: (_elementwise, lambda m: m.p == 0),
}


def _layers(model: nn.Module, prefix: str = "") -> Optional[list[tuple[str, nn.Module]]]:
    """(parameter prefix, layer) in call order, or None if any layer is not in LAYERS."""
    if isinstance(model, nn.Sequential) and type(model).forward is nn.Sequential.forward:
        out = []
        for name, child in model._modules.items():   # as Sequential.forward calls them (named_children dedups)
            sub = _layers(child, f"{prefix}{name}.")
            if sub is None:
                return None
            out += sub
        return out
    entry = LAYERS.get(type(model))
    if entry is None or not entry[1](model) or list(model.buffers()):
        return None
    return [(prefix, model)]


def grouped_forward(model: nn.Module) -> Optional[Callable[[dict, torch.Tensor], torch.Tensor]]:
    """(stacked params by name, x [K, B, ...]) -> [K, B, ...] for K students of ``model``'s
    architecture, or None if ``model`` is not a plain Sequential of the layers above."""
    layers = _layers(model)
    if not layers:
        return None

    steps = [(LAYERS[type(layer)][0], layer, [(n, prefix + n) for n, _ in layer.named_parameters(recurse=False)])
             for prefix, layer in layers]
    if {full for *_, names in steps for _, full in names} != {n for n, _ in model.named_parameters()}:
        return None    # tied weights: stacked once under another layer's name

    def forward(params: dict, x: torch.Tensor) -> torch.Tensor:
        k, h, layout = x.shape[0], x, STACKED
        for run, layer, names in steps:
            h, layout = run(layer, {own: params[full] for own, full in names}, h, layout, k)
        return _to_stacked(h, layout, k)

    return forward
