"""Training objectives of docs/protocol.md §3, as a registry.

Every objective is ``loss(batch) -> scalar`` over a ``Batch`` holding the
student's logits, the labels and, for teacher-based objectives, the frozen
teacher's logits or block features.  Logits may be ``[B, K]`` or ``[B, T, K]``
(language models); they are flattened to one row per predicted position.

    L = (1 - alpha) * CE(y, softmax(z_s)) + alpha * T^2 * KL(target || softmax(z_s / T))

KD: target = softmax(z_t / T).  RCD: target uniform (1/K).  SIDDO: plain CE.
LS: CE with label smoothing epsilon.  FM: (1 - alpha) CE + alpha MSE on a
block's features (teacher's, or a fixed-seed U(0, 1) tensor for its control).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from kdray.registry import Registry


@dataclass
class Batch:
    logits: torch.Tensor
    y: torch.Tensor
    teacher_logits: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None          # student block output (FM)
    teacher_features: Optional[torch.Tensor] = None  # teacher block output (FM)


@dataclass(frozen=True)
class Objective:
    name: str
    needs_teacher_logits: bool
    needs_features: bool
    fn: Callable[[Batch], torch.Tensor]

    def __call__(self, batch: Batch) -> torch.Tensor:
        return self.fn(batch)


OBJECTIVES: Registry[Callable[..., Objective]] = Registry("method")
register_objective = OBJECTIVES.register


def build_objective(method: str, alpha: float = 0.0, temperature: float = 1.0, **kw) -> Objective:
    return OBJECTIVES.get(method)(alpha=alpha, temperature=temperature, **kw)


def _flat(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1])


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(_flat(logits).float(), y.reshape(-1), label_smoothing=label_smoothing)


def distillation_term(logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean_i KL(target_i || softmax(z_i / T)); ``target`` is a probability tensor."""
    log_q = F.log_softmax(_flat(logits).float() / temperature, dim=-1)
    target = _flat(target).float()
    kl = torch.sum(torch.xlogy(target, target) - target * log_q, dim=-1)
    return temperature ** 2 * kl.mean()


def _mix(alpha: float, ce: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    if alpha == 0.0:
        return ce
    if alpha == 1.0:
        return other
    return (1.0 - alpha) * ce + alpha * other


@register_objective("teacher")
@register_objective("siddo")
def siddo(alpha: float = 0.0, temperature: float = 1.0, **_) -> Objective:
    """Plain cross-entropy: the teacher's objective and the SIDDO control's."""
    return Objective("siddo", False, False, lambda b: cross_entropy(b.logits, b.y))


@register_objective("kd")
def kd(alpha: float, temperature: float = 1.0, **_) -> Objective:
    def fn(b: Batch) -> torch.Tensor:
        target = F.softmax(_flat(b.teacher_logits).float() / temperature, dim=-1)
        return _mix(alpha, cross_entropy(b.logits, b.y), distillation_term(b.logits, target, temperature))

    return Objective("kd", True, False, fn)


@register_objective("rcd")
def rcd(alpha: float, temperature: float = 1.0, **_) -> Objective:
    """KD's form with the teacher replaced by the class-uniform distribution."""
    def fn(b: Batch) -> torch.Tensor:
        k = b.logits.shape[-1]
        target = torch.full_like(_flat(b.logits), 1.0 / k, dtype=torch.float32)
        return _mix(alpha, cross_entropy(b.logits, b.y), distillation_term(b.logits, target, temperature))

    return Objective("rcd", False, False, fn)


@register_objective("ls")
def ls(alpha: float, temperature: float = 1.0, **_) -> Objective:
    """Label smoothing with epsilon = alpha (no teacher)."""
    return Objective("ls", False, False, lambda b: cross_entropy(b.logits, b.y, label_smoothing=alpha))


@register_objective("fm")
def fm(alpha: float, temperature: float = 1.0, **_) -> Objective:
    """FitNets-style feature matching on one block: (1-alpha) CE + alpha MSE."""
    def fn(b: Batch) -> torch.Tensor:
        return _mix(alpha, cross_entropy(b.logits, b.y), F.mse_loss(b.features.float(), b.teacher_features.float()))

    return Objective("fm", False, True, fn)


@register_objective("fm_rcd")
def fm_rcd(alpha: float, temperature: float = 1.0, **_) -> Objective:
    """FM's random control: the teacher features are replaced by fixed-seed U(0, 1) noise.

    The recipe supplies ``teacher_features`` from ``fm_noise`` so the noise is a
    function of the trial spec and the batch position, identical across reruns.
    """
    obj = fm(alpha)
    return Objective("fm_rcd", False, True, obj.fn)


def fm_noise(shape: torch.Size, seed: int, step: int, device=None) -> torch.Tensor:
    """The fixed-seed i.i.d. U(0, 1) stand-in for teacher features at one step."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % (2 ** 63))
    return torch.rand(shape, generator=g).to(device)
