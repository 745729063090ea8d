"""The torch-free declarations of architectures and data sets tell the truth about their code.

``kdray validate`` reads builder arguments from source (kdray.registry.builder_args) and block
counts from the declarations, never importing torch; these tests import the real builders and
check both against them.
"""
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdray.data import DATASETS
from kdray.models import MODELS
from kdray.registry import builder_args, check_value, resolve

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("registry,skip", [(MODELS, ("num_classes", "input_shape")), (DATASETS, ("root",))],
                         ids=["models", "datasets"])
def test_arguments_read_from_source_are_the_builders_own(registry, skip):
    for name in registry.names():
        target = registry.get(name).target
        if name == "imagenet_ffcv":        # its module imports ffcv, an optional extra
            continue
        real = inspect.signature(resolve(target)).parameters
        parsed = builder_args(target, skip=skip)
        assert list(parsed) == [n for n in real if n not in skip], name
        for arg, (_, default) in parsed.items():
            want = real[arg].default
            literal = want is inspect.Parameter.empty or isinstance(want, (int, float, str, bool, type(None)))
            assert default == (want if literal else None), (name, arg)   # non-literal defaults read as None


@pytest.mark.parametrize("name,args,n", [("nano_gpt", {"n_layer": 3, "n_embd": 12, "n_head": 2}, 3),
                                         ("nano_gpt", {"n_embd": 12, "n_head": 2}, 6),
                                         ("vit", {"depth": 2, "dim": 16, "heads": 2, "mlp_dim": 16, "patch_size": 8}, 2),
                                         ("ast", {"depth": 2, "dim": 16, "heads": 2}, 2)])
def test_declared_block_counts_are_the_models_blocks(name, args, n):
    arch = MODELS.get(name)
    shape = {"nano_gpt": (16,), "vit": (3, 32, 32), "ast": (32, 40)}[name]
    assert arch.n_blocks(args) == n == len(arch(5, shape, **args).blocks)


@pytest.mark.parametrize("annotation,ok,bad", [
    ("int", [3], [3.0, True, "3"]), ("float", [3, 0.5], ["0.5", False]), ("Optional[int]", [None, 2], [2.5]),
    ("int | None", [None, 1], ["1"]), ("Union[None, str, dict]", [None, "the->tha", {}], [3]), ("Pair", [16, (16, 10)], [])])
def test_check_value(annotation, ok, bad):
    assert all(check_value(annotation, v) for v in ok) and not any(check_value(annotation, v) for v in bad)


def test_validate_and_plan_import_no_torch(tmp_path):
    spaces = ROOT / "search_spaces"
    code = ("import sys; from kdray.cli import main; "
            f"rc = main(['validate', {str(spaces / 'quickstart.yaml')!r}]) "
            f"+ main(['plan', {str(spaces / 'tinyshakespeare_feature_map.yaml')!r}]); "
            "print(rc, sorted(m for m in ('torch', 'torchvision', 'ray', 'mlflow') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "0 []"


@pytest.mark.parametrize("registry", [MODELS, DATASETS], ids=["models", "datasets"])
def test_declared_ranges_name_real_arguments_and_hold_their_defaults(registry):
    """A range on an argument the builder lacks would never fire; a default outside its range would
    make every sweep that leaves it out invalid."""
    for name in registry.names():
        decl = registry.get(name)
        args = decl.args()
        for arg, rng in decl.ranges.items():
            assert arg in args, (name, arg)
            default = args[arg][1]
            assert default is None or rng.why_not(default) is None, (name, arg, default)


def test_modalities_are_checked_where_declared_and_any_takes_every_one():
    from kdray.data import Dataset
    from kdray.models import ANY, AUDIO, IMAGE, MODALITIES, TOKENS, Architecture
    from kdray.registry import PluginError

    anything = Architecture("anything", "my_pkg:net", (ANY,))
    assert all(anything.takes(m) for m in MODALITIES)
    cnn = Architecture("cnn", "my_pkg:net", (IMAGE,))
    assert cnn.takes(IMAGE) and cnn.takes(ANY) and not cnn.takes(AUDIO) and not cnn.takes(TOKENS)
    with pytest.raises(PluginError, match=r"dataset 't': unknown input modality 'tabular'; valid: any, image, audio, tokens"):
        Dataset("t", "my_pkg:load", "tabular")
    with pytest.raises(PluginError, match=r"architecture 'm': unknown input modality 'imagee'"):
        Architecture("m", "my_pkg:net", ("imagee",))
