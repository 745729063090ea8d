"""Tf-KD's virtual teacher (Yuan et al., CVPR 2020), as a control for KD.

The student distils a hand-made "teacher" that knows only the label: the
correct class gets probability ``confidence`` (default 0.9), the other K-1
classes share the rest equally.  The loss has KD's form,
(1-alpha) CE + alpha T^2 KL(virtual || softmax(z_s/T)), so a KD student that is
more similar to its teacher than this control gained something a label-aware
smoothing target cannot give: the teacher's per-example function.  The target
is used as it is (not softened by T).

KD is tested against it at the same alpha and temperature (T=1 where the sweep
has none at KD's T), and it is a candidate for KD's best control.
"""
from kdray.conditions import CONTROL, Alpha, Condition, ControlRule, Param, Temperature, register

CONFIDENCE = Param("confidence", "confidences", 0.9, [0.9], float, 0.0, 1.0, low_open=True, symbol="c",
                   short="c", always=False)
SAME_ALPHA = ControlRule("tfkd", ("alpha", "temperature", "width"), (("temperature", 1.0),))
SAME_T = ControlRule("tfkd", ("temperature", "width"), (("temperature", 1.0),))


def _objective(params: dict):
    import torch

    from kdray.losses import distil_towards, flat
    a = params["confidence"]

    def virtual_teacher(b):
        logits, y = flat(b.logits), b.y.reshape(-1)
        k = logits.shape[-1]
        target = torch.full_like(logits, (1.0 - a) / (k - 1), dtype=torch.float32)
        return target.scatter_(1, y[:, None], a)
    return distil_towards(virtual_teacher, params["alpha"], params["temperature"])


TFKD = register(Condition(
    name="tfkd", title="Tf-KD", params=(Alpha(), Temperature(), CONFIDENCE), objective=_objective, rowwise=True,
    role=CONTROL, sweep_key="tfkd", order=7,
    control_of={"kd": (SAME_ALPHA,)}, best_pool_of={"kd": (SAME_T,)},
    description="KD's objective towards a label-only virtual teacher (Tf-KD)"))
