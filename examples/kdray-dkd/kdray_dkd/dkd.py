"""Decoupled KD (Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022) as a kdray condition.

DKD splits KD's KL term in two: TCKD, the KL between the binary (target, rest)
distributions of teacher and student, and NCKD, the KL between their
distributions over the non-target classes; ``beta`` weights NCKD.  In kdray's
form the student minimises (1 - alpha) CE + alpha T^2 (TCKD + beta NCKD), so it
is audited exactly like KD: against SIDDO and against RCD at the same alpha
(and T; RCD at T=1 where the study has no other).
"""
from kdray.conditions import TREATMENT, Alpha, Condition, ControlRule, Param, Temperature, register

BETA = Param("beta", "betas", 8.0, [8.0], float, 0.0, None, symbol="β", short="b", always=False)
SIDDO = ControlRule("siddo", ("width",))


def dkd_loss(student_logits, teacher_logits, y, beta: float, t: float):
    """T^2 (TCKD + beta NCKD), averaged over the batch."""
    import torch
    import torch.nn.functional as F

    gt = F.one_hot(y, student_logits.shape[-1]).bool()
    ps, pt = F.softmax(student_logits / t, -1), F.softmax(teacher_logits / t, -1)
    eps = 1e-8

    def binary(p):
        target = (p * gt).sum(-1, keepdim=True)
        return torch.cat([target, 1 - target], -1).clamp_min(eps)
    bs, bt = binary(ps), binary(pt)
    tckd = (bt * (bt.log() - bs.log())).sum(-1)
    # Non-target distributions: the target logit masked out before the softmax.
    big = 1000.0
    log_qs = F.log_softmax(student_logits / t - big * gt, -1)
    qt = F.softmax(teacher_logits / t - big * gt, -1)
    nckd = (qt * (qt.clamp_min(eps).log() - log_qs)).masked_fill(gt, 0).sum(-1)
    return (t * t) * (tckd + beta * nckd).mean()


def _objective(params: dict):
    from kdray.losses import cross_entropy, flat, mix
    alpha, beta, t = params["alpha"], params["beta"], params["temperature"]

    def loss(b):
        s, te, y = flat(b.logits).float(), flat(b.teacher_logits).float(), b.y.reshape(-1)
        return mix(alpha, cross_entropy(b.logits, b.y), dkd_loss(s, te, y, beta, t))
    return loss


DKD = register(Condition(
    name="dkd", title="DKD", params=(Alpha(legacy=None), Temperature(legacy=None), BETA), objective=_objective,
    teacher="logits", role=TREATMENT, sweep_key="dkd", order=60,
    controls=(SIDDO, ControlRule("rcd", ("alpha", "temperature", "width"), (("temperature", 1.0),))),
    best_pool=(SIDDO, ControlRule("rcd", ("temperature", "width"), (("temperature", 1.0),))),
    description="decoupled KD: (1-alpha) CE + alpha T^2 (TCKD + beta NCKD)"))
