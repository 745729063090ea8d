"""Every registered architecture at toy size: shapes, gradients, seeded init, hooks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdray.models import MODELS, block_output, build_model
from kdray.models.gpt import scaled_n_embd
from kdray.models.resnet import BlurPool2d

VOCAB = 11
TINY_GPT = dict(n_embd=48, n_head=6, n_layer=2, dropout=0.1)

# name -> (input_shape, builder args, expected logits shape for batch 2).  Every
# registered name needs an entry: a new model fails test_every_model_has_a_case.
CASES: dict[str, tuple[tuple[int, ...], dict, tuple[int, ...]]] = {
    "mlp": ((1, 8, 8), dict(hidden=16), (2, 5)),
    "small_cnn": ((1, 8, 8), dict(channels=4), (2, 5)),
    "resnet18": ((3, 32, 32), {}, (2, 5)),
    "resnet50": ((3, 32, 32), {}, (2, 5)),
    "vgg19": ((3, 32, 32), {}, (2, 5)),
    "vgg19_bn": ((3, 32, 32), {}, (2, 5)),
    "vit": ((3, 32, 32), dict(patch_size=8, dim=32, depth=2, heads=4, mlp_dim=64), (2, 5)),
    "vggish": ((1, 8, 8), dict(width=0.25), (2, 5)),
    "ast": ((32, 40), dict(dim=32, depth=2, heads=4), (2, 5)),   # default 16/10 overlapping patches
    "nano_gpt": ((16,), TINY_GPT, (2, 16, VOCAB)),
    "pico_gpt": ((16,), dict(TINY_GPT, n_embd=24), (2, 16, VOCAB)),
    "hf_causal_lm": ((16,), dict(config={"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2,
                                         "n_positions": 16}), (2, 16, VOCAB)),     # needs kdray[lm]
}
LM = {"nano_gpt", "pico_gpt", "hf_causal_lm"}


def _build(name: str, seed: int = 0, **extra) -> nn.Module:
    if MODELS.get(name).missing():       # an optional extra: CI installs it, elsewhere say what is missing
        from test_lm import require_lm
        require_lm()
    shape, args, out = CASES[name]
    torch.manual_seed(seed)
    n_out = out[-1]
    return build_model(name, n_out, shape, **{**args, **extra})


def _input(name: str, batch: int = 2) -> torch.Tensor:
    shape = CASES[name][0]
    if name in LM:
        return torch.randint(0, VOCAB, (batch, *shape))
    return torch.randn(batch, *shape)


def test_every_model_has_a_case():
    assert set(MODELS.names()) - set(CASES) == set(), "add a tiny case to CASES for every new model"


@pytest.mark.parametrize("name", MODELS.names())
def test_forward_backward(name):
    if name not in CASES:
        pytest.fail(f"no tiny case for {name!r} in CASES")
    model = _build(name)
    model.train()
    out = model(_input(name))
    assert out.shape == CASES[name][2]
    out.float().pow(2).mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}: no gradient for {pname}"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient for {pname}"


@pytest.mark.parametrize("name", MODELS.names())
def test_init_is_a_function_of_the_torch_seed(name):
    if name not in CASES:
        pytest.fail(f"no tiny case for {name!r} in CASES")
    a, b, c = _build(name, 0).state_dict(), _build(name, 0).state_dict(), _build(name, 1).state_dict()
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_gpt_width_scaling():
    # the paper's Nano-GPT (n_embd 384, 6 heads) from 10% to 100% width
    assert [scaled_n_embd(384, 6, w / 10) for w in range(1, 11)] == [36, 78, 114, 156, 192, 228, 270, 306,
                                                                     348, 384]
    assert scaled_n_embd(48, 6, 0.01) == 6
    for step in range(1, 11):
        width = step / 10
        model = build_model("nano_gpt", VOCAB, (16,), **dict(TINY_GPT, n_layer=1), width=width)
        n = model.wte.embedding_dim
        assert n == scaled_n_embd(48, 6, width) and n % 6 == 0 and n >= 6
        assert model(torch.randint(0, VOCAB, (1, 16))).shape == (1, 16, VOCAB)
    with pytest.raises(ValueError):
        build_model("nano_gpt", VOCAB, (16,), n_embd=50, n_head=6)


def test_gpt_is_causal():
    model = _build("nano_gpt").eval()
    x = _input("nano_gpt", 1)
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % VOCAB
    with torch.no_grad():
        assert torch.allclose(model(x)[:, :-1], model(y)[:, :-1], atol=1e-6)


@pytest.mark.parametrize("name, block, width", [("nano_gpt", 2, 48), ("vit", 1, 32), ("ast", 2, 32)])
def test_block_output_hook(name, block, width):
    model = _build(name)
    x = _input(name)
    tokens = {"nano_gpt": 16, "vit": 1 + (32 // 8) ** 2, "ast": 1 + 2 * 3}[name]   # ast: 32x40, 16/10
    with block_output(model, block) as box:
        model(x)
    assert box["out"].shape == (2, tokens, width)
    with pytest.raises(ValueError):
        with block_output(model, len(model.blocks) + 1):
            pass


def test_resnet18_blurpool_and_stems():
    torch.manual_seed(0)
    model = build_model("resnet18", 5, (3, 32, 32), blurpool=True)
    # FFCV: every stride-2 conv with >= 16 input channels (3 stages x (conv1 + downsample))
    assert sum(isinstance(m, BlurPool2d) for m in model.modules()) == 6
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert model.conv1.kernel_size == (3, 3) and isinstance(model.maxpool, nn.Identity)
    big = build_model("resnet18", 5, (1, 96, 96))      # ImageNet stem above 64 px, 1 channel
    assert big.conv1.kernel_size == (7, 7) and big.conv1.in_channels == 1
    half = build_model("resnet50", 5, (3, 32, 32), width=0.25)
    assert half.fc.in_features == 512 and half(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    with pytest.raises(ValueError):
        build_model("resnet50", 5, (3, 32, 32), weights="IMAGENET1K_V2")


def test_spectrogram_models_take_2d_or_3d_shapes():
    torch.manual_seed(0)
    for name, args in [("vggish", dict(width=0.125)), ("ast", dict(dim=32, depth=1, heads=2))]:
        for shape in [(32, 100), (1, 32, 100)]:
            model = build_model(name, 4, shape, **args)
            assert model(torch.randn(2, *shape)).shape == (2, 4)
    assert build_model("vggish", 4, (1, 3, 5), width=0.125)(torch.randn(2, 1, 3, 5)).shape == (2, 4)
    with pytest.raises(ValueError):
        build_model("ast", 4, (8, 8))                      # default 16x16 patch > spectrogram
