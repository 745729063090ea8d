"""Generalized JSD (GKD, Agarwal et al. 2024): (1-alpha) CE + alpha T^2 JSD_beta(p_t || q_s).

JSD_beta(P || Q) = beta KL(P || M) + (1-beta) KL(Q || M) with M = beta P + (1-beta) Q,
P = softmax(z_t/T) the frozen teacher's and Q = softmax(z_s/T) the student's
distribution, per predicted token, mean over tokens (rowwise).  beta in (0, 1):
the divergence interpolates between forward-KL-like (beta -> 0, divided by beta)
and reverse-KL-like (beta -> 1) behaviour, and is bounded (by the binary entropy
of beta), so a confident teacher never gives an unbounded loss.
At the ends it is 0; use ``kd`` and ``reverse_kl`` for those.  This condition
trains on the corpus's windows, as KD does; ``gkd`` (kdray/conditions/gkd.py) is
the same step with GKD's on-policy lambda (the student's own samples).

Tested against SIDDO (same width) and RCD at the same alpha and temperature
(T=1 where the sweep has none at T), as KD is.
"""
import math

from kdray.conditions import TREATMENT, Alpha, Condition, ControlRule, Param, Temperature, register

SIDDO_SAME_WIDTH = ControlRule("siddo", ("width",))
RCD_SAME = ControlRule("rcd", ("alpha", "temperature", "width"), (("temperature", 1.0),))
RCD_SAME_T = ControlRule("rcd", ("temperature", "width"), (("temperature", 1.0),))


class OpenUnit(Param):
    """A parameter in the open interval (0, 1)."""

    def check(self, value):
        value = super().check(value)
        if value >= 1.0:
            raise ValueError(f"{self.name} must be in (0, 1), got {value!r}")
        return value


BETA = OpenUnit("beta", "betas", 0.5, [0.5], float, 0.0, 1.0, low_open=True, symbol="β", short="beta")


def jsd_rows(logits, teacher_logits, temperature: float, beta: float):
    """JSD_beta(softmax(z_t/T) || softmax(z_s/T)) per row (float32), through log-probabilities."""
    import torch
    import torch.nn.functional as F

    from kdray.losses import flat
    log_q = F.log_softmax(flat(logits).float() / temperature, dim=-1)
    log_p = F.log_softmax(flat(teacher_logits).float() / temperature, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_p + math.log(beta), log_q + math.log(1.0 - beta)]), dim=0)
    kl_p = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_q = (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * kl_p + (1.0 - beta) * kl_q


def _objective(params: dict):
    from kdray.losses import cross_entropy, mix, row_mean
    a, t, beta = params["alpha"], params["temperature"], params["beta"]

    def loss(b):
        return mix(a, cross_entropy(b.logits, b.y), t ** 2 * row_mean(jsd_rows(b.logits, b.teacher_logits, t, beta)))
    return loss


GJSD = register(Condition(
    name="gjsd", title="GKD JSD", params=(Alpha(), Temperature(), BETA),
    objective=_objective, rowwise=True, teacher="logits", role=TREATMENT, sweep_key="gjsd", order=9,
    controls=(SIDDO_SAME_WIDTH, RCD_SAME), best_pool=(SIDDO_SAME_WIDTH, RCD_SAME_T),
    description="distil the teacher through the generalized Jensen-Shannon divergence (GKD)"))
