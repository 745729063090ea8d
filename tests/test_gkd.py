"""On-policy GKD (kdray/conditions/gkd.py, kdray/generation.py's sampler): lambda 0 is gjsd bit for
bit, lambda 1 is a reference loop written out here (its own sampler and JSD), reruns are
identical, and bad parameters are one line.  The char-level Nano-GPT at block 16 (no kdray[lm])."""
import numpy as np
import pytest
import torch

from kdray.conditions import build_objective, controls_of
from kdray.losses import Batch
from kdray.sweep import SweepError, parse_sweep

GRID = {"alphas": [0.5], "betas": [0.5], "prompts": [4]}


def _sweep(tmp_path, conditions, name="gkd", **over):
    setup = {"name": "c", "dataset": {"name": "tinyshakespeare", "args": {"block_size": 16, "max_chars": 20000}},
             "teacher": {"arch": "nano_gpt", "args": {"n_layer": 2, "n_embd": 32, "n_head": 2, "dropout": 0.0}},
             "recipe": {"iterations": 6, "log_every": 3, "batch_size": 8, "lr": 3e-3},
             "teacher_seeds": [0], "student_seeds": [10], "conditions": {"kd": None, **conditions}, **over}
    return parse_sweep({"name": name, "storage": str(tmp_path), "setups": [setup]}, "sweep.yaml")


def _trained(tmp_path, conditions, **over):
    """The plan's teacher trained; (plan, store)."""
    from kdray.plan import build_plan
    from kdray.recipe import run_trial
    from kdray.storage import Store
    sw = _sweep(tmp_path, conditions, **over)
    plan = build_plan(sw)
    store = Store(sw.storage, sw.name)
    run_trial(plan.teachers[0], store)
    return plan, store


@pytest.fixture()
def trained_weights(monkeypatch):
    """``{trial key: [state dict, ...]}`` of every trial run_trial finishes (students keep no model.pt)."""
    from kdray import recipe
    kept, real = {}, recipe.finish_trial

    def keep(spec, store, model, *a, **k):
        kept.setdefault(spec.trial_key, []).append({n: v.detach().clone() for n, v in model.state_dict().items()})
        return real(spec, store, model, *a, **k)
    monkeypatch.setattr(recipe, "finish_trial", keep)
    return kept


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _softmax(z, t):
    e = np.exp(z / t - (z / t).max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


# ------------------------------------------------------------------ the loss and the sampler

def test_a_sampled_batch_is_alpha_t2_jsd_on_generated_tokens_only_and_a_corpus_batch_is_gjsd():
    g = np.random.default_rng(0)
    z, zt = g.normal(size=(3, 6, 11)) * 2, g.normal(size=(3, 6, 11)) * 2
    y = g.integers(0, 11, size=(3, 6))
    y[:, :2] = -100                                            # the context's targets
    params = {"alpha": 0.7, "temperature": 2.0, "beta": 0.3, "lmbda": 0.5, "prompt": 3}
    f = build_objective("gkd", params)
    tz, tzt, ty = torch.tensor(z, dtype=torch.float32), torch.tensor(zt, dtype=torch.float32), torch.tensor(y)
    q, p = _softmax(z[:, 2:].reshape(-1, 11), 2.0), _softmax(zt[:, 2:].reshape(-1, 11), 2.0)
    m = 0.3 * p + 0.7 * q
    want = 0.7 * 4.0 * (0.3 * _kl(p, m) + 0.7 * _kl(q, m)).mean()     # no CE: samples are no labels
    assert float(f(Batch(tz, ty, tzt, sampled=True))) == pytest.approx(want, rel=1e-5)
    y2 = torch.tensor(g.integers(0, 11, size=(3, 6)))
    gjsd = build_objective("gjsd", {"alpha": 0.7, "temperature": 2.0, "beta": 0.3})
    assert torch.equal(f(Batch(tz, y2, tzt)), gjsd(Batch(tz, y2, tzt)))


class _Bigram(torch.nn.Module):
    """A tiny LM whose next-token logits depend on the last token only: easy to sample by hand."""

    def __init__(self, v=7):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(v, v, generator=torch.Generator().manual_seed(5)) * 2)

    def forward(self, x):
        return self.table[x]


