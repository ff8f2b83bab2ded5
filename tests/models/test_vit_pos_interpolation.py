"""Position-embedding interpolation and token layout, against formulas written here.

Rules (released models): stored for 518 px (37x37 grid + CLS), resized bicubically in fp32. Models without
registers: legacy scale factor ``(n + 0.1) / 37``, no antialias. Register models: target size given directly,
antialias on. No resizing when the grid already matches and the image is square.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from released_weights import image, max_diff
from torch import Tensor

from dinolab.hub import make_dinov2_model
from dinolab.models import vit_small, vit_tiny


def reference_pos_embed(pos_embed: Tensor, rows: int, cols: int, offset: float, antialias: bool) -> Tensor:
    """``[1, 1 + M*M, D]`` stored embedding -> ``[1, 1 + rows*cols, D]`` for a rows x cols patch grid."""
    side = math.isqrt(pos_embed.shape[1] - 1)
    dim = pos_embed.shape[-1]
    grid = pos_embed[:, 1:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # [1, D, M, M]
    if offset:
        resize = dict(scale_factor=((rows + offset) / side, (cols + offset) / side))
    else:
        resize = dict(size=(rows, cols))
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **resize)  # [1, D, rows, cols]
    patches = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
    return torch.cat((pos_embed[:, :1].float(), patches), dim=1)


def _hub_model(registers: bool):
    model = make_dinov2_model("dinov2_vits14_reg" if registers else "dinov2_vits14", pretrained=False, depth=1)
    torch.nn.init.normal_(model.pos_embed)  # a rough embedding: any resampling difference shows
    return model


def _resized(model, height: int, width: int) -> Tensor:
    tokens = torch.zeros(1, 1 + (height // 14) * (width // 14), model.embed_dim)
    return model.interpolate_pos_encoding(tokens, height, width)


@pytest.mark.parametrize("registers", [False, True])
@pytest.mark.parametrize(("height", "width"), [(224, 224), (224, 308), (672, 518), (14, 28)])
def test_hub_models_resize_by_their_rule(registers: bool, height: int, width: int) -> None:
    model = _hub_model(registers)
    offset, antialias = (0.0, True) if registers else (0.1, False)
    expected = reference_pos_embed(model.pos_embed.detach(), height // 14, width // 14, offset, antialias)
    assert max_diff(_resized(model, height, width).detach(), expected) == 0.0


def test_the_two_rules_differ() -> None:
    """So the test above can tell them apart: offset and antialias each change the result at 224 px."""
    pos = _hub_model(False).pos_embed.detach()
    legacy = reference_pos_embed(pos, 16, 16, 0.1, False)
    assert max_diff(legacy, reference_pos_embed(pos, 16, 16, 0.0, False)) > 1e-2
    assert max_diff(reference_pos_embed(pos, 16, 16, 0.0, True), reference_pos_embed(pos, 16, 16, 0.0, False)) > 1e-2


@pytest.mark.parametrize("registers", [False, True])
def test_no_resize_when_grid_matches_and_square(registers: bool) -> None:
    model = _hub_model(registers)
    assert _resized(model, 518, 518) is model.pos_embed


def test_same_count_but_not_square_is_resized() -> None:
    """A 2x8 grid has the 16 positions of the stored 4x4 grid, but other geometry: it must be resized."""
    model = vit_tiny(img_size=56, depth=1)
    torch.nn.init.normal_(model.pos_embed)
    resized = _resized(model, 28, 112)
    assert resized.shape == model.pos_embed.shape
    expected = reference_pos_embed(model.pos_embed.detach(), 2, 8, 0.1, False)
    assert max_diff(resized.detach(), expected) == 0.0
    assert max_diff(resized.detach(), model.pos_embed.detach()) > 1e-2


def test_resized_in_fp32_then_cast() -> None:
    model = _hub_model(registers=True).to(torch.bfloat16)
    tokens = torch.zeros(1, 1 + 16 * 22, model.embed_dim, dtype=torch.bfloat16)
    resized = model.interpolate_pos_encoding(tokens, 224, 308)
    expected = reference_pos_embed(model.pos_embed.detach(), 16, 22, 0.0, True).to(torch.bfloat16)
    assert resized.dtype == torch.bfloat16
    assert torch.equal(resized.detach(), expected)


@pytest.mark.parametrize("registers", [0, 4])
@torch.no_grad()
def test_token_layout(registers: int) -> None:
    """CLS + position embedding, then registers (no position embedding), then the patches with theirs."""
    torch.manual_seed(0)
    model = vit_small(depth=1, img_size=56, num_register_tokens=registers, interpolate_offset=0.0)
    for param in (model.cls_token, model.pos_embed, model.mask_token, model.patch_embed.proj.bias):
        torch.nn.init.normal_(param)
    if registers:
        torch.nn.init.normal_(model.register_tokens)
    x = image(42, 70, batch=2)
    masks = torch.zeros(2, 15, dtype=torch.bool)
    masks[1, [0, 7]] = True
    tokens = model.prepare_tokens_with_masks(x, masks)

    patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=14)  # [B, D, 3, 5]
    patches = patches.flatten(2).transpose(1, 2)  # [B, 15, D]
    patches[1, [0, 7]] = model.mask_token[0]
    pos = reference_pos_embed(model.pos_embed, 3, 5, 0.0, False)
    cls = model.cls_token[0, 0] + pos[0, 0]
    assert tokens.shape == (2, 1 + registers + 15, 384)
    assert max_diff(tokens[:, 0], cls.expand(2, -1)) <= 1e-6
    if registers:
        assert max_diff(tokens[:, 1 : 1 + registers], model.register_tokens.expand(2, -1, -1)) == 0.0
    # the patch embedding is computed as a matmul, not this conv: the same sums in another order
    assert max_diff(tokens[:, 1 + registers :], patches + pos[:, 1:]) <= 5e-5


def test_patch_size_mismatch_is_a_clear_error() -> None:
    model = vit_tiny(depth=1, img_size=56)
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        model(image(30, 28))


def test_inference_caches_the_resized_embedding_until_the_weights_change() -> None:
    model = _hub_model(registers=False).eval()
    with torch.inference_mode():
        model.forward_features(image(224, 224))
        cached = model._pos_embed_cache[1]
        assert model.interpolate_pos_encoding(torch.zeros(1, 257, 384), 224, 224) is cached
        model.load_state_dict({"pos_embed": model.pos_embed * 2}, strict=False)
        refreshed = model.interpolate_pos_encoding(torch.zeros(1, 257, 384), 224, 224)
    assert refreshed is not cached
    torch.testing.assert_close(refreshed, reference_pos_embed(model.pos_embed.detach(), 16, 16, 0.1, False))
    resized = model.interpolate_pos_encoding(torch.zeros(1, 257, 384), 224, 224)  # grad enabled: not cached
    assert resized.requires_grad and resized is not model._pos_embed_cache[1]
    torch.testing.assert_close(resized.detach(), refreshed)
