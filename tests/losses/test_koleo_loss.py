"""koleo_loss must agree with a naive nearest-neighbour loop and with dinov2.loss.KoLeoLoss."""

import warnings

import pytest
import torch
from dinov2.loss import KoLeoLoss

from dinolab.losses import koleo_loss


def naive_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    z = [row / row.norm() for row in x]
    terms = []
    for i, zi in enumerate(z):
        nearest = min((zi - zj).norm() for j, zj in enumerate(z) if j != i)
        terms.append(torch.log(nearest + eps))
    return -torch.stack(terms).mean()


def test_matches_reference_loop() -> None:
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(0)) * 3.0
    torch.testing.assert_close(koleo_loss(x), naive_koleo(x))


def test_matches_official() -> None:
    # The official adds eps=1e-8 to each coordinate of the difference (nn.PairwiseDistance): a change of the
    # distance of at most ~sqrt(D) * 1e-8, far below fp32 tolerance unless two rows coincide.
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # official uses the deprecated torch.cuda.amp.autocast
        expected = KoLeoLoss()(x)
    torch.testing.assert_close(koleo_loss(x), expected)


def test_gradient_matches_reference_loop() -> None:
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(2))
    ours, ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    koleo_loss(ours).backward()
    naive_koleo(ref).backward()
    torch.testing.assert_close(ours.grad, ref.grad)


def test_duplicate_rows_give_finite_loss_and_gradient() -> None:
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    x = torch.cat([x, x[:1]]).requires_grad_(True)
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()


def test_bad_shape_raises() -> None:
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        koleo_loss(torch.randn(2, 3, 8))
