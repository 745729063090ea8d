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


def test_a_pack_with_some_students_finished_retrains_only_the_rest(both, tmp_path):
    _, _, plan_p, packed = both
    done, redo = plan_p.students[:4], plan_p.students[4:]
    before = {s.trial_key: (Path(packed.local_dir(s.trial_key)) / "result.json").stat().st_mtime_ns for s in done}
    for s in redo:  # as if the pack's process was killed before writing these
        (Path(packed.local_dir(s.trial_key)) / "result.json").unlink()
    out = run_pack(plan_p.students, packed)
    assert set(out) == {s.trial_key for s in redo}
    assert all((Path(packed.local_dir(k)) / "result.json").stat().st_mtime_ns == t for k, t in before.items())
    assert all((Path(packed.local_dir(s.trial_key)) / "result.json").exists() for s in redo)


def test_batchnorm_and_dropout_fall_back_to_one_student_per_trial(both):
    plan_a = both[0]
    bundle = load_dataset("digits")
    s = plan_a.students[0]
    assert unpackable(s, init_model(s, bundle)) is None
    from kdray.models import build_model
    assert "BatchNorm" in unpackable(s, build_model("small_cnn", 10, (1, 8, 8)))
    assert "dropout" in unpackable(s, build_model("mlp", 10, (1, 8, 8), dropout=0.1))


def test_packed_tiny_gpt_students_match_their_unpacked_runs(tmp_path, real_data):
    """A small TinyShakespeare GPT (tied embedding/head weights, attention under vmap), KD and SIDDO."""
    torch.set_num_threads(1)
    setup = {"name": "g", "dataset": {"name": "tinyshakespeare", "args": {"block_size": 16, "max_chars": 20000}},
             "teacher": {"arch": "pico_gpt", "args": {"n_embd": 16, "n_head": 2, "n_layer": 1, "dropout": 0.0}},
             "recipe": {"iterations": 6, "log_every": 3, "batch_size": 8, "lr": 0.003},
             "teacher_seeds": [0], "student_seeds": [10, 11],
             "conditions": {"siddo": True, "kd": {"alphas": [0.5]}, "rcd": None}}
    stores = {}
    for name in ("alone", "packed"):
        sw = make_sweep(name, tmp_path / name, top={"data_root": str(real_data)}, **setup)
        plan = build_plan(sw)
        stores[name] = (plan, Store(sw.storage, sw.name))
        run_trial(plan.teachers[0], stores[name][1])
    plan, alone = stores["alone"]
    for s in plan.students:
        run_trial(s, alone)
    run_pack(stores["packed"][0].students, stores["packed"][1])
    for s in plan.students:
        a, p = alone.load_json(s.trial_key, "result.json"), stores["packed"][1].load_json(s.trial_key, "result.json")
        assert len(a["history"]) == len(p["history"]) == 2
        for k, v in a["final"].items():
            if k != "train_seconds":
                assert p["final"][k] == pytest.approx(v, abs=ATOL), (s.label, k)
