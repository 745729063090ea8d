"""Reverse KL and generalized JSD (kdray/conditions/reverse_kl.py, gjsd.py): checked against the
formulas written out here in float64 NumPy, validated in sweep files, and trained through
``run_trial`` on the char-level Nano-GPT (no kdray[lm] needed)."""
import numpy as np
import pytest
import torch

from kdray.conditions import build_objective, controls_of
from kdray.losses import Batch
from kdray.sweep import SweepError, parse_sweep


def softmax(z, t):
    e = np.exp(z / t - (z / t).max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def hand_ce(z, y):
    p = softmax(z, 1.0)
    return float(np.mean(-np.log(p[np.arange(len(y)), y])))


def hand_kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


def data(shape=(3, 5, 11), seed=0):
    g = np.random.default_rng(seed)
    z, zt = g.normal(size=shape) * 2, g.normal(size=shape) * 2
    y = g.integers(0, shape[-1], size=shape[:-1])
    return z, zt, y


@pytest.mark.parametrize("alpha, t", [(0.5, 1.0), (0.9, 2.0), (1.0, 0.5)])
def test_reverse_kl_is_ce_mixed_with_kl_of_student_to_teacher(alpha, t):
    z, zt, y = data()
    zf, ztf, yf = z.reshape(-1, 11), zt.reshape(-1, 11), y.reshape(-1)
    want = (1 - alpha) * hand_ce(zf, yf) + alpha * t * t * hand_kl(softmax(zf, t), softmax(ztf, t)).mean()
    got = build_objective("reverse_kl", {"alpha": alpha, "temperature": t})(
        Batch(torch.tensor(z, dtype=torch.float32), torch.tensor(y), torch.tensor(zt, dtype=torch.float32)))
    assert float(got) == pytest.approx(want, rel=1e-5)
    fwd = build_objective("kd", {"alpha": alpha, "temperature": t})(
        Batch(torch.tensor(z, dtype=torch.float32), torch.tensor(y), torch.tensor(zt, dtype=torch.float32)))
    assert abs(float(fwd) - float(got)) > 1e-3      # not forward KL under another name


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_generalized_jsd_matches_its_definition(beta):
    z, zt, y = data(seed=1)
    q, p = softmax(z.reshape(-1, 11), 2.0), softmax(zt.reshape(-1, 11), 2.0)
    m = beta * p + (1 - beta) * q
    jsd = beta * hand_kl(p, m) + (1 - beta) * hand_kl(q, m)
    want = 0.3 * hand_ce(z.reshape(-1, 11), y.reshape(-1)) + 0.7 * 4.0 * jsd.mean()
    got = build_objective("gjsd", {"alpha": 0.7, "temperature": 2.0, "beta": beta})(
        Batch(torch.tensor(z, dtype=torch.float32), torch.tensor(y), torch.tensor(zt, dtype=torch.float32)))
    assert float(got) == pytest.approx(want, rel=1e-5)
    # bounded by the binary entropy of beta (reached by distributions with disjoint supports)
    assert jsd.max() <= -beta * np.log(beta) - (1 - beta) * np.log(1 - beta) + 1e-12


def test_the_divergences_vanish_when_the_student_is_the_teacher_and_have_the_right_gradients():
    z, _, y = data(seed=2)
    for method, params in (("reverse_kl", {"alpha": 1.0}), ("gjsd", {"alpha": 1.0, "beta": 0.3})):
        zs = torch.tensor(z, dtype=torch.float32, requires_grad=True)
        loss = build_objective(method, params)(Batch(zs, torch.tensor(y), torch.tensor(z, dtype=torch.float32)))
        loss.backward()
        assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
        assert float(zs.grad.abs().max()) < 1e-6     # a minimum: no pull away from the teacher
    # and the gradient of reverse KL against its closed form: d/dz T^2 KL(q||p) = T q (log q - log p - KL)
    zt = data(seed=3)[1]
    zs = torch.tensor(z, dtype=torch.float32, requires_grad=True)
    build_objective("reverse_kl", {"alpha": 1.0, "temperature": 1.5})(
        Batch(zs, torch.tensor(y), torch.tensor(zt, dtype=torch.float32))).backward()
    q, p = softmax(z, 1.5), softmax(zt, 1.5)
    kl = hand_kl(q, p)[..., None]
    want = 1.5 * q * (np.log(q) - np.log(p) - kl) / (z.shape[0] * z.shape[1])
    np.testing.assert_allclose(zs.grad.numpy(), want, rtol=1e-4, atol=1e-7)


def test_new_objectives_declare_siddo_and_rcd_as_their_controls():
    for method in ("reverse_kl", "gjsd"):
        assert {r.method for r in controls_of(method)} >= {"siddo", "rcd"}


def _lm_sweep(tmp_path, conditions, **over):
    setup = {"name": "c", "dataset": {"name": "tinyshakespeare", "args": {"block_size": 16, "max_chars": 20000}},
             "teacher": {"arch": "nano_gpt", "args": {"n_layer": 2, "n_embd": 32, "n_head": 2, "dropout": 0.0}},
             "recipe": {"iterations": 6, "log_every": 3, "batch_size": 8, "lr": 3e-3},
             "teacher_seeds": [0], "student_seeds": [10], "conditions": conditions, **over}
    return parse_sweep({"name": "lmobj", "storage": str(tmp_path), "setups": [setup]}, "sweep.yaml")


@pytest.mark.parametrize("entry, message", [
    ({"gjsd": {"betas": [1.0]}}, "beta must be in (0, 1)"),
    ({"gjsd": {"betas": [0.0]}}, "beta must be in (0, 1]"),
    ({"reverse_kl": {"alphas": [1.5]}}, "alpha must be in [0, 1]"),
    ({"reverse_kl": {"temperatures": [0]}}, "temperature must be > 0"),
])
def test_bad_parameters_are_one_line_naming_the_field(tmp_path, real_data, entry, message):
    with pytest.raises(SweepError) as e:
        _lm_sweep(tmp_path, {"siddo": True, **entry})
    assert message in str(e.value) and "conditions." in str(e.value) and "\n" not in str(e.value)


def test_reverse_kl_and_gjsd_train_the_char_level_gpt_through_run_trial(tmp_path, real_data):
    from kdray.plan import build_plan
    from kdray.recipe import run_trial
    from kdray.storage import Store

    sw = _lm_sweep(tmp_path, {"siddo": True, "kd": None, "rcd": {"alphas": [0.5]},
                              "reverse_kl": {"alphas": [0.5]}, "gjsd": {"alphas": [0.5], "betas": [0.5]}})
    plan = build_plan(sw)
    assert sorted(s.method for s in plan.students) == ["gjsd", "rcd", "reverse_kl", "siddo"]
    store = Store(sw.storage, sw.name)
    run_trial(plan.teachers[0], store)
    for spec in plan.students:
        out = run_trial(spec, store)
        assert np.isfinite(out["train_loss"]) and np.isfinite(out["js_divergence"])
    labels = {s.label for s in plan.students}
    assert "c-gjsd-a0.5-beta0.5-t0-s10" in labels and "c-reverse_kl-a0.5-t0-s10" in labels


def test_seqkd_is_a_sweep_condition_and_an_audit_method_with_its_checks(tmp_path, real_data):
    """seqkd (kdray/conditions/seqkd.py): accepted under ``conditions:``, by ``kdray audit --method``,
    declared against SIDDO and RCD, never packed; a prompt as long as the block is one line."""
    import argparse

    from kdray import audit, packing
    from kdray.models import build_model
    from kdray.plan import build_plan
    assert {r.method for r in controls_of("seqkd")} == {"siddo", "rcd"}
    plan = build_plan(_lm_sweep(tmp_path, {"siddo": True, "kd": None, "rcd": None, "seqkd": {"prompts": [2, 8]}}))
    students = [s for s in plan.students if s.method == "seqkd"]
    assert sorted(s.params["prompt"] for s in students) == [2, 8] and "c-seqkd-p2-t0-s10" in {s.label for s in students}
    model = build_model(students[0].arch, 65, (16,), **students[0].arch_args)
    assert "generations" in packing.unpackable(students[0], model)
    with pytest.raises(SweepError) as e:
        _lm_sweep(tmp_path, {"siddo": True, "seqkd": {"prompts": [16]}})
    assert "prompt 16 must be shorter than the data set's block_size 16" in str(e.value) and "\n" not in str(e.value)
    p = argparse.ArgumentParser()
    audit.add_arguments(p)
    args = p.parse_args(["--dataset", "tinyshakespeare", "--teacher", "nano_gpt", "--method", "seqkd",
                         "--recipe", "{iterations: 4}"])
    sweep = audit.audit_sweep(args)
    assert sweep["setups"][0]["conditions"]["seqkd"] == {}
