"""Reverse KL (mode-seeking KD, as in MiniLLM and GKD): (1-alpha) CE + alpha T^2 KL(q_s || p_t).

q_s = softmax(z_s/T) is the student's distribution and p_t = softmax(z_t/T) the
frozen teacher's: the student is penalised for mass where the teacher has
little, not for missing some of the teacher's modes, so it may copy fewer of
the teacher's behaviours than forward KL (KD).  Per predicted token, mean over
tokens (rowwise).

Tested against SIDDO (same width) and RCD at the same alpha and temperature
(T=1 where the sweep has none at T), as KD is; RCD keeps forward KL's form
towards the uniform distribution, so that control matches the loss weight and
temperature, not the divergence's direction.
"""
from kdray.conditions import TREATMENT, Alpha, Condition, ControlRule, Temperature, register

SIDDO_SAME_WIDTH = ControlRule("siddo", ("width",))
RCD_SAME = ControlRule("rcd", ("alpha", "temperature", "width"), (("temperature", 1.0),))
RCD_SAME_T = ControlRule("rcd", ("temperature", "width"), (("temperature", 1.0),))


def reverse_kl_rows(logits, teacher_logits, temperature: float):
    """KL(softmax(z_s/T) || softmax(z_t/T)) per row (float32)."""
    import torch.nn.functional as F

    from kdray.losses import flat
    log_q = F.log_softmax(flat(logits).float() / temperature, dim=-1)
    log_p = F.log_softmax(flat(teacher_logits).float() / temperature, dim=-1)
    return (log_q.exp() * (log_q - log_p)).sum(-1)


def _objective(params: dict):
    from kdray.losses import cross_entropy, mix, row_mean
    a, t = params["alpha"], params["temperature"]

    def loss(b):
        return mix(a, cross_entropy(b.logits, b.y), t ** 2 * row_mean(reverse_kl_rows(b.logits, b.teacher_logits, t)))
    return loss


REVERSE_KL = register(Condition(
    name="reverse_kl", title="Reverse KL", params=(Alpha(), Temperature()),
    objective=_objective, rowwise=True, teacher="logits", role=TREATMENT, sweep_key="reverse_kl", order=8,
    controls=(SIDDO_SAME_WIDTH, RCD_SAME), best_pool=(SIDDO_SAME_WIDTH, RCD_SAME_T),
    description="distil the teacher through KL(student || teacher) (mode-seeking)"))
