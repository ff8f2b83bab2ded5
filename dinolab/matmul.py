"""The CPU backend of the linear layers: the BLAS torch links (MKL) or oneDNN, whichever is faster on this CPU.

A fp32 ``F.linear`` on the CPU runs in the BLAS library torch was built with. On some CPUs oneDNN, which torch also
ships (``torch.ops.mkldnn._linear_pointwise``, the kernel ``torch.compile`` uses for CPU linears), is much faster:
on the 2-core AMD EPYC we test on, it runs a ViT-S/14's forward products and input gradients 1.06-1.46x faster than
MKL (``benchmarks/cpu_matmul.py``). The weight gradient's operands arrive transposed; oneDNN needs them copied
row-major first, and with the copies it was slower than torch's matmul (76-88 against 132-154 GFLOP/s). So
:func:`linear` runs the forward product and the input gradient in oneDNN and the weight gradient in torch's matmul
when the oneDNN backend is selected; the result is the same fp32 product, rounded in another order.

The backend is process-wide: ``blas`` (torch's own path, the default), ``onednn``, or chosen by
:func:`choose_cpu_matmul`, which times both on the model's layer shapes (2.2 s for a ViT-S/14 at batch 8) and keeps oneDNN only
when it is clearly faster. The trainer does this on CPUs (``run.cpu_matmul=auto``). Only fp32 CPU products
outside autocast and ``torch.compile`` take the oneDNN path; everything else is ``F.linear``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

CPU_MATMUL_BACKENDS = ("auto", "blas", "onednn")
_ONEDNN_MARGIN = 1.05  # oneDNN is chosen when it is at least this much faster: an even race keeps torch's path
_state = {"backend": "blas"}


def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear kernel (``torch.ops.mkldnn._linear_pointwise``)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def set_cpu_matmul(backend: str) -> None:
    """Select the CPU linear backend for this process: ``blas`` or ``onednn`` (``auto``: see choose_cpu_matmul)."""
    if backend not in CPU_MATMUL_BACKENDS[1:]:
        raise ValueError(f"CPU matmul backend must be one of {CPU_MATMUL_BACKENDS[1:]}, got {backend!r}")
    if backend == "onednn" and not onednn_available():
        raise RuntimeError("this torch build has no oneDNN linear kernel; use the 'blas' CPU matmul backend")
    _state["backend"] = backend


def cpu_matmul() -> str:
    """The CPU linear backend in use: ``blas`` or ``onednn``."""
    return _state["backend"]


def _uses_onednn(x: Tensor, weight: Tensor) -> bool:
    return (
        _state["backend"] == "onednn"
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, through oneDNN for fp32 CPU tensors when that backend is selected (same values, same grads)."""
    if _uses_onednn(x, weight):
        return _OneDNNLinear.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def product(rows: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``rows [N, in] @ weight[out, in].T + bias`` in the selected backend, outside autograd (for the forward of
    autograd functions that write their backward out, as :func:`linear`'s and dinolab.models.fused's do)."""
    return _onednn_product(rows, weight, bias) if _uses_onednn(rows, weight) else F.linear(rows, weight, bias)


def input_gradient(grad_rows: Tensor, weight: Tensor) -> Tensor:
    """``grad [N, out] @ weight [out, in]``, the input gradient of :func:`product`, in the selected backend."""
    if _uses_onednn(grad_rows, weight):  # a linear layer whose weight is weight.T ([in, out])
        return _onednn_product(grad_rows, weight.t().contiguous(), None)
    return grad_rows @ weight


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, keys and init) whose CPU product follows :func:`set_cpu_matmul`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def _onednn_product(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x [N, in] @ weight[out, in].T + bias`` in oneDNN."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """The forward product and the input gradient in oneDNN; the weight gradient (a reduction over every token,
    where the BLAS is faster) in torch's matmul."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        rows = x.reshape(-1, x.shape[-1])
        ctx.save_for_backward(rows, weight)
        ctx.input_shape, ctx.has_bias = x.shape, bias is not None
        return _onednn_product(rows, weight, bias).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        rows, weight = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = input_gradient(grad_rows, weight).view(ctx.input_shape)
        if ctx.needs_input_grad[1]:
            grad_w = grad_rows.t() @ rows
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_rows.sum(0)
        return grad_x, grad_w, grad_b


# ------------------------------------------------------------------------------------------------ the choice
def choose_cpu_matmul(requested: str, shapes: list[tuple[int, int, int]], repeats: int = 5) -> str:
    """Select and return the CPU backend for ``requested`` (``auto``, ``blas`` or ``onednn``).

    ``auto`` times a forward product and an input gradient of every ``(tokens, in, out)`` in ``shapes`` (the
    model's linear layers at its batch) with both backends, best of ``repeats``, and keeps oneDNN when it is at
    least 5 % faster; the timings are logged. Without a oneDNN kernel, ``auto`` is ``blas``.
    """
    if requested not in CPU_MATMUL_BACKENDS:
        raise ValueError(f"CPU matmul backend must be one of {CPU_MATMUL_BACKENDS}, got {requested!r}")
    if requested == "auto":
        requested = "blas"
        if onednn_available():
            blas, onednn = _time_products(shapes, repeats)
            requested = "onednn" if blas > _ONEDNN_MARGIN * onednn else "blas"
            logger.info(
                "CPU linear layers: %s (BLAS %.3f s, oneDNN %.3f s on the model's shapes)", requested, blas, onednn
            )
    set_cpu_matmul(requested)
    return requested


def _time_products(shapes: list[tuple[int, int, int]], repeats: int) -> tuple[float, float]:
    """Best-of seconds of ``F.linear`` + ``grad @ W`` over ``shapes`` for the BLAS and for oneDNN."""
    generator = torch.Generator().manual_seed(0)
    operands = []
    for tokens, fan_in, fan_out in shapes:
        x = torch.randn(tokens, fan_in, generator=generator)
        weight = torch.randn(fan_out, fan_in, generator=generator)
        operands.append((x, weight, torch.randn(tokens, fan_out, generator=generator)))

    def blas() -> None:
        for x, weight, grad in operands:
            F.linear(x, weight)
            grad @ weight

    def onednn() -> None:
        for x, weight, grad in operands:
            _onednn_product(x, weight, None)
            _onednn_product(grad, weight.t().contiguous(), None)

    best = {blas: float("inf"), onednn: float("inf")}
    for _ in range(repeats + 1):  # the first round warms both up (oneDNN builds its kernels on first use)
        for fn in best:
            start = time.perf_counter()
            fn()
            best[fn] = min(best[fn], time.perf_counter() - start)
    return best[blas], best[onednn]
