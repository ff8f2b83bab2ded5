"""Cross-entropy against the prototypes without holding the ``[rows, K]`` logits: chunked, recomputed in backward.

With K = 65536 prototypes the logits of a few hundred masked patches, their log-softmax, the product with the
targets and the gradients of each are ~180 MB apiece at fp32 per 700 rows. Here the prototype layer and the loss run
chunk by chunk under activation checkpointing: the forward keeps only each row's loss, the backward recomputes
one chunk's logits at a time. The extra cost is one ``[chunk, D] x [D, K]`` matmul per chunk.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint


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
) -> Tensor:
    """Per-row ``-sum_k targets[r, k] * log_softmax(features[r] @ prototypes.T / temp)[k]``, in fp32.

    Args:
        features: ``[R, D]`` the rows (the head's L2-normalised bottleneck features).
        prototypes: ``[K, D]`` the prototype layer's weight.
        targets: ``[R, K]`` probabilities, or consecutive segments ``[R_i, K]`` with ``sum R_i = R`` (so targets
            kept apart, or one tensor repeated, need not be concatenated into a copy).
        temp: the softmax temperature.
        chunk_elements: logits held at once (rows per chunk = ``max(1, chunk_elements // K)``); default:
            :func:`default_chunk_elements` of the features' device.

    Returns:
        ``[R]`` fp32 cross-entropies, differentiable w.r.t. ``features`` and ``prototypes``. The logits keep the
        dtype the matmul gives (bf16 under autocast) and are cast to fp32 before the softmax, as
        ``F.log_softmax(logits.float() / temp)`` would.
    """
    segments = [targets] if isinstance(targets, Tensor) else list(targets)
    if chunk_elements is None:
        chunk_elements = default_chunk_elements(features.device)
    _check(features, prototypes, segments, temp, chunk_elements)
    rows_per_chunk = max(1, chunk_elements // prototypes.shape[0])
    # recomputing saves memory only when there is more than one chunk: a single chunk's logits are held at the
    # peak either way, and small heads (a few thousand prototypes) skip the extra matmul
    several_chunks = features.shape[0] > rows_per_chunk
    recompute = several_chunks and torch.is_grad_enabled() and (features.requires_grad or prototypes.requires_grad)
    losses, start = [], 0
    for target_chunk in _target_chunks(segments, rows_per_chunk):
        feature_chunk = features[start : start + target_chunk.shape[0]]
        start += target_chunk.shape[0]
        if recompute:
            loss = checkpoint(
                _rows_cross_entropy,
                feature_chunk,
                prototypes,
                target_chunk,
                temp,
                use_reentrant=False,
                preserve_rng_state=False,  # deterministic: no RNG state to save per chunk
            )
        else:
            loss = _rows_cross_entropy(feature_chunk, prototypes, target_chunk, temp)
        losses.append(loss)
    if not losses:
        return features.new_zeros(0, dtype=torch.float32)
    return torch.cat(losses)


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


def _rows_cross_entropy(features: Tensor, prototypes: Tensor, targets: Tensor, temp: float) -> Tensor:
    logits = F.linear(features, prototypes)  # [r, K], bf16/fp16 under autocast
    with torch.autocast(logits.device.type, enabled=False):  # the reduction over K in fp32
        log_probs = F.log_softmax(logits.float() / temp, dim=-1)
        return -torch.einsum("rk,rk->r", targets.float(), log_probs)  # [r]


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
