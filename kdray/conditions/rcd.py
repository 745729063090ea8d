"""RCD (random control distillation): KD's objective with a class-uniform target (1/K).

It keeps the form of KD (the same alpha, T and loss surface) and removes the
teacher's information; KD's controls name it (kdray/conditions/kd.py).
"""
from kdray.conditions import CONTROL, Alpha, Condition, Temperature, register


def _objective(params: dict):
    import torch

    from kdray.losses import distil_towards, flat

    def uniform(b):
        return torch.full_like(flat(b.logits), 1.0 / b.logits.shape[-1], dtype=torch.float32)
    return distil_towards(uniform, params["alpha"], params["temperature"])


RCD = register(Condition(
    name="rcd", title="RCD", params=(Alpha(), Temperature()), objective=_objective, rowwise=True, role=CONTROL,
    random_control=True, sweep_key="rcd", enabled_by_default=True, order=3,
    description="KD's objective towards the uniform distribution"))
