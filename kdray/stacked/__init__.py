"""Stacked forwards: K students of one architecture in one forward pass, without vmap.

A packed trial (kdray/packing.py) keeps K students' parameters and buffers
stacked (``torch.func.stack_module_state``: each tensor ``[K, ...]``) and needs
``forward(params, buffers, x [K, B, ...], rngs) -> [K, B, ...]`` (``rngs``: each
student's dropout generator).  ``vmap`` over
``functional_call`` does that for any model, but on small models its
per-operation cost and its batching of small convolutions and attention are
slow.  This registry holds faster forwards written for a family of models,
each from grouped or batched operations on the stacked tensors:

* ``nn.Sequential`` of plain layers (``sequential.py``): convolutions with
  ``groups=K``, linear layers as one batched matmul, BatchNorm and dropout per
  student (which vmap cannot do);
* kdray's GPT (``gpt.py``): batched matmuls, attention over all K x B sequences
  at once.

``stacked_forward(model)`` returns the forward for ``model``'s family, or None
when none applies (packing then uses vmap).  Results agree with each student
run alone within float32 rounding (tests/test_stacked.py).  A plug-in model
family can register its own with ``register(ModelClass, builder)``; a builder
takes the model and returns a forward or None.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

from torch import nn

StackedForward = Callable[..., object]   # (stacked params, stacked buffers, x [K, B, ...], rngs) -> [K, B, ...]
Builder = Callable[[nn.Module], Optional[StackedForward]]

_BUILDERS: dict[type, Builder] = {}


def register(model_class: type, builder: Builder) -> None:
    """Use ``builder`` for packs of ``model_class`` (exactly that class)."""
    _BUILDERS[model_class] = builder


def stacked_forward(model: nn.Module) -> Optional[StackedForward]:
    """The registered forward for ``model``'s class (exact class: a subclass may change forward)."""
    _load_builtins()
    builder = _BUILDERS.get(type(model))
    return builder(model) if builder is not None else None


_builtins_lock = threading.Lock()
_builtins: list[bool] = []


def _load_builtins() -> None:
    """The built-in forwards, registered on first use (kdray's GPT module imports torch); a user's
    registration for the same class, made before or after, wins."""
    with _builtins_lock:
        if _builtins:
            return
        from kdray.models.gpt import GPT
        from kdray.stacked import gpt, sequential

        _BUILDERS.setdefault(nn.Sequential, sequential.grouped_forward)
        _BUILDERS.setdefault(GPT, gpt.stacked_gpt_forward)
        _builtins.append(True)