def test_sampling_is_inverse_cdf_on_the_generators_uniforms_and_restores_train_mode():
    from kdray import generation
    model = _Bigram().train()
    prompts = torch.tensor([[1, 2], [3, 3], [0, 6]])
    got = generation.sample_continue(model, prompts, 9, 0.8, torch.Generator().manual_seed(11))
    assert model.training and got.shape == (3, 9) and torch.equal(got[:, :2], prompts)
    table, g = model.table.detach().double().numpy(), torch.Generator().manual_seed(11)
    seq = prompts.numpy().tolist()
    for _ in range(7):
        u = torch.rand((3, 1), generator=g, dtype=torch.float64).numpy()[:, 0]
        for row, ui in zip(seq, u):
            cdf = np.cumsum(_softmax(table[row[-1]], 0.8))
            row.append(int(np.searchsorted(cdf, ui * cdf[-1], side="right")))
    np.testing.assert_array_equal(got.numpy(), np.array(seq))
    # and it samples: over many rows, each token's frequency is its probability
    many = generation.sample_continue(model, torch.full((4000, 1), 2), 2, 1.0, torch.Generator().manual_seed(1))
    freq = np.bincount(many[:, 1].numpy(), minlength=7) / 4000
    np.testing.assert_allclose(freq, _softmax(table[2], 1.0), atol=0.03)


# ------------------------------------------------------------------ trained through run_trial

def test_lmbda_0_trains_exactly_as_gjsd(tmp_path, real_data, trained_weights):
    from kdray.recipe import run_trial
    plan, store = _trained(tmp_path, {"gjsd": {"alphas": [0.5], "betas": [0.5]}, "gkd": {**GRID, "lmbdas": [0.0]}})
    by = {s.method: s for s in plan.students}
    out = {m: run_trial(by[m], store) for m in ("gjsd", "gkd")}
    assert by["gjsd"].trial_key != by["gkd"].trial_key
    assert _same(trained_weights[by["gjsd"].trial_key][0], trained_weights[by["gkd"].trial_key][0])
    for k in ("train_loss", "test_acc", "test_loss", "js_divergence"):
        assert out["gjsd"][k] == out["gkd"][k], k


def test_lmbda_1_trains_only_on_the_students_own_samples(tmp_path, real_data, trained_weights):
    """Two steps of gkd at lambda 1 against a loop written here: its own inverse-CDF sampler on the
    step generators' uniforms, its own JSD in float64, Adam; the weights agree, and the samples
    are not the corpus."""
    from kdray import generation
    from kdray.data import load_dataset
    from kdray.recipe import derive_seed, init_model, load_teacher, run_trial
    plan, store = _trained(tmp_path, {"siddo": True, "gkd": {"alphas": [1.0], "betas": [0.3], "lmbdas": [1.0],
                                                             "prompts": [4], "sample_temperatures": [0.7]}},
                           student_recipe={"iterations": 2, "log_every": 2})
    spec = next(s for s in plan.students if s.method == "gkd")
    run_trial(spec, store)

    bundle = load_dataset(spec.dataset, spec.data_root, **spec.dataset_args)
    teacher, _ = load_teacher(spec, store, bundle, "cpu")
    student = init_model(spec, bundle)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    order = torch.Generator().manual_seed(derive_seed(spec.data_seed, "order"))
    seed, p = derive_seed(spec.data_seed, "on_policy"), 4
    for step, (xb, _) in enumerate(bundle.train_batches(8, 2, order)):
        g = generation.step_generator(seed, step)
        assert float(torch.rand((), generator=g, dtype=torch.float64)) < 1.0     # the lambda draw
        seq = xb[:, :p].tolist()
        student.eval()
        for _ in range(16 + 1 - p):
            u = torch.rand((8, 1), generator=g, dtype=torch.float64).numpy()[:, 0]
            with torch.no_grad():
                z = student(torch.tensor(seq))[:, -1].double().numpy()
            for row, zi, ui in zip(seq, z, u):
                cdf = np.cumsum(_softmax(zi, 0.7))
                row.append(int(np.searchsorted(cdf, ui * cdf[-1], side="right")))
        student.train()
        seq = torch.tensor(seq)
        assert torch.equal(seq[:, :p], xb[:, :p]) and not torch.equal(seq[:, p:-1], xb[:, p:])   # not the corpus
        x = seq[:, :-1]
        log_q = torch.log_softmax(student(x)[:, p - 1:].double(), -1)            # generated positions only
        with torch.no_grad():
            log_p = torch.log_softmax(teacher(x)[:, p - 1:].double(), -1)
        m = 0.3 * log_p.exp() + 0.7 * log_q.exp()
        jsd = 0.3 * (log_p.exp() * (log_p - m.log())).sum(-1) + 0.7 * (log_q.exp() * (log_q - m.log())).sum(-1)
        opt.zero_grad()
        jsd.mean().backward()
        opt.step()
    got = trained_weights[spec.trial_key][0]
    for k, v in student.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5)


