"""SIDDO (same initialisation, different data order): plain cross-entropy, no teacher.

The baseline every treatment is compared against: the same start and batches
as the KD student of its seed, without the teacher's signal.
"""
from kdray.conditions import CONTROL, Condition, register


def _objective(params: dict):
    from kdray.losses import cross_entropy
    return lambda b: cross_entropy(b.logits, b.y)


SIDDO = register(Condition(
    name="siddo", title="SIDDO", objective=_objective, rowwise=True, role=CONTROL, sweep_key="siddo",
    enabled_by_default=True, order=1, config=bool,
    expand=lambda enabled: [("siddo", {})] if enabled else [],
    description="cross-entropy only; same initialisation and data order as the KD student"))
