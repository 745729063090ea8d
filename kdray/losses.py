"""The tensor side of the conditions: the batch a loss sees and the loss terms they share.

Every objective is ``loss(batch) -> scalar`` over a ``Batch`` holding the
student's logits, the labels and, for conditions that ask for them, the frozen
teacher's logits or block features.  Logits may be ``[B, K]`` or ``[B, T, K]``
(language models); they are flattened to one row per predicted position.
The formulas are in docs/protocol.md ("Conditions").
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.nn.functional as F


@dataclass
class Batch:
    logits: torch.Tensor
    y: torch.Tensor
    teacher_logits: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None          # the student's block output
    teacher_features: Optional[torch.Tensor] = None  # the teacher's block output
    seed: int = 0                                    # the trial's noise seed (from its data seed)
    step: int = 0                                    # the optimiser step this batch is for
    sampled: bool = False                            # the student's own samples: y holds them, no labels


def flat(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1])


_STUDENTS: ContextVar[Optional[int]] = ContextVar("kdray_students", default=None)


@contextmanager
def per_student(k: int) -> Iterator[None]:
    """Inside, the helpers below reduce to one mean per student (a ``[k]`` tensor) over rows
    stacked student-major: a pack of K students of one ``rowwise`` condition gets its K losses
    from one call instead of K (kdray/packing.py).  Outside, they reduce as they always have."""
    token = _STUDENTS.set(k)
    try:
        yield
    finally:
        _STUDENTS.reset(token)


def row_mean(rows: torch.Tensor) -> torch.Tensor:
    """The mean over rows, or each student's mean inside ``per_student``."""
    k = _STUDENTS.get()
    return rows.mean() if k is None else rows.reshape(k, -1).mean(1)


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    if _STUDENTS.get() is None:
        return F.cross_entropy(flat(logits).float(), y.reshape(-1), label_smoothing=label_smoothing)
    return row_mean(F.cross_entropy(flat(logits).float(), y.reshape(-1), label_smoothing=label_smoothing,
                                    reduction="none"))


def distillation_term(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean_i KL(target_i || softmax(z_i / T)); ``target`` is a probability tensor."""
    log_q = F.log_softmax(flat(logits).float() / temperature, dim=-1)
    target = flat(target).float()
    kl = torch.sum(torch.xlogy(target, target) - target * log_q, dim=-1)
    return temperature ** 2 * row_mean(kl)


def mix(alpha: float, ce: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """(1 - alpha) * ce + alpha * other, exact at the ends (alpha 0 or 1 skip the other term)."""
    if alpha == 0.0:
        return ce
    if alpha == 1.0:
        return other
    return (1.0 - alpha) * ce + alpha * other


def distil_towards(target_of, alpha: float, temperature: float):
    """KD's form with any target: (1-alpha) CE + alpha T^2 KL(target || softmax(z/T)).
    ``target_of(batch)`` gives the probability target (the teacher's, uniform, virtual...)."""
    def loss(b: Batch) -> torch.Tensor:
        return mix(alpha, cross_entropy(b.logits, b.y), distillation_term(b.logits, target_of(b), temperature))
    return loss


def feature_match(alpha: float, target_of):
    """(1-alpha) CE + alpha MSE(student block output, ``target_of(batch)``)."""
    def loss(b: Batch) -> torch.Tensor:
        return mix(alpha, cross_entropy(b.logits, b.y), F.mse_loss(b.features.float(), target_of(b).float()))
    return loss


def uniform_noise(shape: torch.Size, seed: int, step: int, device=None) -> torch.Tensor:
    """A fixed-seed i.i.d. U(0, 1) tensor: a function of (seed, step) alone, identical across reruns."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2 ** 63))
    return torch.rand(shape, generator=g).to(device)