def test_a_rerun_is_bit_identical_and_lambda_picks_its_steps_from_the_step_generators(tmp_path, real_data,
                                                                                     monkeypatch, trained_weights):
    from kdray import generation
    from kdray.recipe import derive_seed, run_trial
    plan, store = _trained(tmp_path, {"gkd": {**GRID, "lmbdas": [0.5]}}, student_recipe={"iterations": 8,
                                                                                          "log_every": 4})
    spec = next(s for s in plan.students if s.method == "gkd")
    calls = []
    real = generation.sample_continue
    monkeypatch.setattr(generation, "sample_continue", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = run_trial(spec, store)
    second = run_trial(spec, store)
    assert _same(*trained_weights[spec.trial_key])
    assert {k: v for k, v in first.items() if k != "train_seconds"} == \
        {k: v for k, v in second.items() if k != "train_seconds"}
    seed = derive_seed(spec.data_seed, "on_policy")
    on = [float(torch.rand((), generator=generation.step_generator(seed, s), dtype=torch.float64)) < 0.5
          for s in range(8)]
    assert len(calls) == 2 * sum(on) and 0 < sum(on) < 8      # some steps on-policy, some not


# ------------------------------------------------------------------ declarations and validation

def test_gkd_is_a_sweep_condition_and_an_audit_method_against_siddo_and_rcd_never_packed(tmp_path, real_data):
    import argparse

    from kdray import audit, packing
    from kdray.models import build_model
    from kdray.plan import build_plan
    assert {r.method for r in controls_of("gkd")} == {"siddo", "rcd"}
    plan = build_plan(_sweep(tmp_path, {"siddo": True, "rcd": {"alphas": [0.5]},
                                        "gkd": {**GRID, "lmbdas": [0.0, 1.0], "sample_temperatures": [0.5]}}))
    students = [s for s in plan.students if s.method == "gkd"]
    assert {s.label for s in students} == {"c-gkd-a0.5-beta0.5-lam0-p4-Ts0.5-t0-s10",
                                           "c-gkd-a0.5-beta0.5-lam1-p4-Ts0.5-t0-s10"}
    assert len({s.trial_key for s in students}) == 2
    model = build_model(students[0].arch, 65, (16,), **students[0].arch_args)
    assert "own samples" in packing.unpackable(students[0], model)
    p = argparse.ArgumentParser()
    audit.add_arguments(p)
    args = p.parse_args(["--dataset", "tinyshakespeare", "--teacher", "nano_gpt", "--method", "gkd",
                         "--recipe", "{iterations: 4}", "--alphas", "0.5"])
    assert audit.audit_sweep(args)["setups"][0]["conditions"]["gkd"] == {"alphas": [0.5]}


@pytest.mark.parametrize("entry, message", [
    ({"lmbdas": [1.5]}, "lmbda must be in [0, 1], got 1.5"),
    ({"lmbdas": [-0.1]}, "lmbda must be in [0, 1]"),
    ({"alphas": [0.0]}, "alpha must be in (0, 1], got 0.0"),
    ({"betas": [1.0]}, "beta must be in (0, 1)"),
    ({"sample_temperatures": [0.0]}, "sample_temperature must be > 0"),
    ({"prompts": [16]}, "prompt 16 must be shorter than the data set's block_size 16"),
    ({"prompts": [0]}, "prompt must be >= 1"),
])
def test_bad_parameters_are_one_line_naming_the_field(tmp_path, real_data, entry, message):
    with pytest.raises(SweepError) as e:
        _sweep(tmp_path, {"siddo": True, "gkd": entry})
    assert message in str(e.value) and "conditions.gkd" in str(e.value) and "\n" not in str(e.value)


def test_gkd_on_a_classification_data_set_is_one_line(tmp_path):
    with pytest.raises(SweepError) as e:
        parse_sweep({"name": "x", "storage": str(tmp_path), "setups": [{
            "name": "c", "dataset": {"name": "digits"}, "teacher": {"arch": "small_cnn", "args": {"channels": 4}},
            "recipe": {"epochs": 1}, "teacher_seeds": [0], "student_seeds": [10],
            "conditions": {"siddo": True, "gkd": {"alphas": [0.5]}}}]}, "sweep.yaml")
    assert "trains on generated text" in str(e.value) and "\n" not in str(e.value)
