"""A transformer block's branches as autograd functions that keep less for backward (CPU fp32 training).

Autograd through ``layer_norm -> linear`` keeps both the norm's input and its output; through ``fc1 -> GELU ->
fc2`` both the GELU's input and output; through ``linear -> layer scale`` the linear's output besides its input.
For a ViT block that is about 17 activations of the block's width per token (a fifth of the samples dropped).
These functions keep only what cannot be recomputed cheaply: the norm's input and statistics (its output is
recomputed, one element-wise pass), the GELU's input (its output is recomputed), and the layer scale is folded
into the weight of the linear layer before it (``(x W^T + b) * gamma = x (gamma W)^T + gamma b``; gamma's gradient
comes from the weight gradient, ``sum_k W_jk G_jk + b_j gb_j``). With the output projection run per crop size on
views of the attention's output (dinolab.models.layers.Block._attn_branch), a block keeps about 10 widths per
token and, unlike selective checkpointing, runs no operator twice but the norms and the GELU, with no
per-operator bookkeeping.

The products run in the CPU backend dinolab.matmul selects (oneDNN or the BLAS); the backward is written out and
tested against autograd through the plain modules (tests/models/test_fused.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dinolab.matmul import input_gradient, product


def applies(x: Tensor) -> bool:
    """Whether the fused branches run for the tokens ``x``: fp32 CPU training (gradients on) outside autocast and
    compile. Elsewhere (GPUs, bf16, inference) the plain modules run."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.is_grad_enabled()
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def norm_linear(x: Tensor, norm: torch.nn.LayerNorm, linear: torch.nn.Linear) -> Tensor:
    """``linear(norm(x))`` for ``x [N, D]``, keeping ``x`` and the norm's statistics instead of ``norm(x)``."""
    return _NormLinear.apply(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)


def scaled_linear(x: Tensor, linear: torch.nn.Linear, gamma: Tensor | None) -> Tensor:
    """``linear(x) * gamma`` (a layer scale; ``gamma=None``: none) for ``x [N, in]``, keeping only ``x``."""
    return _ScaledLinear.apply(x, linear.weight, linear.bias, gamma)


def feed_forward(
    x: Tensor, norm: torch.nn.LayerNorm, fc1: torch.nn.Linear, fc2: torch.nn.Linear, gamma: Tensor | None
) -> Tensor:
    """``fc2(gelu(fc1(norm(x)))) * gamma`` for ``x [N, D]``, keeping ``x``, the norm's statistics and ``fc1``'s
    output only."""
    return _FeedForward.apply(x, norm.weight, norm.bias, norm.eps, fc1.weight, fc1.bias, fc2.weight, fc2.bias, gamma)


# ---------------------------------------------------------------------------------------------- pieces
def _layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``(normalised, mean, rstd)``; called again in backward, it gives the same ``normalised`` bit for bit."""
    return torch.native_layer_norm(x, (x.shape[-1],), weight, bias, eps)


def _layer_norm_backward(
    grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, weight: Tensor | None, bias: Tensor | None, needs: tuple
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    mask = [needs[0], weight is not None and needs[1], bias is not None and needs[2]]
    return torch.ops.aten.native_layer_norm_backward(grad, x, (x.shape[-1],), mean, rstd, weight, bias, mask)


def _scaled(weight: Tensor, bias: Tensor | None, gamma: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The layer scale folded into the linear layer before it: ``(gamma W, gamma b)``."""
    if gamma is None:
        return weight, bias
    return weight * gamma[:, None], None if bias is None else bias * gamma


def _linear_grads(
    grad: Tensor, inputs: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor | None, needs: tuple
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """``(d/dW, d/db, d/dgamma)`` of ``(inputs W^T + b) * gamma`` from the output gradient ``grad``: with
    ``G = grad^T inputs`` and ``gb = sum_rows grad``, ``d/dW = gamma G``, ``d/db = gamma gb`` and
    ``d/dgamma = sum_k W_k G_k + b gb`` (the gradient of the unscaled output times it, summed over rows)."""
    needs_w, needs_b, needs_gamma = needs
    weight_grad = grad.t() @ inputs if needs_w or needs_gamma else None
    bias_grad = grad.sum(0) if bias is not None and (needs_b or needs_gamma) else None
    if gamma is None:
        return weight_grad, bias_grad, None
    gamma_grad = None
    if needs_gamma:
        gamma_grad = torch.einsum("jk,jk->j", weight, weight_grad)
        if bias_grad is not None:
            gamma_grad += bias * bias_grad
    weight_grad = weight_grad * gamma[:, None] if needs_w else None
    bias_grad = bias_grad * gamma if bias_grad is not None and needs_b else None
    return weight_grad, bias_grad, gamma_grad


# ---------------------------------------------------------------------------------------------- functions
class _NormLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, norm_w, norm_b, eps: float, weight: Tensor, bias: Tensor | None) -> Tensor:
        normed, mean, rstd = _layer_norm(x, norm_w, norm_b, eps)
        ctx.eps = eps
        ctx.save_for_backward(x, mean, rstd, norm_w, norm_b, weight, bias)
        return product(normed, weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, rstd, norm_w, norm_b, weight, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        normed = _layer_norm(x, norm_w, norm_b, ctx.eps)[0]
        weight_grad, bias_grad, _ = _linear_grads(grad, normed, weight, bias, None, (needs[4], needs[5], False))
        del normed
        grad_x, grad_nw, grad_nb = _layer_norm_backward(
            input_gradient(grad, weight), x, mean, rstd, norm_w, norm_b, needs[:3]
        )
        return grad_x, grad_nw, grad_nb, None, weight_grad, bias_grad


class _ScaledLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, gamma: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight, bias, gamma)
        return product(x, *_scaled(weight, bias, gamma))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight, bias, gamma = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = _linear_grads(grad, x, weight, bias, gamma, needs[1:])
        grad_x = input_gradient(grad, _scaled(weight, None, gamma)[0]) if needs[0] else None
        return grad_x, *grads


class _FeedForward(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, norm_w, norm_b, eps: float, w1: Tensor, b1, w2: Tensor, b2, gamma: Tensor | None
    ) -> Tensor:
        normed, mean, rstd = _layer_norm(x, norm_w, norm_b, eps)
        hidden = product(normed, w1, b1)
        del normed
        ctx.eps = eps
        ctx.save_for_backward(x, mean, rstd, hidden, norm_w, norm_b, w1, b1, w2, b2, gamma)
        return product(F.gelu(hidden), *_scaled(w2, b2, gamma))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, mean, rstd, hidden, norm_w, norm_b, w1, b1, w2, b2, gamma = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # fc2 and the layer scale, from the recomputed GELU
        w2_grad, b2_grad, gamma_grad = _linear_grads(grad, F.gelu(hidden), w2, b2, gamma, needs[6:9])
        grad_hidden = torch.ops.aten.gelu_backward(input_gradient(grad, _scaled(w2, None, gamma)[0]), hidden)
        # fc1, from the recomputed norm
        normed = _layer_norm(x, norm_w, norm_b, ctx.eps)[0]
        w1_grad, b1_grad, _ = _linear_grads(grad_hidden, normed, w1, b1, None, (needs[4], needs[5], False))
        del normed
        grad_x, grad_nw, grad_nb = _layer_norm_backward(
            input_gradient(grad_hidden, w1), x, mean, rstd, norm_w, norm_b, needs[:3]
        )
        return grad_x, grad_nw, grad_nb, None, w1_grad, b1_grad, w2_grad, b2_grad, gamma_grad
