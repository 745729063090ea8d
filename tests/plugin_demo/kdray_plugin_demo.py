"""A user's own plug-ins, as the tests import them (tests/test_plugins.py): a distillation method that
matches logits by MSE, registered as a kdray condition, and a model builder named by import path."""
from kdray.conditions import TREATMENT, Alpha, Condition, ControlRule, register

NOT_A_BUILDER = 42


def _objective(params: dict):
    import torch.nn.functional as F

    from kdray.losses import cross_entropy, flat, mix
    alpha = params["alpha"]

    def loss(b):
        logits, target = flat(b.logits).float(), flat(b.teacher_logits).float()
        return mix(alpha, cross_entropy(b.logits, b.y), F.mse_loss(logits, target))
    return loss


register(Condition(
    name="logit_mse", title="LogitMSE", params=(Alpha(legacy=None),), objective=_objective, teacher="logits",
    role=TREATMENT, sweep_key="logit_mse", order=50,
    controls=(ControlRule("siddo", ("width",)), ControlRule("rcd", ("alpha", "width"))),
    best_pool=(ControlRule("siddo", ("width",)), ControlRule("rcd", ("width",))),
    description="(1-alpha) CE + alpha MSE(student logits, teacher logits)"))


def tiny_net(num_classes: int, input_shape: tuple, hidden: int = 16):
    import math

    from torch import nn
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def wrong_signature(x, y):
    return x


def wrong_classes(num_classes: int, input_shape: tuple):
    """A model whose head has one class too many for its data set."""
    import math

    from torch import nn
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + 1))


def _scaled_objective(params: dict):
    """LogitMSE divided by (1 - alpha): a method with a bug that makes alpha = 1 diverge at once."""
    import torch

    inner = _objective(params)
    return lambda b: inner(b) / torch.tensor(1.0 - params["alpha"])


register(Condition(
    name="scaled_mse", title="ScaledMSE", params=(Alpha(legacy=None),), objective=_scaled_objective,
    teacher="logits", role=TREATMENT, sweep_key="scaled_mse", order=51,
    controls=(ControlRule("siddo", ("width",)),), best_pool=(ControlRule("siddo", ("width",)),),
    description="LogitMSE / (1 - alpha): diverges at alpha 1 (tests/test_packed_sweep.py)"))
