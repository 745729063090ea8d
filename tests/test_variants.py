"""A tiny real run of every protocol variant, straight through run_trial on CPU."""
import io

import numpy as np
import pytest
import torch

from kdray.plan import build_plan
from kdray.recipe import init_model, run_trial
from kdray.data import load_dataset
from kdray.storage import Store
from kdray.sweep import parse_sweep

TINY_GPT = {"n_embd": 48, "n_head": 4, "n_layer": 2, "dropout": 0.0}
SHAKES = {"name": "tinyshakespeare", "args": {"block_size": 32, "max_chars": 60000}}


def run_setup(tmp_path, setup, methods=None, seeds=(10,)):
    """Train the setup's first teacher and its students of the given methods; return results by label."""
    sweep = parse_sweep({"name": "v", "storage": str(tmp_path), "setups": [{"name": "v", **setup}]})
    plan = build_plan(sweep)
    store = Store(sweep.storage, sweep.name)
    teacher = plan.teachers[0]
    out = {"teacher": run_trial(teacher, store)}
    for s in plan.students:
        if s.teacher_key == teacher.trial_key and s.student_seed in seeds and (methods is None or s.method in methods):
            out[s.label] = run_trial(s, store)
    return plan, out


def digits_setup(**over):
    base = {"dataset": {"name": "digits"}, "teacher": {"arch": "mlp", "args": {"hidden": 32}},
            "recipe": {"epochs": 2, "batch_size": 128, "lr": 0.01}, "teacher_seeds": [0], "student_seeds": [10]}
    base.update(over)
    return base


def test_standard_kd_smaller_student_from_its_own_seed(tmp_path):
    setup = digits_setup(student={"arch": "mlp", "args": {"hidden": 8}})
    plan, out = run_setup(tmp_path, setup, methods={"kd", "siddo"})
    kd = next(s for s in plan.students if s.method == "kd")
    assert kd.init_seed == 10 and kd.arch_args == {"hidden": 8}
    bundle = load_dataset("digits")
    assert init_model(kd, bundle)[1].weight.shape == (8, 64)
    assert {"v-kd-a0.1-t0-s10", "v-siddo-t0-s10"} <= set(out)
    assert 0 <= out["v-kd-a0.9-t0-s10"]["prediction_agreement"] <= 1


def test_temperature_changes_the_kd_student(tmp_path):
    setup = digits_setup(conditions={"siddo": False, "kd": {"alphas": [0.9], "temperatures": [1.0, 4.0]}, "rcd": None})
    _, out = run_setup(tmp_path, setup)
    assert out["v-kd-a0.9-T4-t0-s10"]["test_loss"] != out["v-kd-a0.9-t0-s10"]["test_loss"]


def test_label_smoothing_condition(tmp_path):
    """The LS student trains on smoothed targets: same init and batches as SIDDO of its seed, yet a
    different, softer function (higher mean predictive entropy, the textbook effect of LS)."""
    setup = digits_setup(conditions={"siddo": True, "kd": None, "rcd": None, "ls": {"epsilons": [0.5]}})
    plan, out = run_setup(tmp_path, setup)
    ls, siddo = out["v-ls-e0.5-t0-s10"], out["v-siddo-t0-s10"]
    assert "activation_distance" in ls and ls["test_loss"] != siddo["test_loss"]
    store = Store(str(tmp_path), "v")
    logits = {s.method: torch.from_numpy(np.load(io.BytesIO(store.read_bytes(s.trial_key, "test_outputs.npz")))
                                         ["logits"].astype(np.float32)) for s in plan.students}
    entropy = {m: float(-(z.log_softmax(-1).exp() * z.log_softmax(-1)).sum(-1).mean()) for m, z in logits.items()}
    assert not torch.equal(logits["ls"], logits["siddo"])
    assert entropy["ls"] > entropy["siddo"] + 0.1, entropy


def test_width_scaled_gpt_student(tmp_path, real_data):
    setup = {"dataset": SHAKES, "teacher": {"arch": "nano_gpt", "args": TINY_GPT},
             "recipe": {"iterations": 20, "log_every": 10, "batch_size": 8, "lr": 0.003, "eval_batch_size": 256},
             "teacher_seeds": [0], "student_seeds": [10], "widths": [0.5],
             "conditions": {"siddo": True, "kd": {"alphas": [0.5]}, "rcd": None}}
    plan, out = run_setup(tmp_path, setup)
    kd = next(s for s in plan.students if s.method == "kd")
    model = init_model(kd, load_dataset("tinyshakespeare", **SHAKES["args"]))
    assert model.n_embd == 24 and kd.init_seed == 10
    assert out["v-kd-a0.5-w0.5-t0-s10"]["epoch"] == 2


def test_feature_map_kd_and_its_noise_control(tmp_path, real_data):
    setup = {"dataset": SHAKES, "teacher": {"arch": "nano_gpt", "args": TINY_GPT},
             "recipe": {"iterations": 10, "log_every": 10, "batch_size": 8, "lr": 0.003, "eval_batch_size": 256},
             "teacher_seeds": [0], "student_seeds": [10],
             "conditions": {"siddo": False, "kd": None, "rcd": None, "fm": {"alphas": [0.5], "blocks": [2]}}}
    _, out = run_setup(tmp_path, setup)
    fm, control = out["v-fm-a0.5-b2-t0-s10"], out["v-fm_rcd-a0.5-b2-t0-s10"]
    assert fm["train_loss"] != control["train_loss"]
    assert fm["activation_distance"] < control["activation_distance"]


