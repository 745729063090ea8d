"""Packed students (kdray/packing.py) against the same specs trained alone by run_trial."""
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from kdray.packing import pack_groups, run_pack, unpackable
from kdray.plan import build_plan
from kdray.recipe import init_model, run_trial
from kdray.data import load_dataset
from kdray.storage import Store
from sweeps import SMALL_GRID, make_sweep

# The stated tolerance (docs/benchmarks.md, "Packed trials"): vmap's batched matmuls may round
# differently from unbatched ones; every final metric agrees to this absolute tolerance.
ATOL = 1e-4


def _setup(tmp_path, name):
    setup = {**SMALL_GRID, "name": "d", "teacher": {"arch": "mlp", "args": {"hidden": 32, "dropout": 0.0}},
             "recipe": {"epochs": 2, "batch_size": 128, "lr": 0.01, "grad_clip": 1.0}}
    sw = make_sweep(name, tmp_path / name, **setup)
    plan = build_plan(sw)
    store = Store(sw.storage, sw.name)
    run_trial(plan.teachers[0], store)
    return plan, store


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("pack")
    plan_a, alone = _setup(tmp, "alone")
    plan_p, packed = _setup(tmp, "packed")
    for s in plan_a.students:
        run_trial(s, alone)
    packs = pack_groups(plan_p.students, cap=64)
    assert len(packs) == 1 and len(packs[0]) == len(plan_p.students)
    run_pack(packs[0], packed)
    return plan_a, alone, plan_p, packed


def test_packed_students_match_their_unpacked_runs(both):
    plan_a, alone, plan_p, packed = both
    assert len(plan_a.students) == 6
    for s in plan_a.students:
        a = alone.load_json(s.trial_key, "result.json")
        p = packed.load_json(s.trial_key, "result.json")
        for k, v in a["final"].items():
            if k == "train_seconds":
                continue
            assert p["final"][k] == pytest.approx(v, abs=ATOL), (s.label, k)
        for ha, hp in zip(a["history"], p["history"], strict=True):
            for k in ha:
                assert hp[k] == pytest.approx(ha[k], abs=ATOL), (s.label, k)
        la = np.load(io.BytesIO(alone.read_bytes(s.trial_key, "test_outputs.npz")))["logits"].astype(np.float32)
        lp = np.load(io.BytesIO(packed.read_bytes(s.trial_key, "test_outputs.npz")))["logits"].astype(np.float32)
        assert np.abs(la - lp).max() < 1e-2  # float16 storage of the logits


def test_a_pack_with_some_students_finished_stores_only_the_rest_and_the_same_bytes(both, tmp_path):
    """The whole pack trains again (a student's numbers depend on its pack-mates), and only the
    students without a stored result are stored: the same bytes the uninterrupted pack stored."""
    _, _, plan_p, packed = both
    done, redo = plan_p.students[:4], plan_p.students[4:]
    before = {s.trial_key: (Path(packed.local_dir(s.trial_key)) / "result.json").stat().st_mtime_ns for s in done}
    first = {s.trial_key: (Path(packed.local_dir(s.trial_key)) / "test_outputs.npz").read_bytes() for s in redo}
    for s in redo:  # as if the pack's process was killed before writing these
        (Path(packed.local_dir(s.trial_key)) / "result.json").unlink()
        (Path(packed.local_dir(s.trial_key)) / "test_outputs.npz").unlink()
    out = run_pack(plan_p.students, packed)
    assert set(out) == {s.trial_key for s in redo}
    assert all((Path(packed.local_dir(k)) / "result.json").stat().st_mtime_ns == t for k, t in before.items())
    assert all((Path(packed.local_dir(k)) / "test_outputs.npz").read_bytes() == b for k, b in first.items())


