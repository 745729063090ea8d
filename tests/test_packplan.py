"""The plan decides which students pack, and why not (kdray/packplan.py): from the models' and data
sets' declarations, without building a model or loading data (so without torch), and ``kdray plan``
shows it; only a plug-in that declares nothing is built to look, and a pack whose built model
disagrees with the plan fails instead of training differently."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap

import pytest

from kdray import packplan
from kdray.cli import main
from kdray.plan import build_plan
from kdray.sweep import parse_sweep
from sweeps import SMALL_GRID, sweep_dict, write_sweep

CNN = {"arch": "small_cnn", "args": {"channels": 4}}
VIT = {"arch": "vit", "args": {"dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16, "patch_size": 4}}
PACK = {"student": {"pack": 4}}


def _sweep(tmp_path, student_b: dict | None = None) -> dict:
    """Setup a: small_cnn students (BatchNorm and dropout 0.1: the stacked Sequential forward packs
    them); setup b: ViT students with dropout 0.1 (left to vmap: trained alone)."""
    d = sweep_dict("p", tmp_path / "store", name="a", teacher=CNN, resources=PACK, **SMALL_GRID)
    d["setups"].append({**d["setups"][0], "name": "b", "teacher": {**VIT, "args": {**VIT["args"], "dropout": 0.0}},
                        "student": student_b or {**VIT, "args": {**VIT["args"], "dropout": 0.1}}})
    return d


def test_the_plan_decides_packs_without_torch(tmp_path):
    """Computing the packs of a small_cnn / ViT sweep imports no torch: nothing is built or loaded."""
    path = write_sweep(tmp_path / "p.yaml", _sweep(tmp_path))
    code = textwrap.dedent(f"""
        import json, sys
        from kdray.sweep import load_sweep
        from kdray.plan import build_plan, format_plan
        plan = build_plan(load_sweep({str(path)!r}))
        packing = plan.packing()
        format_plan(plan)
        print(json.dumps({{"torch": "torch" in sys.modules, "sizes": sorted(len(j) for j in packing.jobs),
                          "reasons": sorted(set(packing.reasons.values())), "n": len(packing.reasons)}}))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got == {"torch": False, "sizes": [1] * 6 + [3, 3], "reasons": [packplan.DROPOUT], "n": 6}


def test_kdray_plan_shows_the_packs_and_why_students_do_not_pack(tmp_path, capsys):
    path = write_sweep(tmp_path / "p.yaml", _sweep(tmp_path))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "students packed up to 4 per trial" in out
    assert "packs: 6 students in 2 packs of 3; 0 one per trial" in out, out
    assert "packs: 0 students in 0 packs; 6 one per trial" in out, out
    assert f"not packed: 6 students: {packplan.DROPOUT}" in out, out


def test_the_declared_decision_is_the_one_a_built_model_gives(tmp_path):
    """For declared models the plan's reasons are those the old look (one built model per
    architecture and data set) gives, so the packs are the same students."""
    plan = build_plan(parse_sweep(_sweep(tmp_path)))
    assert packplan.reasons(plan.students) == packplan.looked_reasons(plan.students)
    assert len(plan.packing().reasons) == 6


# (architecture, builder args, input shape): each built-in declaration on both sides of its rule
BUILT_INS = [
    ("mlp", {}, (1, 8, 8)), ("mlp", {"dropout": 0.0, "depth": 0}, (1, 8, 8)),
    ("small_cnn", {}, (1, 8, 8)), ("small_cnn", {"batch_norm": False, "dropout": 0.0}, (1, 8, 8)),
    ("resnet18", {"width": 0.25}, (3, 32, 32)), ("resnet50", {"width": 0.25}, (3, 32, 32)),
    ("vgg19", {"hidden": 8}, (3, 32, 32)), ("vgg19", {"hidden": 8, "dropout": 0.0}, (3, 32, 32)),
    ("vgg19_bn", {"hidden": 8, "dropout": 0.0}, (3, 32, 32)),
    ("vit", VIT["args"], (1, 8, 8)), ("vit", {**VIT["args"], "dropout": 0.0}, (1, 8, 8)),
    ("vggish", {"width": 0.125, "hidden": 8}, (1, 32, 32)),
    ("vggish", {"width": 0.125, "hidden": 8, "batch_norm": False}, (1, 32, 32)),
    ("vggish", {"width": 0.125, "hidden": 8, "batch_norm": False, "dropout": 0.0}, (1, 32, 32)),
    ("ast", {"dim": 16, "depth": 1, "heads": 2, "patch": 4, "stride": 4}, (16, 16)),
    ("ast", {"dim": 16, "depth": 1, "heads": 2, "patch": 4, "stride": 4, "dropout": 0.0}, (16, 16)),
    ("pico_gpt", {"n_embd": 16, "n_head": 2, "n_layer": 1}, (16,)),
    ("nano_gpt", {"n_embd": 16, "n_head": 2, "n_layer": 1, "dropout": 0.0}, (16,)),
]


