"""K stacked students of a plain ``nn.Sequential`` net run as grouped operations.

``vmap`` over a small convolution batches it per student, and its backward
for the weights is slow on a CPU.  The same K students are one convolution
with ``groups=K``: their channels side by side (``[B, K*C, H, W]``), each
student's filters seeing only its own.  Linear layers become one batched
matmul.  Measured fwd+bwd on one CPU thread (16 students of the tiny digits
CNN): 4.5 ms grouped against 6.0 ms vmapped and 11 ms one at a time
(docs/benchmarks.md, "Packed trials").

Unlike vmap, the grouped layout also trains BatchNorm (one BatchNorm over the K x C
channels: each student's statistics over its own batch, its running statistics
updated in the stacked buffers) and dropout (each student's masks from its own
generator, as it would draw them alone), so the quickstart's CNN packs as it is.

``grouped_forward(model)`` gives a function of (stacked parameters, stacked
buffers, ``x [K, B, ...]``, per-student dropout generators) returning
``[K, B, ...]``, or None when the model has a layer the registry below does not
know (packing then uses vmap).  Grouping changes the order of floating-point
sums, not the arithmetic: results agree with each student run alone within
float32 rounding (tests/test_stacked.py).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kdray.stacked.ops import batched_linear

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


def _conv2d(layer: nn.Conv2d, p: dict, h, layout, k, rngs):
    w = p["weight"]
    bias = p["bias"].reshape(-1) if "bias" in p else None
    out = F.conv2d(_to_grouped(h, layout, k), w.reshape(-1, *w.shape[2:]), bias, layer.stride, layer.padding,
                   layer.dilation, layer.groups * k)
    return out, GROUPED


def _linear(layer: nn.Linear, p: dict, h, layout, k, rngs):
    return batched_linear(_to_stacked(h, layout, k), p["weight"], p.get("bias")), STACKED


def _flatten(layer: nn.Flatten, p: dict, h, layout, k, rngs):
    if layout == GROUPED:       # [B, K*C, H, W] -> [K, B, C*H*W], each student's features in its order
        return h.reshape(h.shape[0], k, -1).transpose(0, 1), STACKED
    return h.reshape(k, h.shape[1], -1), STACKED


def _per_channel(layer: nn.Module, p: dict, h, layout, k, rngs):
    """Pooling acts on each channel of each image alone: the grouped layout is K students' channels."""
    return layer(_to_grouped(h, layout, k)), GROUPED


def _elementwise(layer: nn.Module, p: dict, h, layout, k, rngs):
    return layer(h), layout


def _batch_norm(layer: nn.modules.batchnorm._BatchNorm, p: dict, h, layout, k, rngs):
    """Each student's channels are normalised over its own batch, as one BatchNorm over the K x C
    channels of the grouped layout; the running statistics are views of the stacked buffers
    ``[K, C]``, so F.batch_norm updates every student's in place (momentum and the cumulative
    average of ``momentum=None`` as ``_BatchNorm.forward`` computes them)."""
    x = _to_grouped(h, layout, k)
    factor = 0.0 if layer.momentum is None else layer.momentum
    if layer.training and layer.track_running_stats:
        p["num_batches_tracked"].add_(1)
        if layer.momentum is None:
            factor = 1.0 / float(p["num_batches_tracked"][0])
    flat = {n: p[n].reshape(-1) if p.get(n) is not None else None
            for n in ("running_mean", "running_var", "weight", "bias")}
    out = F.batch_norm(x, flat["running_mean"], flat["running_var"], flat["weight"], flat["bias"],
                       layer.training or flat["running_mean"] is None, factor, layer.eps)
    return out, GROUPED


def _dropout(layer: nn.Dropout, p: dict, h, layout, k, rngs):
    """Each student's mask from its own generator, drawn as F.dropout draws it on a CPU (a
    ``bernoulli_(1 - p)`` fill of a tensor of the student's own shape, divided by 1 - p): on a
    CPU the same masks as the student trained alone, whose generator is the global one seeded
    alike.  (On a GPU F.dropout uses a fused kernel that draws differently: each student still
    gets its own seed's masks, shared by its SIDDO/KD/RCD, not its unpacked run's.)"""
    if not layer.training or layer.p == 0:
        return h, layout
    h = _to_stacked(h, layout, k)
    if layer.p == 1:
        return h * 0.0, STACKED
    masks = torch.stack([torch.empty(h.shape[1:], dtype=h.dtype, device=h.device).bernoulli_(1 - layer.p, generator=g)
                         for g in rngs])
    return h * masks.div_(1 - layer.p), STACKED


def _conv_ok(m: nn.Conv2d) -> bool:
    return m.padding_mode == "zeros"


def _flatten_ok(m: nn.Flatten) -> bool:
    return m.start_dim == 1 and m.end_dim == -1


def _batch_norm_ok(m: nn.modules.batchnorm._BatchNorm) -> bool:
    return type(m) in (nn.BatchNorm1d, nn.BatchNorm2d)


# layer type -> (how K students run it, when it applies)
LAYERS: dict[type, tuple[Callable, Callable[[nn.Module], bool]]] = {
    nn.Conv2d: (_conv2d, _conv_ok),
    nn.Linear: (_linear, lambda m: True),
    nn.Flatten: (_flatten, _flatten_ok),
    nn.AdaptiveAvgPool2d: (_per_channel, lambda m: True),
    nn.AvgPool2d: (_per_channel, lambda m: True),
    nn.MaxPool2d: (_per_channel, lambda m: not m.return_indices),
    nn.BatchNorm1d: (_batch_norm, _batch_norm_ok),
    nn.BatchNorm2d: (_batch_norm, _batch_norm_ok),
    nn.ReLU: (_elementwise, lambda m: not m.inplace),
    nn.GELU: (_elementwise, lambda m: True),
    nn.SiLU: (_elementwise, lambda m: not m.inplace),
    nn.Tanh: (_elementwise, lambda m: True),
    nn.Identity: (_elementwise, lambda m: True),
    nn.Dropout: (_dropout, lambda m: not m.inplace),
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
    if entry is None or not entry[1](model):
        return None
    return [(prefix, model)]


def grouped_forward(model: nn.Module) -> Optional[Callable]:
    """(stacked params, stacked buffers, x [K, B, ...], per-student dropout generators) ->
    [K, B, ...] for K students of ``model``'s architecture, or None if ``model`` is not a plain
    Sequential of the layers above."""
    layers = _layers(model)
    if not layers:
        return None

    def names(layer, prefix, of):
        return [(n, prefix + n) for n, _ in of(layer)]

    steps = [(LAYERS[type(layer)][0], layer,
              names(layer, prefix, lambda m: m.named_parameters(recurse=False)),
              names(layer, prefix, lambda m: m.named_buffers(recurse=False))) for prefix, layer in layers]
    if {full for *_, ps, _ in steps for _, full in ps} != {n for n, _ in model.named_parameters()}:
        return None    # tied weights: stacked once under another layer's name

    def forward(params: dict, buffers: dict, x: torch.Tensor, rngs: Sequence[torch.Generator] = ()) -> torch.Tensor:
        k, h, layout = x.shape[0], x, STACKED
        for run, layer, ps, bs in steps:
            own = {n: params[full] for n, full in ps} | {n: buffers[full] for n, full in bs}
            h, layout = run(layer, own, h, layout, k, rngs)
        return _to_stacked(h, layout, k)

    return forward
