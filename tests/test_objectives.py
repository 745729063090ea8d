"""The conditions' objectives (docs/protocol.md §3) against hand-computed values."""
import math

import pytest
import torch

from kdray.conditions import build_objective, teacher_objective
from kdray.losses import Batch
from kdray.losses import uniform_noise as fm_noise


def softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def hand_ce(z, y):
    return -math.log(softmax(z)[y])


def hand_kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


Z_S = [[1.0, -0.5, 2.0], [0.3, 0.2, -1.0]]
Z_T = [[2.0, 0.0, 1.0], [-1.0, 1.5, 0.5]]
Y = [2, 1]


def batch():
    return Batch(torch.tensor(Z_S), torch.tensor(Y), teacher_logits=torch.tensor(Z_T))


@pytest.mark.parametrize("alpha,T", [(0.1, 1.0), (0.5, 2.0), (0.9, 4.0), (1.0, 1.0)])
def test_kd_matches_hand_formula(alpha, T):
    want = 0.0
    for zs, zt, y in zip(Z_S, Z_T, Y):
        p = softmax([v / T for v in zt])
        q = softmax([v / T for v in zs])
        want += (1 - alpha) * hand_ce(zs, y) + alpha * T * T * hand_kl(p, q)
    got = build_objective("kd", {"alpha": alpha, "temperature": T})(batch())
    assert float(got) == pytest.approx(want / 2, rel=1e-5)  # float32


@pytest.mark.parametrize("alpha,T", [(0.1, 1.0), (0.9, 2.0)])
def test_rcd_uses_uniform_target(alpha, T):
    want = 0.0
    for zs, y in zip(Z_S, Y):
        u = [1 / 3] * 3
        want += (1 - alpha) * hand_ce(zs, y) + alpha * T * T * hand_kl(u, softmax([v / T for v in zs]))
    assert float(build_objective("rcd", {"alpha": alpha, "temperature": T})(batch())) == pytest.approx(want / 2, rel=1e-6)


def test_siddo_and_teacher_are_plain_cross_entropy():
    want = sum(hand_ce(z, y) for z, y in zip(Z_S, Y)) / 2
    assert float(build_objective("siddo")(batch())) == pytest.approx(want, rel=1e-6)
    assert float(teacher_objective()(batch())) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.5, 0.9])
def test_ls_matches_hand_formula(eps):
    want = 0.0
    for z, y in zip(Z_S, Y):
        logq = [math.log(q) for q in softmax(z)]
        target = [eps / 3 + (1 - eps) * (k == y) for k in range(3)]
        want -= sum(t * lq for t, lq in zip(target, logq))
    assert float(build_objective("ls", {"epsilon": eps})(batch())) == pytest.approx(want / 2, rel=1e-6)


@pytest.mark.parametrize("eps", [0.1, 0.5, 0.9])
def test_rcd_and_ls_differ_by_a_constant(eps):
    """At T = 1, RCD(alpha) - LS(alpha) = alpha * (-log K): the same gradients (paper App. B)."""
    g = torch.Generator().manual_seed(0)
    diffs = []
    for _ in range(5):
        z = torch.randn(16, 10, generator=g)
        y = torch.randint(10, (16,), generator=g)
        b = Batch(z, y)
        diffs.append(float(build_objective("rcd", {"alpha": eps, "temperature": 1.0})(b)) - float(build_objective("ls", {"epsilon": eps})(b)))
    for d in diffs:
        assert d == pytest.approx(-eps * math.log(10), abs=1e-5)
    z = torch.randn(8, 10, generator=g, requires_grad=True)
    y = torch.randint(10, (8,), generator=g)
    g1, = torch.autograd.grad(build_objective("rcd", {"alpha": eps, "temperature": 1.0})(Batch(z, y)), z)
    g2, = torch.autograd.grad(build_objective("ls", {"epsilon": eps})(Batch(z, y)), z)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)


def test_kd_with_teacher_equal_to_student_at_alpha_one_is_zero():
    z = torch.randn(4, 5)
    b = Batch(z, torch.zeros(4, dtype=torch.long), teacher_logits=z.clone())
    assert float(build_objective("kd", {"alpha": 1.0, "temperature": 2.0})(b)) == pytest.approx(0.0, abs=1e-6)


def test_sequence_logits_are_flattened_per_position():
    z = torch.randn(2, 3, 4)
    zt = torch.randn(2, 3, 4)
    y = torch.randint(4, (2, 3))
    flat = build_objective("kd", {"alpha": 0.5, "temperature": 1.0})(Batch(z.reshape(6, 4), y.reshape(6), teacher_logits=zt.reshape(6, 4)))
    seq = build_objective("kd", {"alpha": 0.5, "temperature": 1.0})(Batch(z, y, teacher_logits=zt))
    assert float(seq) == pytest.approx(float(flat), rel=1e-6)


def test_feature_matching_and_noise_control():
    z = torch.tensor(Z_S)
    f = torch.ones(2, 3, 4)
    tf = torch.zeros(2, 3, 4)
    ce = sum(hand_ce(zz, y) for zz, y in zip(Z_S, Y)) / 2
    got = build_objective("fm", {"alpha": 0.5, "block": 1})(Batch(z, torch.tensor(Y), features=f, teacher_features=tf))
    assert float(got) == pytest.approx(0.5 * ce + 0.5 * 1.0, rel=1e-6)
    a, b = fm_noise(torch.Size([3, 4]), seed=7, step=2), fm_noise(torch.Size([3, 4]), seed=7, step=2)
    assert torch.equal(a, b) and 0 <= float(a.min()) and float(a.max()) < 1
    assert not torch.equal(a, fm_noise(torch.Size([3, 4]), seed=7, step=3))


def test_unknown_method_lists_valid_names():
    with pytest.raises(KeyError, match="valid: .*kd"):
        build_objective("nope", {"alpha": 0.5})


def _rowwise():
    from kdray.conditions import all_conditions
    return [c for c in all_conditions() if c.rowwise]


@pytest.mark.parametrize("cond", _rowwise(), ids=lambda c: c.name)
def test_a_rowwise_objective_gives_each_student_its_own_loss_in_one_call(cond):
    """Packs compute a rowwise condition's losses for all students at once (kdray/packing.py):
    the declaration must hold, for classifier and language-model shaped logits."""
    from kdray.losses import per_student
    params = {p.name: p.grid_default[len(p.grid_default) // 2] for p in cond.params if p.grid_default}
    f = cond.objective(cond.full_params(params))
    g = torch.Generator().manual_seed(3)
    for shape in ((4, 6, 7), (4, 6, 5, 7)):
        logits, teacher = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
        y = torch.randint(0, 7, shape[:-1], generator=g)
        with per_student(4):
            together = f(Batch(logits, y, teacher))
        alone = torch.stack([f(Batch(logits[i], y[i], teacher[i])) for i in range(4)])
        assert together.shape == (4,)
        torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-7)
        assert len(set(alone.tolist())) == 4      # four different students, four different losses


def test_builtin_conditions_that_read_seeds_or_features_are_not_rowwise():
    from kdray.conditions import get
    assert not get("fm").rowwise and not get("fm_rcd").rowwise
    assert get("siddo").rowwise and get("kd").rowwise
