"""Grouped forward (kdray/stacked/sequential.py): K students as grouped convolutions equal the same students
run one at a time, outputs and gradients, and anything it does not know is left to vmap."""
import pytest
import torch
from torch import nn
from torch.func import functional_call, stack_module_state

from kdray.stacked import stacked_forward
from kdray.stacked.sequential import grouped_forward
from kdray.models.small import mlp, small_cnn
from kdray.models.gpt import pico_gpt


def _strided_net():
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1, bias=False), nn.GELU(), nn.MaxPool2d(2),
                         nn.Conv2d(6, 4, 1, groups=2), nn.Tanh(), nn.Flatten(), nn.Dropout(0.0), nn.Linear(64, 5))


CASES = {
    "small_cnn": (lambda: small_cnn(10, (1, 8, 8), channels=4, dropout=0.0, batch_norm=False), (1, 8, 8)),
    "mlp": (lambda: mlp(7, (1, 8, 8), hidden=16, dropout=0.0), (1, 8, 8)),
    "strided": (_strided_net, (3, 16, 16)),
}


@pytest.mark.parametrize("name", CASES)
def test_grouped_students_equal_each_student_alone(name):
    build, shape = CASES[name]
    torch.manual_seed(0)
    models = [build() for _ in range(5)]
    params, _ = stack_module_state(models)
    x = torch.randn(5, 6, *shape)
    fwd = grouped_forward(models[0])
    assert fwd is not None
    out = fwd(params, {}, x)
    out.square().sum().backward()
    for i, m in enumerate(models):
        alone = functional_call(m, {n: p[i].detach().requires_grad_() for n, p in params.items()}, (x[i],))
        assert out[i].shape == alone.shape
        torch.testing.assert_close(out[i], alone, rtol=1e-5, atol=1e-6)
        m.zero_grad()
        m(x[i]).square().sum().backward()
        for n, p in m.named_parameters():     # each student's gradient is its own loss's, nobody else's
            torch.testing.assert_close(params[n].grad[i], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False), nn.Flatten(), nn.LayerNorm(72)),
    nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten()),
    nn.Sequential(nn.Flatten(0), nn.Linear(64, 2)),
    pico_gpt(65, (16,), n_embd=16, n_head=2, n_layer=1, dropout=0.0),         # not a Sequential
], ids=["layernorm", "reflect-padding", "flatten-dim0", "gpt"])
def test_what_it_does_not_know_is_left_to_vmap(model):
    assert grouped_forward(model) is None


def test_tied_weights_are_left_to_vmap():
    lin = nn.Linear(4, 4)
    assert grouped_forward(nn.Sequential(lin, nn.ReLU(), lin)) is None


GPTS = {
    "tied": dict(n_embd=16, n_head=2, n_layer=2),
    "untied-bias": dict(n_embd=12, n_head=3, n_layer=1, tie_weights=False, bias=True),
    "long": dict(n_embd=8, n_head=2, n_layer=1, block_size=40),      # the fused attention kernel (T > 32)
}


@pytest.mark.parametrize("name", GPTS)
def test_stacked_gpt_students_equal_each_student_alone(name):
    """kdray/stacked/gpt.py: logits and every parameter's gradient, student by student; a tied
    head and embedding weight gets both of its gradients."""
    torch.manual_seed(0)
    models = [pico_gpt(11, (GPTS[name].get("block_size", 8),), dropout=0.0, **GPTS[name]) for _ in range(4)]
    params, _ = stack_module_state(models)
    fwd = stacked_forward(models[0])
    assert fwd is not None
    t = GPTS[name].get("block_size", 8)
    idx = torch.randint(0, 11, (4, 3, t))
    out = fwd(params, {}, idx)
    out.square().sum().backward()
    for i, m in enumerate(models):
        alone = m(idx[i])
        torch.testing.assert_close(out[i], alone, rtol=1e-5, atol=1e-6)
        m.zero_grad()
        alone.square().sum().backward()
        for n, p in m.named_parameters():
            torch.testing.assert_close(params[n].grad[i], p.grad, rtol=1e-4, atol=1e-6)


