"""The CPU linear backend (dinolab.matmul): oneDNN's products give F.linear's values and gradients, fall back where
they do not apply, survive selective activation checkpointing, and the choice is explicit, validated and restored."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dinolab import matmul
from dinolab.matmul import Linear, choose_cpu_matmul, cpu_matmul, linear, set_cpu_matmul
from dinolab.models.layers import Block

pytestmark = pytest.mark.skipif(not matmul.onednn_available(), reason="this torch has no oneDNN linear kernel")


@pytest.fixture
def onednn():
    previous = cpu_matmul()
    set_cpu_matmul("onednn")
    yield
    set_cpu_matmul(previous)


@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 12)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_values_and_gradients_equal_f_linear(onednn, shape, with_bias):
    torch.manual_seed(0)
    x = torch.randn(*shape, requires_grad=True)
    weight = torch.randn(9, 12, requires_grad=True)
    bias = torch.randn(9, requires_grad=True) if with_bias else None
    inputs = [x, weight] + ([bias] if with_bias else [])
    upstream = torch.randn(*shape[:-1], 9)
    ours = linear(x, weight, bias)
    assert ours.grad_fn is not None and "OneDNN" in type(ours.grad_fn).__name__  # the oneDNN path was taken
    reference = F.linear(x, weight, bias)
    torch.testing.assert_close(ours, reference)
    ours_grads = torch.autograd.grad(ours, inputs, upstream)
    reference_grads = torch.autograd.grad(reference, inputs, upstream)
    for a, b in zip(ours_grads, reference_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_only_the_inputs_that_need_it_get_a_gradient(onednn):
    x = torch.randn(4, 6)
    weight = torch.randn(3, 6, requires_grad=True)
    (grad_w,) = torch.autograd.grad(linear(x, weight).sum(), [weight])
    torch.testing.assert_close(grad_w, torch.ones(4, 3).t() @ x)


def test_falls_back_to_f_linear_outside_fp32_cpu(onednn):
    x, weight = torch.randn(4, 6, dtype=torch.float64, requires_grad=True), torch.randn(3, 6, dtype=torch.float64)
    assert "OneDNN" not in type(linear(x, weight).grad_fn).__name__
    x32 = torch.randn(4, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x32, torch.randn(3, 6))
    assert out.dtype == torch.bfloat16 and "OneDNN" not in type(out.grad_fn).__name__


def test_linear_module_is_an_nn_linear_with_the_same_state():
    torch.manual_seed(0)
    ours = Linear(6, 3)
    torch.manual_seed(0)
    theirs = nn.Linear(6, 3)
    assert isinstance(ours, nn.Linear) and ours.state_dict().keys() == theirs.state_dict().keys()
    for key in theirs.state_dict():
        torch.testing.assert_close(ours.state_dict()[key], theirs.state_dict()[key])


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_block_gradients_with_onednn_and_checkpointing_equal_torch_path(mode):
    """A training block (stochastic depth, packed groups) through oneDNN with activation checkpointing gives the
    gradients of torch's own path without checkpointing: the oneDNN products are saved, not recomputed wrongly."""
    torch.manual_seed(0)
    block = Block(dim=24, num_heads=4, drop_path=0.3).train()
    xs = [torch.randn(4, 9, 24), torch.randn(4, 5, 24)]

    def grads(backend: str, checkpointing: str) -> list[torch.Tensor]:
        previous = cpu_matmul()
        set_cpu_matmul(backend)
        try:
            block.activation_checkpointing = checkpointing
            block.zero_grad()
            inputs = [x.clone().requires_grad_() for x in xs]
            torch.manual_seed(1)  # the same samples dropped
            outputs = block(inputs)
            sum((o * torch.arange(o.numel()).view_as(o).sin()).sum() for o in outputs).backward()
            return [x.grad for x in inputs] + [p.grad.clone() for p in block.parameters()]
        finally:
            set_cpu_matmul(previous)

    for ours, reference in zip(grads("onednn", mode), grads("blas", "none"), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_choice_is_validated_and_auto_picks_a_backend():
    previous = cpu_matmul()
    try:
        assert choose_cpu_matmul("blas", []) == "blas" == cpu_matmul()
        assert choose_cpu_matmul("onednn", []) == "onednn" == cpu_matmul()
        assert choose_cpu_matmul("auto", [(256, 32, 64)], repeats=1) in ("blas", "onednn")
        with pytest.raises(ValueError, match="must be one of"):
            choose_cpu_matmul("mkl", [])
        with pytest.raises(ValueError, match="must be one of"):
            set_cpu_matmul("auto")
    finally:
        set_cpu_matmul(previous)


def test_selective_checkpointing_keeps_the_onednn_products():
    from dinolab.models.layers import _matmul_and_attention_ops

    assert torch.ops.mkldnn._linear_pointwise.default in _matmul_and_attention_ops()
