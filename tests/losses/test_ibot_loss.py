"""ibot_loss must agree with a naive per-image loop and with dinov2.loss.iBOTPatchLoss (masked and dense forms)."""

import pytest
import torch
import torch.nn.functional as F
from dinov2.loss import iBOTPatchLoss

from dinolab.losses import ibot_loss, masked_patch_weights


def _batch(seed: int = 0, images: int = 6, patches: int = 9, protos: int = 16):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(images, patches, generator=g) < 0.4
    masks[0] = False  # an unmasked image: contributes 0 but stays in the denominator
    masks[1, :3] = True
    student_dense = torch.randn(images, patches, protos, generator=g)
    teacher_dense = torch.randn(images, patches, protos, generator=g).softmax(-1)
    return masks, student_dense, teacher_dense


def naive_ibot_loss(masks, student_dense, teacher_dense, temp):
    per_image = []
    for i in range(masks.shape[0]):
        ces = [
            -(teacher_dense[i, p] * F.log_softmax(student_dense[i, p] / temp, -1)).sum()
            for p in range(masks.shape[1])
            if masks[i, p]
        ]
        per_image.append(torch.stack(ces).mean() if ces else torch.tensor(0.0))
    return torch.stack(per_image).mean()


def test_matches_reference_loop() -> None:
    masks, s, t = _batch()
    loss = ibot_loss(s[masks], t[masks], masked_patch_weights(masks), num_images=masks.shape[0], student_temp=0.1)
    torch.testing.assert_close(loss, naive_ibot_loss(masks, s, t, 0.1))


def test_matches_official_ibot_patch_loss() -> None:
    masks, s, t = _batch(seed=1)
    official = iBOTPatchLoss(patch_out_dim=s.shape[-1], student_temp=0.1)
    ours = ibot_loss(s[masks], t[masks], masked_patch_weights(masks), num_images=masks.shape[0])
    # forward_masked without weights derives them from the masks, as masked_patch_weights does
    torch.testing.assert_close(ours, official.forward_masked(s[masks], t[masks], student_masks_flat=masks))
    # the dense form (per-image masked mean, then mean over images) is the same quantity
    torch.testing.assert_close(ours, official(s, t, masks))


def test_masked_patch_weights_formula() -> None:
    masks = torch.tensor([[True, False, True, True], [False, False, False, False], [False, True, False, False]])
    expected = torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0])
    torch.testing.assert_close(masked_patch_weights(masks), expected)


def test_bad_inputs_raise() -> None:
    s = torch.zeros(5, 8)
    with pytest.raises(ValueError, match="same shape"):
        ibot_loss(s, torch.zeros(5, 7), torch.ones(5), num_images=2)
    with pytest.raises(ValueError, match="weights"):
        ibot_loss(s, s, torch.ones(4), num_images=2)
    with pytest.raises(ValueError, match="num_images"):
        ibot_loss(s, s, torch.ones(5), num_images=0)
    with pytest.raises(ValueError, match="bool"):
        masked_patch_weights(torch.ones(2, 3))
