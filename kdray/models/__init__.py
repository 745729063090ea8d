"""Model registry.  One architecture per module; each registers a builder.

Contract for a builder registered with ``@register_model(name)``::

    builder(num_classes: int, input_shape: tuple[int, ...], **args) -> nn.Module

``input_shape`` is one sample's shape without the batch dimension (``(C, H, W)``
for images, ``(n_mels, frames)`` or ``(1, n_mels, frames)`` for spectrograms,
``(block_size,)`` for token sequences).  ``forward(x)`` returns logits
``[B, K]`` for classification or ``[B, T, K]`` for language models.

Models that support feature-map KD expose ``model.blocks`` (an
``nn.ModuleList``); kdray reads block ``b`` (1-indexed, as the paper counts)
with a forward hook, see ``block_output``.  Models whose width can be scaled
accept the arguments their module documents (e.g. ``n_embd`` for GPTs,
``width`` as a multiplier for CNNs).
"""
from __future__ import annotations

import importlib
import pkgutil
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from kdray.registry import Registry

MODELS: Registry[Callable[..., nn.Module]] = Registry("architecture")
register_model = MODELS.register


def build_model(name: str, num_classes: int, input_shape: tuple[int, ...], **args) -> nn.Module:
    return MODELS.get(name)(num_classes=num_classes, input_shape=tuple(input_shape), **args)


@contextmanager
def block_output(model: nn.Module, block: int) -> Iterator[dict[str, torch.Tensor]]:
    """Capture the output of ``model.blocks[block - 1]`` during forward passes."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or not 1 <= block <= len(blocks):
        n = 0 if blocks is None else len(blocks)
        raise ValueError(f"model {type(model).__name__} has {n} blocks; block {block} is out of range")
    box: dict[str, torch.Tensor] = {}

    def hook(_mod, _inp, out):
        box["out"] = out[0] if isinstance(out, tuple) else out

    handle = blocks[block - 1].register_forward_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


def _import_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


_import_all()
