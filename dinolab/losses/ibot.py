"""iBOT loss: masked-patch prediction of the teacher's patch targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ibot_loss(
    student_logits: Tensor,
    teacher_probs: Tensor,
    weights: Tensor,
    num_images: int,
    student_temp: float = 0.1,
) -> Tensor:
    """Cross-entropy at the masked patches, averaged per image, then over all global-crop images.

    Reference semantics (the unit test checks this loop):
        for m in masked patches (of all images):
            total += weights[m] * -sum_k teacher_probs[m, k] * log_softmax(student_logits[m] / temp)[k]
        loss = total / num_images

    Args:
        student_logits: ``[M, K]`` student head output at the M masked patches of the batch.
        teacher_probs: ``[M, K]`` teacher targets at the same patches.
        weights: ``[M]`` weight of each masked patch: ``1 / (number of masked patches of its image)``
            (see :func:`masked_patch_weights`), so the sum over an image's patches is that image's mean.
        num_images: number of global-crop images in the batch, masked or not: unmasked images count 0 but
            stay in the denominator, as in DINOv2.
        student_temp: temperature of the student softmax.
    """
    if student_logits.ndim != 2 or student_logits.shape != teacher_probs.shape:
        raise ValueError(
            "ibot_loss expects student_logits and teacher_probs of the same shape [M, K] (masked patches, "
            f"prototypes), got {tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    if weights.shape != student_logits.shape[:1]:
        raise ValueError(f"ibot_loss: weights must be [M] = [{student_logits.shape[0]}], got {tuple(weights.shape)}")
    if num_images < 1:
        raise ValueError(f"ibot_loss: num_images must be >= 1 (all global-crop images of the batch), got {num_images}")
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)  # [M, K]
    weighted_ce = -torch.einsum("mk,mk,m->", teacher_probs.float(), log_p, weights.float())
    return weighted_ce / num_images


def masked_patch_weights(masks: Tensor) -> Tensor:
    """Weight of each masked patch, in ``masks[masks]`` order: ``1 / (number of masked patches of its image)``.

    ``masks [N, P]`` (bool, True = masked) -> ``[M]`` with ``M = masks.sum()``.
    """
    if masks.ndim != 2 or masks.dtype != torch.bool:
        raise ValueError(
            f"masks must be a bool tensor [N, P] (images, patches), got {masks.dtype} {tuple(masks.shape)}"
        )
    per_image = 1.0 / masks.sum(dim=-1, keepdim=True).clamp(min=1)  # [N, 1]
    return per_image.expand_as(masks)[masks]  # [M]