def test_every_built_in_declaration_matches_its_built_model(tmp_path):
    from kdray.models import MODELS, build_model

    assert {a for a, _, _ in BUILT_INS} == {n for n in MODELS.names() if MODELS.get(n).packs is not None}
    base = build_plan(parse_sweep(_sweep(tmp_path))).students[0]
    seen = set()
    for arch, args, shape in BUILT_INS:
        spec = dataclasses.replace(base, arch=arch, arch_args=dict(args))
        model = build_model(arch, 65 if "gpt" in arch else 10, shape, **args)
        declared = packplan.declared_reason(spec)
        assert declared == packplan.unpackable(spec, model), (arch, args)
        seen.add(declared)
    assert seen == {None, packplan.BATCH_NORM, packplan.DROPOUT}


def test_every_built_in_data_set_declares_how_a_pack_takes_its_batches():
    from kdray.data import DATASETS

    built_in = [n for n in DATASETS.names()    # not the ones a benchmark or test registered in this process
                if isinstance(DATASETS.get(n).target, str) and DATASETS.get(n).target.startswith("kdray.")]
    assert "digits" in built_in and "text_bpe" in built_in
    declared = {n: DATASETS.get(n).batches for n in built_in}
    assert None not in declared.values(), declared
    assert [n for n, b in declared.items() if b != "indexed"] == ["imagenet_ffcv"]    # FFCVBundle streams


PLUGIN = """
from kdray.models import IMAGE, Architecture, Packs

def refuses(num_classes, input_shape, width=1.0):
    raise AssertionError("the plan built a model")

def bn_net(num_classes, input_shape, width=1.0):
    from torch import nn
    class Net(nn.Module):              # not a plain Sequential: a pack runs it under vmap
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, num_classes))
        def forward(self, x):
            return self.body(x)
    return Net()

declared = Architecture("declared", refuses, (IMAGE,), packs=Packs(stacked=True))
undeclared = Architecture("undeclared", refuses, (IMAGE,))
wrongly_declared = Architecture("wrongly_declared", bn_net, (IMAGE,), packs=Packs(stacked=True))
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    (tmp_path / "kdray_packplan_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "kdray_packplan_plugin"


def test_a_declared_plug_in_is_never_built_and_an_undeclared_one_is_looked_at(tmp_path, plugin):
    plan = build_plan(parse_sweep(_sweep(tmp_path, {"arch": f"{plugin}:declared"})))
    assert not plan.packing().reasons and sorted(len(j) for j in plan.packing().jobs) == [3, 3, 3, 3]
    plan = build_plan(parse_sweep(_sweep(tmp_path, {"arch": f"{plugin}:undeclared"})))
    b = [s for s in plan.students if s.setup == "b"]
    why = plan.packing().reasons          # the fallback built it: its builder's error, trained alone
    looked = "cannot check it here (AssertionError: the plan built"
    assert len(b) == 6 and all(why.get(s.trial_key, "").startswith(looked) for s in b), why


def test_a_pack_whose_built_model_disagrees_with_the_plan_fails_clearly(tmp_path, plugin):
    from kdray.packing import run_pack
    from kdray.storage import Store

    sw = parse_sweep(_sweep(tmp_path, {"arch": f"{plugin}:wrongly_declared"}))
    plan = build_plan(sw)
    pack = next(j for j in plan.packing().jobs if len(j) > 1 and j[0].setup == "b")
    with pytest.raises(ValueError, match="BatchNorm.*the plan packed it.*disagrees"):
        run_pack(pack, Store(sw.storage, sw.name))
