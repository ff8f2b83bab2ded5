"""The DINOv2 PCA picture, checked against scikit-learn's PCA on synthetic patch features with a known foreground."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.decomposition import PCA

from dinolab.features.pca import cls_attention, foreground_mask, pca_rgb, render_attention, render_pca
from dinolab.models.vit import vit_tiny


def synthetic_tokens(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Patch tokens ``[2, 8, 8, 16]``: foreground patches far from the background along one direction, with
    structured variation inside the foreground (so the second PCA has something to find)."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((2, 8, 8), dtype=bool)
    mask[0, 2:7, 1:7] = True  # a wide object
    mask[1, 1:7, 1:7] = True  # objects cover most of the pictures: the border rule, not "minority", orients
    tokens = 0.05 * rng.standard_normal((2, 8, 8, 16))
    tokens[mask] += 8.0 * np.eye(16)[0]
    # three orthogonal directions (orthogonal to the fg/bg one) of decreasing spread inside the object
    parts = np.eye(16)[1:4] * np.array([0.6, 0.4, 0.2])[:, None]
    tokens[mask] += rng.standard_normal((int(mask.sum()), 3)) @ parts
    return tokens.astype(np.float32), mask


def minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min(0)) / (x.max(0) - x.min(0))


def assert_equal_up_to_flip(actual: np.ndarray, expected: np.ndarray) -> None:
    """PCA component signs are arbitrary: each channel must match ``v`` or ``1 - v``."""
    for channel in range(expected.shape[-1]):
        a, e = actual[..., channel], expected[..., channel]
        assert np.allclose(a, e, atol=1e-4) or np.allclose(a, 1 - e, atol=1e-4), f"channel {channel} differs"


def test_foreground_mask_recovers_the_object_whatever_the_sign() -> None:
    tokens, mask = synthetic_tokens()
    np.testing.assert_array_equal(foreground_mask(tokens), mask)
    np.testing.assert_array_equal(foreground_mask(-tokens), mask)  # flipped features, same foreground
    np.testing.assert_array_equal(foreground_mask(torch.from_numpy(tokens)), mask)  # tensors work too


def test_pca_rgb_is_sklearn_pca_of_the_foreground_scaled_to_0_1() -> None:
    tokens, mask = synthetic_tokens()
    rgb = pca_rgb(tokens)
    assert rgb.shape == (2, 8, 8, 3) and rgb.dtype == np.float32
    assert rgb.min() >= 0.0 and rgb.max() <= 1.0
    assert np.all(rgb[~mask] == 0.0)  # background is black
    expected = minmax(PCA(n_components=3).fit_transform(tokens[mask]))
    assert_equal_up_to_flip(rgb[mask], expected)


def test_pca_rgb_without_background_removal_colours_every_patch() -> None:
    tokens, _ = synthetic_tokens(seed=1)
    rgb = pca_rgb(tokens, threshold=None)
    expected = minmax(PCA(n_components=3).fit_transform(tokens.reshape(-1, 16))).reshape(2, 8, 8, 3)
    assert_equal_up_to_flip(rgb, expected)


def test_pca_rgb_input_checks() -> None:
    tokens, mask = synthetic_tokens()
    with pytest.raises(ValueError, match=r"\[B, h, w, D\]"):
        pca_rgb(tokens[0])
    with pytest.raises(ValueError, match="does not match the patch grid"):
        pca_rgb(tokens, mask=mask[:, :4])
    with pytest.warns(UserWarning, match="only 0 foreground patches"):
        rgb = pca_rgb(tokens, mask=np.zeros_like(mask))
    assert (rgb.reshape(-1, 3).max(1) > 0).any()


def naive_cls_attention(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """softmax(q_cls . k_j / sqrt(d)) over tokens j, head by head, from the last block's qkv weights."""
    tokens = model.prepare_tokens_with_masks(images)
    for block in model.blocks[:-1]:
        tokens = block(tokens)
    block = model.blocks[-1]
    qkv = block.attn.qkv(block.norm1(tokens))  # [B, T, 3*D]
    heads, dim = block.attn.num_heads, model.embed_dim // block.attn.num_heads
    maps = torch.zeros(images.shape[0], heads, tokens.shape[1])
    for b in range(images.shape[0]):
        for h in range(heads):
            q = qkv[b, 0, h * dim : (h + 1) * dim]
            k = qkv[b, :, model.embed_dim + h * dim : model.embed_dim + (h + 1) * dim]
            maps[b, h] = torch.softmax(k @ q / dim**0.5, dim=0)
    first_patch = 1 + model.num_register_tokens
    rows, cols = images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size
    return maps[:, :, first_patch:].reshape(images.shape[0], heads, rows, cols)


@torch.no_grad()
def test_cls_attention_matches_a_naive_computation() -> None:
    torch.manual_seed(0)
    model = vit_tiny(depth=2, img_size=56, num_register_tokens=2).eval()
    images = torch.randn(2, 3, 42, 56)
    maps = cls_attention(model, images)
    assert maps.shape == (2, 3, 3, 4)
    torch.testing.assert_close(maps, naive_cls_attention(model, images), rtol=1e-4, atol=1e-6)


def test_pictures_put_input_and_maps_side_by_side() -> None:
    image = Image.new("RGB", (90, 60), "red")
    pca_picture = render_pca(image, np.random.default_rng(0).random((3, 4, 3)), (42, 56))
    assert pca_picture.size == (2 * 56 + 4, 42)
    assert pca_picture.getpixel((0, 0)) == (255, 0, 0)
    attention_picture = render_attention(image, np.random.default_rng(0).random((3, 3, 4)), (42, 56))
    assert attention_picture.size == (5 * 56 + 4 * 4, 42)  # input, head mean, 3 heads
