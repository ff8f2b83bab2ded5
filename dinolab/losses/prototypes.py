"""Cross-entropy against the prototypes without holding the ``[rows, K]`` logits: chunked, recomputed in backward.

With K = 65536 prototypes the logits of a few hundred masked patches, their log-softmax, the product with the
targets and the gradients of each are ~180 MB apiece at fp32 per 700 rows. Here the prototype layer and the loss run
chunk by chunk in one autograd function with its gradient written out: the forward keeps only each row's loss and
log-sum-exp, the backward recomputes one chunk's logits at a time and turns them into their gradient in place. The
extra cost is one ``[chunk, D] x [D, K]`` matmul per chunk (none when everything fits in one chunk).

A weight-normalised prototype layer (``g * v / ||v||``, as in the DINO heads) is taken as its ``v`` and ``g``: the
normalisation scales the logits' columns instead of making a ``[K, D]`` copy of the weight, which would be held
from the forward to the backward (67 MB per head at K = 65536, D = 256), and the gradients reach ``v`` and ``g``
directly rather than through the weight-norm's backward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def default_chunk_elements(device: torch.device) -> int:
    """Logits per chunk: 16 MB (fp32) on CPUs, where memory is the point; 256 MB on GPUs, where each chunk costs
    kernel launches and a few large chunks run as fast as the full logits."""
    return 2**22 if device.type == "cpu" else 2**26


def prototype_cross_entropy(
    features: Tensor,
    prototypes: Tensor,
    targets: Tensor | Sequence[Tensor],
    temp: float,
    chunk_elements: int | None = None,
    magnitudes: Tensor | None = None,
) -> Tensor:
    """Per-row ``-sum_k targets[r, k] * log_softmax(features[r] @ prototypes.T / temp)[k]``, in fp32.

    Args:
        features: ``[R, D]`` the rows (the head's L2-normalised bottleneck features).
        prototypes: ``[K, D]`` the prototype layer's weight; with ``magnitudes``, its weight-norm direction ``v``.
        targets: ``[R, K]`` probabilities (or sums of probabilities: any non-negative weights), or consecutive
            segments ``[R_i, K]`` with ``sum R_i = R`` (so targets kept apart, or one tensor repeated, need not be
            concatenated into a copy). Constants: no gradient flows to them.
        temp: the softmax temperature.
        chunk_elements: logits held at once (rows per chunk = ``max(1, chunk_elements // K)``); default:
            :func:`default_chunk_elements` of the features' device.
        magnitudes: ``[K, 1]`` or ``[K]``, the weight-norm magnitudes ``g``: the prototypes are then the rows of
            ``g * prototypes / ||prototypes||`` (``torch.nn.utils.parametrizations.weight_norm`` with ``dim=0``),
            never materialised; ``magnitudes`` gets its gradient too.

    Returns:
        ``[R]`` fp32 cross-entropies, differentiable w.r.t. ``features`` and ``prototypes``. The matmul runs in the
        autocast dtype when autocast is on (bf16 logits), the softmax and the reduction over K in fp32, as
        ``F.cross_entropy(logits.float() / temp, targets)`` would.
    """
    segments = [targets] if isinstance(targets, Tensor) else list(targets)
    if chunk_elements is None:
        chunk_elements = default_chunk_elements(features.device)
    _check(features, prototypes, segments, temp, chunk_elements)
    if features.shape[0] == 0:
        return features.new_zeros(0, dtype=_loss_dtype(features))
    if magnitudes is not None and magnitudes.numel() != prototypes.shape[0]:
        raise ValueError(
            f"prototype_cross_entropy: magnitudes must hold one value per prototype ({prototypes.shape[0]}), "
            f"got shape {tuple(magnitudes.shape)}"
        )
    rows_per_chunk = max(1, chunk_elements // prototypes.shape[0])
    compute_dtype = _matmul_dtype(features)
    return _PrototypeCrossEntropy.apply(features, prototypes, magnitudes, segments, temp, rows_per_chunk, compute_dtype)


class _PrototypeCrossEntropy(torch.autograd.Function):
    """The loss chunk by chunk, with its gradient written out: ``d loss_r / d z_r = sum(t_r) softmax(z_r) - t_r``
    for the scaled logits ``z = f W^T / temp``, ``W = diag(s) v`` with ``s = g / ||v||`` (``s = 1`` without
    magnitudes). Then ``d/df = (dz / temp) diag(s) v``; with ``G = (dz / temp)^T f``, the gradient w.r.t. ``W``:
    ``d/dg_k = G_k . v_k / ||v_k||`` and ``d/dv_k = s_k (G_k - (G_k . v_k) v_k / ||v_k||^2)`` (the weight-norm rule).

    The forward keeps each row's log-sum-exp; the backward recomputes one chunk's logits at a time (or reuses
    them when there is a single chunk) and turns them into the gradient in place. Per chunk that is one pass
    over the ``[r, K]`` logits for the exponential and one for the gradient, where autograd through
    ``log_softmax(logits / temp)`` runs about ten (the division, the log-softmax, the product with the targets,
    each forward, recomputed and backward), each allocating a new ``[r, K]`` buffer.
    """

    @staticmethod
    def forward(
        ctx: Any,
        features: Tensor,
        prototypes: Tensor,
        magnitudes: Tensor | None,
        segments: list[Tensor],
        temp: float,
        rows_per_chunk: int,
        compute_dtype: torch.dtype,
    ) -> Tensor:
        f, w = features.to(compute_dtype), prototypes.to(compute_dtype)
        chunks = list(_target_chunks(segments, rows_per_chunk))
        losses, lse, start = [], [], 0
        with torch.autocast(f.device.type, enabled=False):  # dtypes are explicit here, in fp32 but for the matmul
            norms = None if magnitudes is None else prototypes.to(_loss_dtype(prototypes)).norm(dim=1)  # [K]
            gains = None if magnitudes is None else magnitudes.flatten().to(norms.dtype) / norms  # s = g / ||v||
            column_scale = 1.0 / temp if gains is None else gains.to(_loss_dtype(features)) / temp
            for target_chunk in chunks:
                end = start + target_chunk.shape[0]
                z = _scaled_logits(f[start:end], w, column_scale)
                chunk_lse = torch.logsumexp(z, dim=-1)
                target_chunk = target_chunk.to(z.dtype)
                losses.append(chunk_lse * target_chunk.sum(-1) - torch.einsum("rk,rk->r", target_chunk, z))
                lse.append(chunk_lse)
                start = end
        # one chunk: its logits are held at the peak anyway, keep them rather than recompute them
        ctx.saved_logits = z if len(chunks) == 1 else None
        ctx.segments, ctx.temp, ctx.rows_per_chunk = segments, temp, rows_per_chunk
        ctx.input_dtypes = (features.dtype, prototypes.dtype)
        ctx.column_scale = column_scale
        ctx.save_for_backward(f, w, torch.cat(lse), prototypes, magnitudes, norms, gains)
        return torch.cat(losses)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        f, w, lse, v, magnitudes, norms, gains = ctx.saved_tensors
        needs_f, needs_v, needs_g = ctx.needs_input_grad[:3]
        grad_f = torch.empty_like(f) if needs_f else None
        grad_w = torch.zeros(w.shape, dtype=_loss_dtype(w), device=w.device) if needs_v or needs_g else None
        start = 0
        with torch.autocast(f.device.type, enabled=False):
            for target_chunk in _target_chunks(ctx.segments, ctx.rows_per_chunk):
                end = start + target_chunk.shape[0]
                z = ctx.saved_logits
                if z is None:
                    z = _scaled_logits(f[start:end], w, ctx.column_scale)
                target_chunk, g = target_chunk.to(z.dtype), grad_loss[start:end, None].to(z.dtype)
                # z becomes d loss / d (f W^T) = g * (sum(t) softmax(z) - t) / temp, in place
                z.sub_(lse[start:end, None]).exp_().mul_(g * target_chunk.sum(-1, keepdim=True))
                z.addcmul_(target_chunk, g, value=-1.0).mul_(1.0 / ctx.temp)
                grad_logits = z.to(f.dtype)
                if grad_w is not None:
                    grad_w += grad_logits.t() @ f[start:end]
                if grad_f is not None:
                    if gains is not None:  # d/df = dz diag(s) v: the columns scaled, then one matmul with v
                        grad_logits = z.mul_(gains).to(f.dtype)
                    torch.mm(grad_logits, w, out=grad_f[start:end])
                start = end
        ctx.saved_logits = None  # consumed in place; a second backward (retain_graph) recomputes the logits
        grad_features = None if grad_f is None else grad_f.to(ctx.input_dtypes[0])
        if magnitudes is None:
            grad_prototypes = None if grad_w is None else grad_w.to(ctx.input_dtypes[1])
            return grad_features, grad_prototypes, None, None, None, None, None
        grad_v, grad_g = _weight_norm_backward(grad_w, v, magnitudes, norms, gains)
        grad_v = grad_v.to(ctx.input_dtypes[1]) if needs_v else None
        return grad_features, grad_v, grad_g if needs_g else None, None, None, None, None


def _weight_norm_backward(
    grad_w: Tensor, v: Tensor, magnitudes: Tensor, norms: Tensor, gains: Tensor
) -> tuple[Tensor, Tensor]:
    """``(d/dv, d/dg)`` from ``G = d/dW`` for ``W = g v / ||v||`` (rows; ``gains = g / ||v||``), in place in ``G``'s
    memory: no other ``[K, D]`` buffer (the row dot products are one batched matmul)."""
    v32 = v.to(grad_w.dtype)
    dots = torch.einsum("kd,kd->k", grad_w, v32)  # G_k . v_k
    grad_g = (dots / norms).reshape(magnitudes.shape).to(magnitudes.dtype)
    grad_w.mul_(gains[:, None]).addcmul_(v32, (gains * dots / norms.square())[:, None], value=-1.0)
    return grad_w, grad_g


def _scaled_logits(features: Tensor, prototypes: Tensor, column_scale: Tensor | float) -> Tensor:
    """``[r, K]`` fp32 logits ``features @ prototypes.T``, times ``column_scale``; the matmul in the inputs' dtype."""
    return F.linear(features, prototypes).to(_loss_dtype(features)).mul_(column_scale)


def _loss_dtype(tensor: Tensor) -> torch.dtype:
    """fp32 for the softmax and the reduction over K (fp64 inputs stay fp64)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _matmul_dtype(features: Tensor) -> torch.dtype:
    """The dtype the logits' matmul runs in: autocast's when it is on for this device, else the features'."""
    device = features.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return features.dtype


def _target_chunks(segments: list[Tensor], rows_per_chunk: int) -> Iterator[Tensor]:
    """The targets in chunks of ``rows_per_chunk`` rows (the last may be shorter), across segment boundaries: many
    small segments (one per student crop) still make few chunks. A chunk within one segment is a view; one that
    spans segments is a copy of at most ``rows_per_chunk`` rows."""
    pieces: list[Tensor] = []
    rows = 0
    for segment in segments:
        offset = 0
        while offset < segment.shape[0]:
            take = min(rows_per_chunk - rows, segment.shape[0] - offset)
            pieces.append(segment[offset : offset + take])
            rows, offset = rows + take, offset + take
            if rows == rows_per_chunk:
                yield pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                pieces, rows = [], 0
    if pieces:
        yield pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _check(features: Tensor, prototypes: Tensor, segments: list[Tensor], temp: float, chunk_elements: int) -> None:
    if features.ndim != 2 or prototypes.ndim != 2 or features.shape[1] != prototypes.shape[1]:
        raise ValueError(
            "prototype_cross_entropy expects features [R, D] and prototypes [K, D], got "
            f"{tuple(features.shape)} and {tuple(prototypes.shape)}"
        )
    num_prototypes = prototypes.shape[0]
    bad = [tuple(s.shape) for s in segments if s.ndim != 2 or s.shape[1] != num_prototypes]
    if bad:
        raise ValueError(f"prototype_cross_entropy: targets must be [rows, K={num_prototypes}], got {bad}")
    rows = sum(s.shape[0] for s in segments)
    if rows != features.shape[0]:
        raise ValueError(
            f"prototype_cross_entropy: the targets have {rows} rows in all but there are {features.shape[0]} features"
        )
    if temp <= 0 or chunk_elements < 1:
        raise ValueError(
            f"prototype_cross_entropy needs temp > 0 and chunk_elements >= 1, got {temp}, {chunk_elements}"
        )
