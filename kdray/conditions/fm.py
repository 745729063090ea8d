"""Feature-map matching KD (FitNets-style) on one block, and its random control.

FM: (1-alpha) CE + alpha MSE(student block-b output, teacher block-b output).
FM-RCD: the same with the teacher's features replaced by fixed-seed U(0, 1)
noise of the same shape.  ``fm: {..., control: true}`` in a sweep file plans
both; blocks are 1-indexed, as the paper counts them.
"""
from pydantic import Field, StrictBool, StrictInt, field_validator

from kdray.conditions import CONTROL, TREATMENT, Alpha, Condition, ControlRule, Param, StrictModel, register
from kdray.conditions.kd import SIDDO_SAME_WIDTH

ALPHA = Alpha()
BLOCK = Param("block", "blocks", None, None, int, 1, None, legacy="block", symbol="b", sep="", short="b")


class FeatureGrid(StrictModel):
    alphas: list[float] = Field(default=[0.1, 0.5, 0.9], min_length=1)
    blocks: list[StrictInt] = Field(min_length=1)
    control: StrictBool = True

    @field_validator("alphas")
    @classmethod
    def _alphas(cls, v):
        return [ALPHA.check(a) for a in v]

    @field_validator("blocks")
    @classmethod
    def _blocks(cls, v):
        return [BLOCK.check(b) for b in v]


def _expand(grid: FeatureGrid) -> list[tuple[str, dict]]:
    out = []
    for a in grid.alphas:
        for b in grid.blocks:
            out.append(("fm", {"alpha": a, "block": b}))
            if grid.control:
                out.append(("fm_rcd", {"alpha": a, "block": b}))
    return out


def _fm(params: dict):
    from kdray.losses import feature_match
    return feature_match(params["alpha"], lambda b: b.teacher_features)


def _fm_rcd(params: dict):
    from kdray.losses import feature_match, uniform_noise
    return feature_match(params["alpha"], lambda b: uniform_noise(b.features.shape, b.seed, b.step, b.features.device))


FM = register(Condition(
    name="fm", title="FM", params=(ALPHA, BLOCK), objective=_fm, teacher="features", features="block",
    role=TREATMENT, sweep_key="fm", order=5, config=FeatureGrid, expand=_expand,
    controls=(SIDDO_SAME_WIDTH, ControlRule("fm_rcd", ("alpha", "block", "width"))),
    best_pool=(SIDDO_SAME_WIDTH, ControlRule("fm_rcd", ("block", "width"))),
    description="match the teacher's block output (MSE)"))

FM_RCD = register(Condition(
    name="fm_rcd", title="FM-RCD", params=(ALPHA, BLOCK), objective=_fm_rcd, features="block",
    role=CONTROL, random_control=True, order=6,
    description="match fixed-seed U(0, 1) noise instead of the teacher's block output"))