def test_batchnorm_and_dropout_fall_back_to_one_student_per_trial_only_under_vmap(both):
    """The stacked Sequential forward trains BatchNorm and dropout per student; a model left to vmap
    (not a plain Sequential, or kdray's GPT with dropout) cannot have them packed."""
    plan_a = both[0]
    bundle = load_dataset("digits")
    s = plan_a.students[0]
    assert unpackable(s, init_model(s, bundle)) is None
    from kdray.models import build_model
    assert unpackable(s, build_model("small_cnn", 10, (1, 8, 8))) is None              # BatchNorm + dropout 0.1
    assert unpackable(s, build_model("mlp", 10, (1, 8, 8), dropout=0.1)) is None
    assert "BatchNorm" in unpackable(s, build_model("resnet18", 10, (3, 32, 32)))
    assert "dropout" in unpackable(s, build_model("pico_gpt", 65, (16,), n_embd=16, n_head=2, n_layer=1))


def _alone_and_packed(tmp_path, setup: dict, top: dict | None = None) -> dict:
    """The same sweep twice: every student trained alone by run_trial, and all of them in one pack;
    returns {trial key: (alone result.json, packed result.json)}."""
    torch.set_num_threads(1)
    stores = {}
    for name in ("alone", "packed"):
        sw = make_sweep(name, tmp_path / name, top=top, **setup)
        plan = build_plan(sw)
        stores[name] = (plan, Store(sw.storage, sw.name))
        run_trial(plan.teachers[0], stores[name][1])
    (plan, alone), (plan_p, packed) = stores["alone"], stores["packed"]
    for s in plan.students:
        run_trial(s, alone)
    assert set(run_pack(plan_p.students, packed)) == {s.trial_key for s in plan.students}
    return {s.trial_key: (alone.load_json(s.trial_key, "result.json"), packed.load_json(s.trial_key, "result.json"))
            for s in plan.students}


def _assert_match(results: dict) -> None:
    """Every history entry and every final metric of each student within ATOL of its run alone."""
    for key, (a, p) in results.items():
        for ha, hp in zip(a["history"], p["history"], strict=True):
            assert set(ha) == set(hp), key
            for k in ha:
                assert hp[k] == pytest.approx(ha[k], abs=ATOL), (key, k)
        for k, v in a["final"].items():
            if k != "train_seconds":
                assert p["final"][k] == pytest.approx(v, abs=ATOL), (key, k)


def test_packed_tiny_gpt_students_match_their_unpacked_runs(tmp_path, real_data):
    """A small TinyShakespeare GPT (tied embedding/head weights; kdray/stacked/gpt.py), KD and SIDDO."""
    setup = {"name": "g", "dataset": {"name": "tinyshakespeare", "args": {"block_size": 16, "max_chars": 20000}},
             "teacher": {"arch": "pico_gpt", "args": {"n_embd": 16, "n_head": 2, "n_layer": 1, "dropout": 0.0}},
             "recipe": {"iterations": 6, "log_every": 3, "batch_size": 8, "lr": 0.003},
             "teacher_seeds": [0], "student_seeds": [10, 11],
             "conditions": {"siddo": True, "kd": {"alphas": [0.5]}, "rcd": None}}
    results = _alone_and_packed(tmp_path, setup, top={"data_root": str(real_data)})
    assert all(len(a["history"]) == len(p["history"]) == 2 for a, p in results.values())
    _assert_match(results)


def _augmenting_images():
    """A small image data set whose training preprocessing crops and flips at random."""
    from kdray.data.bundle import DataBundle
    from kdray.data.images import image_preprocess
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    return DataBundle("classification", 4, (3, 8, 8), x, y, x[:8], y[:8], preprocess=image_preprocess(0.5, 0.5, "crop_flip"))


def _token_stream():
    from kdray.data.bundle import DataBundle
    tokens = torch.randint(0, 11, (500,), generator=torch.Generator().manual_seed(1))
    return DataBundle("lm", 11, (6,), tokens, None, tokens[:12].reshape(2, 6), tokens[1:13].reshape(2, 6),
                      block_size=6)


@pytest.mark.parametrize("make", [lambda: load_dataset("digits"), _augmenting_images, _token_stream],
                         ids=["fixed-images", "augmented-images", "tokens"])