def test_a_gpt_with_dropout_or_a_subclass_is_left_to_vmap():
    from kdray.models.gpt import GPT

    assert stacked_forward(pico_gpt(11, (8,), n_embd=8, n_head=2, n_layer=1, dropout=0.1)) is None

    class Wider(GPT):
        def forward(self, idx):
            return super().forward(idx) * 2

    assert stacked_forward(Wider(11, 8, 8, 2, 1, 0.0, False, True)) is None


def _bn_net(momentum):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=momentum), nn.ReLU(),
                         nn.Flatten(), nn.Dropout(0.3), nn.Linear(256, 8), nn.BatchNorm1d(8), nn.Dropout(0.5),
                         nn.Linear(8, 5))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum", "cumulative"])
def test_batchnorm_and_dropout_per_student_equal_each_student_alone(momentum):
    """Three training steps: each student's outputs, gradients and running statistics as when it
    trains alone, where dropout draws from the global generator seeded with the student's seed
    (run_trial does this); then eval mode uses each student's running statistics."""
    from kdray.recipe import derive_seed

    torch.manual_seed(0)
    models = [_bn_net(momentum) for _ in range(3)]
    seeds = [derive_seed(s, "dropout") for s in (10, 11, 12)]
    params, buffers = stack_module_state(models)
    fwd = grouped_forward(models[0])
    assert fwd is not None
    rngs = [torch.Generator().manual_seed(s) for s in seeds]
    xs = torch.randn(3, 3, 4, 3, 8, 8)           # step, student, batch, ...
    packed = []
    models[0].train()
    for x in xs:
        out = fwd(params, buffers, x, rngs)
        packed.append(out.detach().clone())
    out.square().sum().backward()                # the last step's gradients
    for i, m in enumerate(models):
        torch.manual_seed(seeds[i])
        m.train()
        for step, x in enumerate(xs):
            alone = m(x[i])
            torch.testing.assert_close(packed[step][i], alone.detach(), rtol=1e-5, atol=1e-6)
        alone.square().sum().backward()
        # a bias before a BatchNorm has gradient 0 up to rounding of the sums it cancels: absolute
        # tolerance on the model's gradient scale
        scale = max(float(p.grad.abs().max()) for p in m.parameters())
        for n, p in m.named_parameters():
            torch.testing.assert_close(params[n].grad[i], p.grad, rtol=1e-4, atol=2e-6 * scale)
        for n, b in m.named_buffers():           # running statistics and num_batches_tracked
            torch.testing.assert_close(buffers[n][i], b, rtol=1e-5, atol=1e-6)
    models[0].eval()
    x = torch.randn(3, 4, 3, 8, 8)
    out = fwd(params, buffers, x, rngs)
    for i, m in enumerate(models):
        torch.testing.assert_close(out[i], m.eval()(x[i]), rtol=1e-5, atol=1e-6)
    assert not torch.equal(packed[0][0], packed[0][1])      # three different students


def test_a_model_family_registers_its_own_stacked_forward():
    """kdray.stacked.register: a plug-in model class gets its own forward; others are unchanged."""
    from kdray import stacked

    class Doubler(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return x * self.w * 2

    assert stacked_forward(Doubler()) is None
    stacked.register(Doubler, lambda model: lambda p, b, x, rngs=(): x * p["w"][:, None, :] * 2)
    try:
        fwd = stacked_forward(Doubler())
        x = torch.randn(2, 4, 3)
        p = {"w": torch.stack([torch.ones(3), torch.full((3,), 3.0)])}
        assert torch.equal(fwd(p, {}, x), torch.stack([x[0] * 2, x[1] * 6]))
        assert stacked_forward(pico_gpt(11, (8,), n_embd=8, n_head=2, n_layer=1, dropout=0.0)) is not None
    finally:
        stacked._BUILDERS.pop(Doubler)
