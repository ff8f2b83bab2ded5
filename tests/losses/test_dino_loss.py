"""DINOLoss must agree with a naive loop over view pairs and with the official DINOv2 training step's DINO loss."""

import pytest
import torch
import torch.nn.functional as F
from dinov2.loss import DINOLoss as OfficialDINOLoss

from dinolab.losses import DINOLoss


def naive_dino_loss(student: torch.Tensor, teacher: torch.Tensor, temp: float) -> torch.Tensor:
    terms = []
    for s in range(student.shape[0]):
        for t in range(teacher.shape[0]):
            if s == t:
                continue
            for b in range(student.shape[1]):
                terms.append(-(teacher[t, b] * F.log_softmax(student[s, b] / temp, dim=-1)).sum())
    return torch.stack(terms).mean()


def _inputs(n_student: int, n_teacher: int, batch: int = 4, protos: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n_student, batch, protos, generator=g)
    teacher = torch.randn(n_teacher, batch, protos, generator=g).softmax(-1)
    return student, teacher


@pytest.mark.parametrize(("n_student", "n_teacher"), [(10, 2), (2, 2), (3, 1), (4, 3)])
def test_matches_reference_loop(n_student: int, n_teacher: int) -> None:
    student, teacher = _inputs(n_student, n_teacher)
    torch.testing.assert_close(DINOLoss(0.1)(student, teacher), naive_dino_loss(student, teacher, 0.1))


def test_matches_official_training_step() -> None:
    # The official step (dinov2/train/ssl_meta_arch.py) calls dinov2.loss.DINOLoss.forward, which returns the SUM
    # over the given (student, teacher) lists of batch-mean cross-entropies, twice:
    #   local:  forward(8 local chunks, [t0, t1]) / 18                   -> 16 pairs
    #   global: forward([cat(s0, s1)], [cat(t1, t0)]) * 2 / 18           -> batch mean over 2B = (CE(s0,t1)+CE(s1,t0))/2
    # so the official total = (sum over the 18 pairs of batch-mean CE) / 18 = our mean over pairs, numerically equal.
    student, teacher = _inputs(10, 2, batch=5, protos=64, seed=1)
    official = OfficialDINOLoss(out_dim=64, student_temp=0.1)
    n_terms = 2 * 1 + 8 * 2
    local = official(list(student[2:]), list(teacher)) / n_terms
    global_ = official([student[:2].flatten(0, 1)], [teacher.flip(0).flatten(0, 1)]) * 2 / n_terms
    torch.testing.assert_close(DINOLoss(0.1)(student, teacher), local + global_)
    # Pair by pair: the official forward returns the batch-mean CE of a pair; ours is their mean over the 18 pairs.
    pairs = [official([student[s]], [teacher[t]]) for s in range(10) for t in range(2) if s != t]
    torch.testing.assert_close(DINOLoss(0.1)(student, teacher), torch.stack(pairs).sum() / n_terms)


def test_gradient_matches_reference_loop() -> None:
    student, teacher = _inputs(6, 2, seed=2)
    ours = student.clone().requires_grad_(True)
    ref = student.clone().requires_grad_(True)
    DINOLoss(0.2)(ours, teacher).backward()
    naive_dino_loss(ref, teacher, 0.2).backward()
    torch.testing.assert_close(ours.grad, ref.grad)


def test_low_precision_inputs_are_computed_in_fp32() -> None:
    student, teacher = _inputs(4, 2, seed=3)
    loss = DINOLoss(0.1)(student.bfloat16(), teacher.bfloat16())
    assert loss.dtype == torch.float32
    expected = naive_dino_loss(student.bfloat16().float(), teacher.bfloat16().float(), 0.1)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    ("student_shape", "teacher_shape"),
    [((4, 32), (2, 4, 32)), ((4, 3, 32), (2, 4, 32)), ((1, 4, 32), (1, 4, 32)), ((2, 4, 32), (3, 4, 32))],
)
def test_bad_shapes_raise(student_shape: tuple, teacher_shape: tuple) -> None:
    with pytest.raises(ValueError, match="DINOLoss"):
        DINOLoss()(torch.zeros(student_shape), torch.zeros(teacher_shape))