def test_each_student_in_a_pack_gets_the_batches_it_would_get_alone(make):
    """A pack takes its K batches in one indexing operation (and preprocesses them in one call when
    nothing is random): each student's rows are still the ones its own generators draw alone."""
    from types import SimpleNamespace

    from kdray.packing import _pack_batches
    from kdray.recipe import derive_seed

    bundle = make()
    seeds = [10, 11, 12]

    def generators():
        return [SimpleNamespace(order=torch.Generator().manual_seed(derive_seed(s, "order")),
                                augment=torch.Generator().manual_seed(derive_seed(s, "augment"))) for s in seeds]

    steps = 7          # past an epoch of 40 rows at batch 16: a new permutation, and a partial batch
    packed = list(_pack_batches(bundle, generators(), 16, steps, "cpu"))
    assert len(packed) == steps
    for i, st in enumerate(generators()):
        for (_, x, y), (xb, yb) in zip(packed, bundle.train_batches(16, steps, st.order), strict=True):
            assert torch.equal(x[i], bundle.preprocess(xb, True, st.augment))
            assert torch.equal(y[i], yb)
    assert bundle.augments() == (make is _augmenting_images)


def test_packed_grouped_cnn_students_match_their_unpacked_runs(tmp_path):
    """The stacked Sequential forward (grouped convolutions, kdray/stacked/sequential.py) through
    training, with KD, SIDDO and RCD students in one pack, at the quickstart's learning rate.  (At
    lr 0.01 one KD student's run flips a test prediction, packed or not: the unpacked run at 2
    threads instead of 1 flips the same one; docs/benchmarks.md, "Packed trials".)"""
    setup = {**SMALL_GRID, "name": "c",
             "teacher": {"arch": "small_cnn", "args": {"channels": 4, "dropout": 0.0, "batch_norm": False}},
             "recipe": {"epochs": 2, "batch_size": 64, "lr": 0.002, "eval_every": 1}}
    results = _alone_and_packed(tmp_path, setup)
    _assert_match(results)
    assert all("test_acc" in p["history"][0] for _, p in results.values())   # the mid-training test metrics too


def test_the_quickstart_cnn_with_batchnorm_and_dropout_packs_as_it_trains_alone(tmp_path):
    """The quickstart's own small_cnn (BatchNorm, dropout 0.1), packed: each student's dropout
    masks come from its own generator, its BatchNorm statistics from its own batches (the test
    metrics, in eval mode, use each student's running statistics).  Plain SGD: with Adam, or SGD
    with momentum at a high rate, this BatchNorm net turns rounding into visible differences, packed
    or not (the unpacked run at 2 threads instead of 1 moves as far; docs/benchmarks.md)."""
    setup = {**SMALL_GRID, "name": "q", "teacher": {"arch": "small_cnn", "args": {"channels": 8, "dropout": 0.1}},
             "recipe": {"epochs": 2, "batch_size": 128, "lr": 0.01, "optimizer": "sgd", "eval_every": 1}}
    _assert_match(_alone_and_packed(tmp_path, setup))


def test_randomness_that_changes_nothing_still_counts_and_own_batch_drawing_trains_alone():
    """A preprocess that draws from its generator is random even where the draw changed none of
    the probed rows (a pack then preprocesses each student's batch with its own generator); a data
    set that draws its own batches is not packed (a pack takes batches through train_draws/take)."""
    from kdray.data.bundle import DataBundle

    x, y = torch.zeros(20, 1, 4, 4, dtype=torch.uint8), torch.zeros(20, dtype=torch.long)

    def rarely(xb, train, gen):            # erases nothing unless a 1-in-a-million draw comes up
        hit = train and gen is not None and float(torch.rand((), generator=gen)) < 1e-6
        return xb.float() * (0 if hit else 1)

    plain = DataBundle("classification", 2, (1, 4, 4), x, y, x, y)
    assert not plain.augments()
    assert DataBundle("classification", 2, (1, 4, 4), x, y, x, y, preprocess=rarely).augments()

    class OwnBatches(DataBundle):
        def train_batches(self, batch_size, steps, order):
            yield from super().train_batches(batch_size, steps, order)

    s = build_plan(make_sweep("o", None, **SMALL_GRID)).students[0]
    model = init_model(s, load_dataset("digits"))
    assert unpackable(s, model, plain) is None
    assert "draws its own batches" in unpackable(s, model, OwnBatches("classification", 2, (1, 4, 4), x, y, x, y))
