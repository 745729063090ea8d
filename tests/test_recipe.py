"""One trial: pairing (same init, same batches), determinism, artefacts, failures."""
import io

import numpy as np
import pytest
import torch

from kdray.data import load_dataset
from kdray.data.bundle import DataBundle
from kdray.plan import build_plan
from kdray.recipe import TeacherArtifactError, TrialDiverged, init_model, run_trial
from kdray.storage import Store
from sweeps import SMALL_GRID, make_sweep


def sweep(tmp_path, **over):
    setup = {**SMALL_GRID, "name": "d", "teacher": {"arch": "small_cnn", "args": {"channels": 4}},
             "recipe": {"epochs": 2, "batch_size": 128, "lr": 0.01}}
    return make_sweep("r", tmp_path, **{**setup, **over})


@pytest.fixture()
def trained(tmp_path):
    torch.set_num_threads(1)
    sw = sweep(tmp_path)
    plan = build_plan(sw)
    store = Store(sw.storage, sw.name)
    run_trial(plan.teachers[0], store)
    return plan, store


def by(plan, method, seed=10):
    return next(s for s in plan.students if s.method == method and s.student_seed == seed)


def test_students_start_from_the_teachers_initial_weights(trained):
    plan, _ = trained
    teacher = plan.teachers[0]
    bundle = load_dataset("digits")
    m0 = init_model(teacher, bundle).state_dict()
    for method in ("siddo", "kd", "rcd"):
        for seed in (10, 11):
            sd = init_model(by(plan, method, seed), bundle).state_dict()
            assert all(torch.equal(m0[k], sd[k]) for k in m0)


def test_paired_conditions_see_the_same_batches_in_the_same_order(trained, monkeypatch):
    plan, store = trained
    seen: dict[str, list] = {}
    original = DataBundle.train_index_batches

    def spy(self, batch_size, steps, order):
        for idx in original(self, batch_size, steps, order):
            seen.setdefault(current, []).append(idx.clone())
            yield idx

    monkeypatch.setattr(DataBundle, "train_index_batches", spy)
    for method, seed in (("siddo", 10), ("kd", 10), ("rcd", 10), ("siddo", 11)):
        current = f"{method}{seed}"
        run_trial(by(plan, method, seed), store)
    ref = seen["siddo10"]
    assert len(ref) == 2 * 12  # 2 epochs of ceil(1437 / 128) batches
    for other in ("kd10", "rcd10"):
        assert len(seen[other]) == len(ref)
        assert all(torch.equal(a, b) for a, b in zip(ref, seen[other]))
    assert not all(torch.equal(a, b) for a, b in zip(ref, seen["siddo11"]))


def test_kd_uses_the_teachers_cached_training_outputs(trained):
    """Digits are not augmented: the teacher stores its training-set logits once; KD with the
    cache trains exactly as KD with the teacher run online would (same targets, up to float noise)."""
    plan, store = trained
    t = plan.teachers[0]
    assert store.exists(t.trial_key, "train_logits.npy")
    cache = store.load_npy(t.trial_key, "train_logits.npy")
    bundle = load_dataset("digits")
    assert cache.shape == (len(bundle.train_x), 10)
    teacher = torch.load(io.BytesIO(store.read_bytes(t.trial_key, "model.pt")), weights_only=True)
    model = init_model(t, bundle)
    model.load_state_dict(teacher)
    model.eval()
    with torch.no_grad():
        online = model(bundle.preprocess(bundle.train_x[:100], True, torch.Generator().manual_seed(3)))
    np.testing.assert_allclose(cache[:100], online.numpy(), rtol=1e-5, atol=1e-5)


def test_a_trial_is_a_pure_function_of_its_spec(trained, tmp_path):
    plan, store = trained
    spec = by(plan, "kd")
    r1 = run_trial(spec, store)
    out1 = np.load(io.BytesIO(store.read_bytes(spec.trial_key, "test_outputs.npz")))["logits"]
    r2 = run_trial(spec, store)
    out2 = np.load(io.BytesIO(store.read_bytes(spec.trial_key, "test_outputs.npz")))["logits"]
    assert np.array_equal(out1, out2)
    assert r1["test_loss"] == r2["test_loss"] and r1["activation_distance"] == r2["activation_distance"]
    other = run_trial(by(plan, "kd", 11), store)
    assert other["test_loss"] != r1["test_loss"]


def test_student_metrics_and_teacher_artefacts(trained):
    plan, store = trained
    t = plan.teachers[0]
    assert store.exists(t.trial_key, "model.pt") and store.exists(t.trial_key, "test_logits.npy")
    r = run_trial(by(plan, "siddo"), store)
    for k in ("activation_distance", "js_divergence", "rank_disagreement", "prediction_disagreement",
              "prediction_agreement", "correct_agreement", "incorrect_agreement", "variation_of_information",
              "procrustes_distance", "test_acc", "train_acc"):
        assert k in r and np.isfinite(r[k]), k
    for k in ("prediction_agreement", "correct_agreement", "incorrect_agreement"):
        assert 0 <= r[k] <= 1, k
    assert r["prediction_agreement"] == pytest.approx(1 - r["prediction_disagreement"])


def test_missing_teacher_names_the_teacher(tmp_path):
    plan = build_plan(sweep(tmp_path))
    with pytest.raises(TeacherArtifactError, match=r"teacher d-teacher-t0 \(trial [0-9a-f]{16}\)"):
        run_trial(by(plan, "kd"), Store(str(tmp_path), "r"))


def test_corrupt_teacher_checkpoint_is_a_clear_error(trained):
    plan, store = trained
    store.write_bytes(plan.teachers[0].trial_key, "model.pt", b"not a checkpoint")
    with pytest.raises(TeacherArtifactError, match="no usable artefacts"):
        run_trial(by(plan, "kd"), store)


def test_nan_loss_stops_the_trial(tmp_path):
    # lr * weight_decay = 10: decay alone multiplies every weight by about -9 per SGD step, so the
    # weights overflow within a few dozen steps whatever the gradients (no dead-ReLU escape).
    sw = sweep(tmp_path, teacher={"arch": "mlp"}, recipe={"epochs": 3, "lr": 100, "optimizer": "sgd", "weight_decay": 0.1})
    with pytest.raises(TrialDiverged, match="training loss is nan|training loss is inf"):
        run_trial(build_plan(sw).teachers[0], Store(sw.storage, sw.name))


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path):
    """A trial restored from its epoch-2 state ends exactly where the uninterrupted one does."""
    sw = sweep(tmp_path, recipe={"epochs": 4, "batch_size": 128, "lr": 0.01, "checkpoint_every": 2})
    spec = build_plan(sw).teachers[0]
    store = Store(sw.storage, sw.name)
    states = []
    full = run_trial(spec, store, report=lambda m, s=None: s and states.append(s))
    assert [s["epoch"] for s in states] == [2]
    buf = io.BytesIO()
    torch.save(states[0], buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    resumed = run_trial(spec, store, restore=lambda: state)
    assert resumed["test_loss"] == full["test_loss"] and resumed["train_loss"] == full["train_loss"]
