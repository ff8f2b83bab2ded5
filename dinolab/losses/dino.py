"""DINO loss: cross-entropy between teacher targets and student predictions of the CLS token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DINOLoss(nn.Module):
    """Cross-entropy between teacher targets and student predictions over pairs of different views.

    Reference semantics (the unit test checks this loop):
        for s in student crops, t in teacher crops with s != t, b in batch:
            terms += [-sum_k teacher_probs[t, b, k] * log_softmax(student_logits[s, b] / temp)[k]]
        loss = mean(terms)

    The first ``T`` student crops are the teacher's views (the global crops), so the pair ``s == t`` compares a
    view with itself and is skipped. With 2 global + 8 local student crops that is ``2*1 + 8*2 = 18`` pairs,
    each averaged over the batch; the loss is the mean over the 18 pairs. This equals the total DINO loss of
    the official training step (``dino_local_crops_loss + dino_global_crops_loss``), which sums batch-mean
    cross-entropies over the pairs and divides by the number of pairs.
    """

    def __init__(self, student_temp: float = 0.1) -> None:
        super().__init__()
        if student_temp <= 0:
            raise ValueError(f"student_temp must be > 0, got {student_temp}")
        self.student_temp = student_temp

    def forward(self, student_logits: Tensor, teacher_probs: Tensor) -> Tensor:
        # student_logits [S, B, K], the first T crops being the teacher's views; teacher_probs [T, B, K]
        _check_shapes(student_logits, teacher_probs)
        log_p = F.log_softmax(student_logits.float() / self.student_temp, dim=-1)  # [S, B, K]
        ce = -torch.einsum("sbk,tbk->stb", log_p, teacher_probs.float())  # [S, T, B]
        n_student, n_teacher, batch = ce.shape
        different_views = 1.0 - torch.eye(n_student, n_teacher, dtype=ce.dtype, device=ce.device)  # [S, T]
        # A weighted sum rather than boolean indexing: no host-device sync, and compile-friendly.
        # the T pairs s == t are left out
        return torch.einsum("stb,st->", ce, different_views) / dino_num_terms(n_student, n_teacher, batch)

    def extra_repr(self) -> str:
        return f"student_temp={self.student_temp}"


def dino_student_targets(teacher_probs: Tensor, num_student_crops: int) -> list[Tensor]:
    """The DINO loss as one target per student crop: ``[T, B, K] -> S`` tensors ``[B, K]``.

    Cross-entropy is linear in its target, so the sum over view pairs ``sum_{s, t != s} CE(p_t, q_s)`` equals
    ``sum_s CE(sum_{t != s} p_t, q_s)``: student crop ``s`` gets the sum of the targets of the other teacher views
    (all of them for a local crop, which is the same tensor repeated, not copied). Divided by
    :func:`dino_num_terms` this is :class:`DINOLoss`, computed with one prototype cross-entropy per student row.
    """
    num_teacher = teacher_probs.shape[0]
    if not 1 <= num_teacher <= num_student_crops or num_student_crops < 2:
        raise ValueError(
            f"dino_student_targets: {num_student_crops} student and {num_teacher} teacher crops give no pair of "
            "different views"
        )
    others = [
        teacher_probs[[t for t in range(num_teacher) if t != s]].sum(dim=0) for s in range(num_teacher)
    ]  # [B, K] each
    return others + [teacher_probs.sum(dim=0)] * (num_student_crops - num_teacher)


def dino_num_terms(num_student_crops: int, num_teacher_crops: int, batch: int) -> int:
    """Number of (student crop, other teacher view, image) terms the DINO loss averages over."""
    return (num_student_crops * num_teacher_crops - num_teacher_crops) * batch


def _check_shapes(student_logits: Tensor, teacher_probs: Tensor) -> None:
    if student_logits.ndim != 3 or teacher_probs.ndim != 3:
        raise ValueError(
            "DINOLoss expects student_logits [S, B, K] and teacher_probs [T, B, K] (crops, batch, prototypes), "
            f"got {tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}; stack the crops on dim 0"
        )
    n_student, batch, protos = student_logits.shape
    n_teacher = teacher_probs.shape[0]
    if teacher_probs.shape[1:] != (batch, protos):
        raise ValueError(
            f"DINOLoss: batch and prototype dims differ: student_logits {tuple(student_logits.shape)} vs "
            f"teacher_probs {tuple(teacher_probs.shape)}"
        )
    if not 1 <= n_teacher <= n_student or n_student < 2:
        raise ValueError(
            f"DINOLoss: {n_student} student and {n_teacher} teacher crops give no pair of different views; the "
            "student crops must start with the T >= 1 teacher views and number at least max(T, 2)"
        )
