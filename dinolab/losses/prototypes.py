"""Cross-entropy against the prototypes without holding the ``[rows, K]`` logits: tiled, recomputed in backward.

With K = 65536 prototypes the logits of a few hundred masked patches, their log-softmax, the product with the
targets and the gradients of each are ~180 MB apiece at fp32 per 700 rows. Here the prototype layer and the loss run
tile by tile in one autograd function with its gradient written out: the forward keeps only each row's loss and
log-sum-exp (combined across the tiles of a row), the backward recomputes one tile's logits at a time and turns them
into their gradient in place. The extra cost is one ``[rows, D] x [D, K]`` product (none when everything fits in
one tile).

A tile is ``[rows, columns]`` logits: on GPUs every prototype (row chunks only); on CPUs at most 8192 prototypes
(an 8 MB block of the prototype layer at D = 256) and as many rows as the budget allows. A tile of few rows and all
65536 prototypes streams the whole 64 MB layer from memory for a thin product: on the 2-core test CPU such
64-row chunks ran the four products at 38-49 GFLOP/s, the 512 x 8192 tiles at 150-185 (benchmarks/results/
profile_cpu_vits14_batch8/; docs/efficiency.md).

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

from dinolab.matmul import linear


def default_chunk_elements(device: torch.device) -> int:
    """Logits per tile: 16 MB (fp32) on CPUs, where memory is the point; 256 MB on GPUs, where each tile costs
    kernel launches and a few large tiles run as fast as the full logits."""
    return 2**22 if device.type == "cpu" else 2**26


def default_chunk_columns(device: torch.device) -> int | None:
    """Prototypes per tile: 8192 on CPUs (a block of the layer that stays in cache across the tile's rows), all of
    them (``None``) on GPUs, whose memory bandwidth keeps even thin products fed."""
    return 8192 if device.type == "cpu" else None


def prototype_cross_entropy(
    features: Tensor,
    prototypes: Tensor,
    targets: Tensor | Sequence[Tensor],
    temp: float,
    chunk_elements: int | None = None,
    magnitudes: Tensor | None = None,
    chunk_columns: int | None = None,
) -> Tensor:
    """Per-row ``-sum_k targets[r, k] * log_softmax(features[r] @ prototypes.T / temp)[k]``, in fp32.

    Args:
        features: ``[R, D]`` the rows (the head's L2-normalised bottleneck features).
        prototypes: ``[K, D]`` the prototype layer's weight; with ``magnitudes``, its weight-norm direction ``v``.
        targets: ``[R, K]`` probabilities (or sums of probabilities: any non-negative weights), or consecutive
            segments ``[R_i, K]`` with ``sum R_i = R`` (so targets kept apart, or one tensor repeated, need not be
            concatenated into a copy). Constants: no gradient flows to them.
        temp: the softmax temperature.
        chunk_elements: logits held at once (rows per tile = ``max(1, chunk_elements // columns)``); default:
            :func:`default_chunk_elements` of the features' device.
        magnitudes: ``[K, 1]`` or ``[K]``, the weight-norm magnitudes ``g``: the prototypes are then the rows of
            ``g * prototypes / ||prototypes||`` (``torch.nn.utils.parametrizations.weight_norm`` with ``dim=0``),
            never materialised; ``magnitudes`` gets its gradient too.
        chunk_columns: prototypes per tile (at most K); default: :func:`default_chunk_columns` of the device.

    Returns:
        ``[R]`` fp32 cross-entropies, differentiable w.r.t. ``features`` and ``prototypes``. The matmul runs in the
        autocast dtype when autocast is on (bf16 logits), the softmax and the reduction over K in fp32, as
        ``F.cross_entropy(logits.float() / temp, targets)`` would.
    """
    segments = [targets] if isinstance(targets, Tensor) else list(targets)
    if chunk_elements is None:
        chunk_elements = default_chunk_elements(features.device)
    if chunk_columns is None:
        chunk_columns = default_chunk_columns(features.device)
    num_prototypes = prototypes.shape[0]
    columns = num_prototypes if chunk_columns is None else min(chunk_columns, num_prototypes)
    _check(features, prototypes, segments, temp, chunk_elements, columns)
    if features.shape[0] == 0:
        return features.new_zeros(0, dtype=_loss_dtype(features))
    if magnitudes is not None and magnitudes.numel() != num_prototypes:
        raise ValueError(
            f"prototype_cross_entropy: magnitudes must hold one value per prototype ({num_prototypes}), "
            f"got shape {tuple(magnitudes.shape)}"
        )
    tiles = (max(1, chunk_elements // columns), columns)
    compute_dtype = _matmul_dtype(features)
    return _PrototypeCrossEntropy.apply(features, prototypes, magnitudes, segments, temp, tiles, compute_dtype)


@torch.no_grad()
def prototype_logits(
    features: Tensor, prototypes: Tensor, magnitudes: Tensor | None = None, chunk_columns: int | None = None
) -> Tensor:
    """``features [..., D] @ W.T -> [..., K]`` without gradients, for ``W = g * v / ||v||`` given as
    ``prototypes = v`` and ``magnitudes = g`` (or ``W = prototypes``).

    On CPUs the product runs in tiles of ``chunk_columns`` prototypes (default :func:`default_chunk_columns`, the
    tiles the cross-entropy uses), each with its block of ``v`` scaled, so the ``[K, D]`` weight (64 MB at
    K = 65536, D = 256) is never materialised. Elsewhere (GPUs, autocast), one product with the materialised
    weight, as ``nn.Linear`` under torch's weight norm computes it.
    """
    if chunk_columns is None:
        chunk_columns = default_chunk_columns(features.device)
    _, gains = _weight_norm_gains(prototypes, magnitudes)
    if chunk_columns is None or torch.is_autocast_enabled(features.device.type):
        weight = prototypes if gains is None else prototypes * gains[:, None].to(prototypes.dtype)
        return F.linear(features, weight)
    rows = features.reshape(-1, features.shape[-1])
    logits = rows.new_empty(rows.shape[0], prototypes.shape[0])
    for columns in _column_blocks(prototypes.shape[0], chunk_columns):
        block = prototypes[columns] if gains is None else prototypes[columns] * gains[columns, None]
        logits[:, columns] = linear(rows, block)  # a copy into the strided slice: ~1/3 of the tiles' time
    return logits.view(*features.shape[:-1], prototypes.shape[0])


class _PrototypeCrossEntropy(torch.autograd.Function):
    """The loss tile by tile, with its gradient written out: ``d loss_r / d z_r = sum(t_r) softmax(z_r) - t_r``
    for the scaled logits ``z = f W^T / temp``, ``W = diag(s) v`` with ``s = g / ||v||`` (``s = 1`` without
    magnitudes). Then ``d/df = (dz / temp) diag(s) v``; with ``G = (dz / temp)^T f``, the gradient w.r.t. ``W``:
    ``d/dg_k = G_k . v_k / ||v_k||`` and ``d/dv_k = s_k (G_k - (G_k . v_k) v_k / ||v_k||^2)`` (the weight-norm rule).

    The forward keeps each row's log-sum-exp, combined over the row's column tiles; the backward recomputes one
    tile's logits at a time (or reuses them when there is a single tile) and turns them into the gradient in
    place: its block of ``G``'s rows and its share of ``d/df``. Per tile that is one pass over the logits for the
    exponential and one for the gradient, where autograd through ``log_softmax(logits / temp)`` runs about ten
    (the division, the log-softmax, the product with the targets, each forward, recomputed and backward), each
    allocating a new buffer.
    """

    @staticmethod
    def forward(
        ctx: Any,
        features: Tensor,
        prototypes: Tensor,
        magnitudes: Tensor | None,
        segments: list[Tensor],
        temp: float,
        tiles: tuple[int, int],
        compute_dtype: torch.dtype,
    ) -> Tensor:
        f, w = features.to(compute_dtype), prototypes.to(compute_dtype)
        losses, lse, start = [], [], 0
        with torch.autocast(f.device.type, enabled=False):  # dtypes are explicit here, in fp32 but for the matmul
            norms, gains = _weight_norm_gains(prototypes, magnitudes)
            column_scale = 1.0 / temp if gains is None else gains.to(_loss_dtype(features)) / temp
            for target_chunk in _target_chunks(segments, tiles[0]):
                end = start + target_chunk.rows
                chunk_lse = target_dot = None
                for columns in _column_blocks(w.shape[0], tiles[1]):
                    z = _scaled_logits(f[start:end], w[columns], _columns_of(column_scale, columns))
                    tile_lse = torch.logsumexp(z, dim=-1)
                    chunk_lse = tile_lse if chunk_lse is None else torch.logaddexp(chunk_lse, tile_lse)
                    tile_dot = torch.einsum("rk,rk->r", target_chunk.tile(columns, z.dtype), z)
                    target_dot = tile_dot if target_dot is None else target_dot + tile_dot
                losses.append(chunk_lse * target_chunk.sums(z.dtype)[:, 0] - target_dot)
                lse.append(chunk_lse)
                start = end
        # one tile: its logits are held at the peak anyway, keep them rather than recompute them
        single_tile = tiles[0] >= f.shape[0] and tiles[1] >= w.shape[0]
        ctx.saved_logits = z if single_tile else None
        ctx.temp, ctx.tiles = temp, tiles
        ctx.input_dtypes = (features.dtype, prototypes.dtype)
        ctx.column_scale = column_scale
        # the targets saved as tensors, not kept on ctx: autograd frees them once this backward has run (~170 MB of
        # teacher targets at batch 8, which would otherwise live to the end of the whole backward)
        ctx.save_for_backward(f, w, torch.cat(lse), prototypes, magnitudes, norms, gains, *segments)
        return torch.cat(losses)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor | None, ...]:
        f, w, lse, v, magnitudes, norms, gains, *segments = ctx.saved_tensors
        needs_f, needs_v, needs_g = ctx.needs_input_grad[:3]
        grad_f = torch.zeros(f.shape, dtype=_loss_dtype(f), device=f.device) if needs_f else None
        grad_w = torch.zeros(w.shape, dtype=_loss_dtype(w), device=w.device) if needs_v or needs_g else None
        start, column_tiles = 0, -(-w.shape[0] // ctx.tiles[1])
        with torch.autocast(f.device.type, enabled=False):
            for target_chunk in _target_chunks(segments, ctx.tiles[0]):
                end = start + target_chunk.rows
                rows_f, rows_lse = f[start:end], lse[start:end, None]
                g = grad_loss[start:end, None].to(rows_lse.dtype)
                row_weight = g * target_chunk.sums(rows_lse.dtype)
                for columns in _column_blocks(w.shape[0], ctx.tiles[1]):
                    z = ctx.saved_logits
                    if z is None:
                        z = _scaled_logits(rows_f, w[columns], _columns_of(ctx.column_scale, columns))
                    # z becomes d loss / d (f W^T) = g * (sum(t) softmax(z) - t) / temp, in place
                    z.sub_(rows_lse).exp_().mul_(row_weight)
                    z.addcmul_(target_chunk.tile(columns, z.dtype), g, value=-1.0).mul_(1.0 / ctx.temp)
                    if grad_w is not None:  # this tile's block of G's rows, summed over the row chunks
                        _add_product(grad_w[columns], z.to(f.dtype).t(), rows_f)
                    if grad_f is not None:  # d/df = dz diag(s) v: the columns scaled, then one matmul with v
                        if gains is not None:
                            z.mul_(gains[columns])
                        _add_product(grad_f[start:end], z.to(f.dtype), w[columns], exact=column_tiles > 1)
                start = end
        ctx.saved_logits = None  # consumed in place; a second backward (retain_graph) recomputes the logits
        grad_features = None if grad_f is None else grad_f.to(ctx.input_dtypes[0])
        if magnitudes is None:
            grad_prototypes = None if grad_w is None else grad_w.to(ctx.input_dtypes[1])
            return grad_features, grad_prototypes, None, None, None, None, None
        grad_v, grad_g = _weight_norm_backward(grad_w, v, magnitudes, norms, gains)
        grad_v = grad_v.to(ctx.input_dtypes[1]) if needs_v else None
        return grad_features, grad_v, grad_g if needs_g else None, None, None, None, None


def _weight_norm_gains(prototypes: Tensor, magnitudes: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """``(||v||, s = g / ||v||)``, ``[K]`` each in fp32 (or wider), of the weight-normalised prototypes ``W = diag(s)
    v`` given as ``prototypes = v`` and ``magnitudes = g``; ``(None, None)`` without magnitudes."""
    if magnitudes is None:
        return None, None
    norms = prototypes.to(_loss_dtype(prototypes)).norm(dim=1)
    return norms, magnitudes.flatten().to(norms.dtype) / norms


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
    return linear(features, prototypes).to(_loss_dtype(features)).mul_(column_scale)


def _add_product(out: Tensor, a: Tensor, b: Tensor, exact: bool = False) -> None:
    """``out += a @ b`` in ``out``'s dtype. For bf16 ``a``, ``b`` (autocast) and fp32 ``out`` the product runs in
    bf16 and is rounded once before the sum, or with ``exact`` (a sum over several column tiles, which a single
    product would have accumulated unrounded) from the same bf16 values in fp32."""
    if exact and a.dtype != out.dtype:
        a, b = a.to(out.dtype), b.to(out.dtype)
    if a.dtype == out.dtype:
        torch.addmm(out, a, b, out=out)  # not addmm_: torch.utils.flop_counter counts this one
    else:
        out.add_(a @ b)


def _column_blocks(num_prototypes: int, columns: int) -> Iterator[slice]:
    """The prototypes' index ranges of the tiles, ``columns`` at a time."""
    for first in range(0, num_prototypes, columns):
        yield slice(first, min(first + columns, num_prototypes))


def _columns_of(column_scale: Tensor | float, columns: slice) -> Tensor | float:
    return column_scale if isinstance(column_scale, float) else column_scale[columns]


def _loss_dtype(tensor: Tensor) -> torch.dtype:
    """fp32 for the softmax and the reduction over K (fp64 inputs stay fp64)."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _matmul_dtype(features: Tensor) -> torch.dtype:
    """The dtype the logits' matmul runs in: autocast's when it is on for this device, else the features'."""
    device = features.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return features.dtype


class _TargetRows:
    """A chunk of the targets' rows, as the pieces of the segments it spans (views): a tile of it is a view when it
    lies in one segment, else a copy of the tile only, never of the chunk's rows across all K prototypes (a
    512-row chunk of 65536 targets is 128 MB)."""

    def __init__(self, pieces: list[Tensor]) -> None:
        self.pieces = pieces
        self.rows = sum(piece.shape[0] for piece in pieces)

    def tile(self, columns: slice, dtype: torch.dtype) -> Tensor:
        tiles = [piece[:, columns] for piece in self.pieces]
        return (tiles[0] if len(tiles) == 1 else torch.cat(tiles)).to(dtype)

    def sums(self, dtype: torch.dtype) -> Tensor:
        """``[rows, 1]``: each row's total target weight."""
        return torch.cat([piece.sum(-1, keepdim=True, dtype=dtype) for piece in self.pieces])


def _target_chunks(segments: list[Tensor], rows_per_chunk: int) -> Iterator[_TargetRows]:
    """The targets in chunks of ``rows_per_chunk`` rows (the last may be shorter), across segment boundaries: many
    small segments (one per student crop) still make few chunks."""
    pieces: list[Tensor] = []
    rows = 0
    for segment in segments:
        offset = 0
        while offset < segment.shape[0]:
            take = min(rows_per_chunk - rows, segment.shape[0] - offset)
            pieces.append(segment[offset : offset + take])
            rows, offset = rows + take, offset + take
            if rows == rows_per_chunk:
                yield _TargetRows(pieces)
                pieces, rows = [], 0
    if pieces:
        yield _TargetRows(pieces)


def _check(
    features: Tensor, prototypes: Tensor, segments: list[Tensor], temp: float, chunk_elements: int, columns: int
) -> None:
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
    if temp <= 0 or chunk_elements < 1 or columns < 1:
        raise ValueError(
            "prototype_cross_entropy needs temp > 0, chunk_elements >= 1 and chunk_columns >= 1, got "
            f"{temp}, {chunk_elements}, {columns}"
        )
