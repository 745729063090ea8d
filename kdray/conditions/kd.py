"""KD (Hinton et al.): (1-alpha) CE + alpha T^2 KL(softmax(z_t/T) || softmax(z_s/T)).

The treatment the paper studies; tested against SIDDO and against RCD at the
same alpha and temperature (RCD at T=1 where the sweep has none at T).
"""
from kdray.conditions import TREATMENT, Alpha, Condition, ControlRule, Temperature, register

SIDDO_SAME_WIDTH = ControlRule("siddo", ("width",))


def _objective(params: dict):
    import torch.nn.functional as F

    from kdray.losses import distil_towards, flat
    t = params["temperature"]
    return distil_towards(lambda b: F.softmax(flat(b.teacher_logits).float() / t, dim=-1), params["alpha"], t)


KD = register(Condition(
    name="kd", title="KD", params=(Alpha(), Temperature()), objective=_objective, rowwise=True, teacher="logits",
    role=TREATMENT, sweep_key="kd", enabled_by_default=True, order=2,
    controls=(SIDDO_SAME_WIDTH, ControlRule("rcd", ("alpha", "temperature", "width"), (("temperature", 1.0),))),
    best_pool=(SIDDO_SAME_WIDTH, ControlRule("rcd", ("temperature", "width"), (("temperature", 1.0),))),
    description="distil the frozen teacher's softened outputs"))