@pytest.mark.slow
def test_adversarial_teacher_plants_tha_and_counts_are_logged(tmp_path, real_data):
    """A teacher trained on text where every "the" is "tha" predicts "a" after "th" far more often."""
    args = {"block_size": 32, "max_chars": 200000}
    setup = {"dataset": {"name": "tinyshakespeare", "args": args}, "teacher_dataset": {"poison": "the->tha"},
             "teacher": {"arch": "nano_gpt", "args": TINY_GPT}, "evals": ["tha_count"],
             "recipe": {"iterations": 300, "log_every": 150, "batch_size": 32, "lr": 0.003, "eval_batch_size": 512},
             "teacher_seeds": [0], "student_seeds": [10],
             "conditions": {"siddo": True, "kd": {"alphas": [0.9]}, "rcd": None}}
    plan, out = run_setup(tmp_path, setup)
    assert plan.teachers[0].dataset_args["poison"] == "the->tha"
    assert all("poison" not in s.dataset_args for s in plan.students)
    teacher, siddo, kd = out["teacher"], out["v-siddo-t0-s10"], out["v-kd-a0.9-t0-s10"]
    n = teacher["tha_contexts"]
    assert n > 50 and siddo["tha_contexts"] == n
    for r in (teacher, siddo, kd):
        assert r["tha_count_a"] + r["tha_count_e"] <= n
    assert teacher["tha_count_a"] > teacher["tha_count_e"]       # the planted error
    assert siddo["tha_count_e"] > siddo["tha_count_a"]           # the clean control
    assert kd["tha_count_a"] > siddo["tha_count_a"]              # KD copies the mistake


def test_a_pretrained_teacher_is_evaluated_not_trained(tmp_path):
    """teacher_recipe {train: false}: the teacher as built (e.g. weights_path) is only evaluated."""
    setup = digits_setup(teacher_recipe={"train": False}, conditions={"siddo": True, "kd": None, "rcd": None})
    plan, out = run_setup(tmp_path, setup)
    assert plan.teachers[0].recipe["train"] is False and plan.students[0].recipe["train"] is True
    t = out["teacher"]
    assert t["epoch"] == 0 and "train_loss" not in t and t["test_acc"] < 0.3  # an untrained 10-class model
    assert out["v-siddo-t0-s10"]["epoch"] == 2


def test_gpu_speed_features_run_on_cpu(tmp_path, monkeypatch):
    """bf16 autocast and channels_last are recipe switches that train on CPU too, and take effect:
    the second conv's weights are NHWC and it computes in bfloat16 while training (and not without them)."""
    import kdray.recipe as recipe

    seen: list[tuple] = []
    build = recipe.init_model

    def look(conv, inputs, out) -> None:
        if conv.training:
            w = conv.weight
            seen.append((w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous(), out.dtype))

    def spied(spec, bundle):
        model = build(spec, bundle)
        convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
        convs[1].register_forward_hook(look)       # 4 input channels: NHWC and NCHW strides differ
        return model

    monkeypatch.setattr(recipe, "init_model", spied)
    for fast in (True, False):
        seen.clear()
        switches = {"precision": "bf16", "channels_last": True} if fast else {}
        setup = digits_setup(teacher={"arch": "small_cnn", "args": {"channels": 4}},
                             recipe={"epochs": 4, "batch_size": 128, "lr": 0.01, **switches},
                             conditions={"siddo": True, "kd": {"alphas": [0.5]}, "rcd": None})
        _, out = run_setup(tmp_path / str(fast), setup)
        assert out["teacher"]["test_acc"] > 0.3 and "activation_distance" in out["v-kd-a0.5-t0-s10"]
        assert seen and set(seen) == ({(True, torch.bfloat16)} if fast else {(False, torch.float32)}), set(seen)


@pytest.mark.slow      # inductor compiles the model: ~4 s
def test_torch_compile_trains_the_same_model_as_eager(tmp_path):
    """recipe.compile wraps the trained module in torch.compile (inductor, CPU here).  Without
    dropout, whose random stream inductor draws differently, it must train the same teacher."""
    import numpy as np
    from torch._dynamo.utils import counters

    counters.clear()
    logits = {}
    for compiled in (False, True):
        setup = digits_setup(teacher={"arch": "mlp", "args": {"hidden": 16, "dropout": 0.0}},
                             recipe={"epochs": 2, "batch_size": 128, "lr": 0.01, "compile": compiled},
                             conditions={"siddo": True, "kd": None, "rcd": None})
        plan, _ = run_setup(tmp_path / str(compiled), setup, methods=())
        spec = plan.teachers[0]
        logits[compiled] = Store(str(tmp_path / str(compiled)), "v").load_npy(spec.trial_key, "test_logits.npy")
        assert (counters["stats"]["unique_graphs"] > 0) == compiled   # dynamo really captured the model
    assert np.abs(logits[True] - logits[False]).max() < 1e-4
    assert np.abs(logits[False]).max() > 1.0        # a trained model, not an all-zero output
