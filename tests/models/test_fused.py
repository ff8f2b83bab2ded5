"""The fused block branches (dinolab.models.fused) against autograd through the plain modules."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinolab.matmul import cpu_matmul, onednn_available, set_cpu_matmul
from dinolab.models import fused
from dinolab.models.layers import Block

BACKENDS = ["blas", "onednn"] if onednn_available() else ["blas"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest):
    previous = cpu_matmul()
    set_cpu_matmul(request.param)
    yield request.param
    set_cpu_matmul(previous)


def _layers(dim: int = 12, hidden: int = 20, bias: bool = True, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    norm = nn.LayerNorm(dim, eps=1e-6).to(dtype)
    fc1, fc2 = nn.Linear(dim, hidden, bias=bias).to(dtype), nn.Linear(hidden, dim, bias=bias).to(dtype)
    gamma = nn.Parameter(torch.empty(dim, dtype=dtype).uniform_(0.2, 1.5))
    with torch.no_grad():  # the norm's affine parameters away from their 1/0 init, so their gradients are tested
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return norm, fc1, fc2, gamma


def _grads(output: torch.Tensor, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    weights = torch.linspace(-1, 1, output.numel(), dtype=output.dtype).view_as(output)
    return list(torch.autograd.grad((output * weights).sum(), inputs))


def _assert_same(fused_out, plain_out, inputs) -> None:
    torch.testing.assert_close(fused_out, plain_out)
    for a, b in zip(_grads(fused_out, inputs), _grads(plain_out, inputs), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_norm_linear_matches_the_modules(backend: str) -> None:
    norm, fc1, _, _ = _layers()
    x = torch.randn(30, 12, requires_grad=True)
    inputs = [x, norm.weight, norm.bias, fc1.weight, fc1.bias]
    _assert_same(fused.norm_linear(x, norm, fc1), fc1(norm(x)), inputs)


@pytest.mark.parametrize(("bias", "scaled"), [(True, True), (False, True), (True, False)])
def test_scaled_linear_matches_the_modules(backend: str, bias: bool, scaled: bool) -> None:
    _, _, fc2, gamma = _layers(bias=bias)  # fc2: 20 -> 12 features, gamma: 12
    x = torch.randn(30, 20, requires_grad=True)
    inputs = [x, fc2.weight, *([fc2.bias] if bias else []), *([gamma] if scaled else [])]
    plain = fc2(x) * gamma if scaled else fc2(x)
    _assert_same(fused.scaled_linear(x, fc2, gamma if scaled else None), plain, inputs)


@pytest.mark.parametrize("scaled", [True, False])
def test_feed_forward_matches_the_modules(backend: str, scaled: bool) -> None:
    norm, fc1, fc2, gamma = _layers()
    x = torch.randn(30, 12, requires_grad=True)
    inputs = [x, norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, *([gamma] if scaled else [])]
    plain = fc2(F.gelu(fc1(norm(x))))
    plain = plain * gamma if scaled else plain
    _assert_same(fused.feed_forward(x, norm, fc1, fc2, gamma if scaled else None), plain, inputs)


def test_gradcheck_in_float64() -> None:
    """Numerical gradients of the written-out backwards (float64 runs the BLAS path)."""
    norm, fc1, fc2, gamma = _layers(dim=5, hidden=7, dtype=torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    params = [norm.weight, norm.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, gamma]

    def branches(x, nw, nb, w1, b1, w2, b2, g):
        eps = norm.eps
        hidden = fused._NormLinear.apply(x, nw, nb, eps, w1, b1)
        out = fused._ScaledLinear.apply(torch.tanh(hidden), w2, b2, g)
        return fused._FeedForward.apply(out, nw, nb, eps, w1, b1, w2, b2, g)

    assert torch.autograd.gradcheck(branches, (x, *params))


def test_only_parameters_that_need_gradients_get_them(backend: str) -> None:
    norm, fc1, fc2, gamma = _layers()
    for p in (norm.weight, fc1.weight, gamma):
        p.requires_grad_(False)
    x = torch.randn(10, 12)  # no gradient wanted for the input either
    out = fused.feed_forward(x, norm, fc1, fc2, gamma)
    grads = torch.autograd.grad(out.square().sum(), [norm.bias, fc1.bias, fc2.weight, fc2.bias])
    plain = fc2(F.gelu(fc1(norm(x)))) * gamma
    ref = torch.autograd.grad(plain.square().sum(), [norm.bias, fc1.bias, fc2.weight, fc2.bias])
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_applies_only_to_fp32_cpu_training() -> None:
    x = torch.randn(3, 4)
    assert fused.applies(x)
    assert not fused.applies(x.bfloat16())
    with torch.no_grad():
        assert not fused.applies(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused.applies(x)


def _kept_widths(block: Block, groups: list[torch.Tensor]) -> tuple[float, list[torch.Tensor]]:
    """What the forward leaves allocated (outputs and what autograd keeps; the profiler's count of CPU allocations
    minus frees) in widths per token, and the outputs and gradients."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(7)  # the same drop-path draws in every run
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = block(groups)
    kept = sum(event.self_cpu_memory_usage for event in prof.events())
    grads = torch.autograd.grad(sum(o.square().sum() for o in out), [*groups, *block.parameters()])
    tokens = sum(g.shape[0] * g.shape[1] for g in groups)
    return kept / (tokens * block.norm1.weight.numel() * 4), [o.detach() for o in out] + list(grads)


def test_block_branches_match_the_modules_and_keep_less(backend: str) -> None:
    """A training block (packed groups, layer scale, drop-path) gives the same outputs and gradients through the
    fused branches and through the modules, and keeps about 10 widths per token instead of 17 (selective
    checkpointing: 9; output included, a fifth of the samples dropped): the numbers behind
    dinolab.train.parallel.ACTIVATIONS_PER_TOKEN."""
    torch.manual_seed(0)
    block = Block(dim=64, num_heads=4, init_values=0.5, drop_path=0.2)
    with torch.no_grad():
        block.ls1.gamma.uniform_(0.2, 1.5)
        block.ls2.gamma.uniform_(0.2, 1.5)
    groups = [torch.randn(8, 65, 64, requires_grad=True), torch.randn(8, 17, 64, requires_grad=True)]
    fused_widths, fused_results = _kept_widths(block, groups)
    block.activation_checkpointing = "selective"
    selective_widths, _ = _kept_widths(block, groups)
    block.activation_checkpointing = "none"
    block.fused_branches = False
    plain_widths, plain_results = _kept_widths(block, groups)
    for a, b in zip(fused_results, plain_results, strict=True):  # fp32 sums in other orders
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    assert fused_widths < 0.7 * plain_widths
    assert selective_widths < fused_widths < 1.35 * selective_widths


def test_full_checkpointing_recomputes_the_fused_branches_exactly() -> None:
    """Under full checkpointing the fused branches run in the first forward and again in the recomputation: the
    same outputs and gradients as without checkpointing, and only the block's input kept."""
    torch.manual_seed(0)
    block = Block(dim=64, num_heads=4, init_values=0.5, drop_path=0.2)
    groups = [torch.randn(8, 65, 64, requires_grad=True), torch.randn(8, 17, 64, requires_grad=True)]
    _, kept = _kept_widths(block, groups)
    block.activation_checkpointing = "full"
    widths, recomputed = _kept_widths(block, groups)
    for a, b in zip(recomputed, kept, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert widths < 1.5
