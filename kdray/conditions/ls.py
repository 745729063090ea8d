"""LS (label smoothing): cross-entropy with smoothing epsilon, no teacher.

Shown beside RCD: at T = 1 the two losses differ by a constant (docs/protocol.md).
"""
from kdray.conditions import CONTROL, Condition, Param, register

EPSILON = Param("epsilon", "epsilons", 0.0, [0.1, 0.5, 0.9], float, 0.0, 1.0, legacy="alpha", symbol="ε", short="e")


def _objective(params: dict):
    from kdray.losses import cross_entropy
    eps = params["epsilon"]
    return lambda b: cross_entropy(b.logits, b.y, label_smoothing=eps)


LS = register(Condition(
    name="ls", title="LS", params=(EPSILON,), objective=_objective, rowwise=True, role=CONTROL, sweep_key="ls", order=4,
    description="label smoothing at epsilon"))
