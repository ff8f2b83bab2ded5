"""The official backbone API (masks, intermediate layers, lists of crops, attention maps) against the official
DINOv2 code (``dinov2`` package), loaded with the same random released-format weights."""

from __future__ import annotations

import pytest
import torch
from released_weights import compare_features, image, max_diff, official_pair

TOL = 1e-4


@torch.no_grad()
def test_masked_patches_match_official() -> None:
    ours, ref = official_pair("vit_small", depth=2, seed=3)
    x = image(56, 70, batch=3)
    masks = torch.rand(3, 4 * 5, generator=torch.Generator().manual_seed(0)) < 0.4
    masks[0] = False  # one image without masking, one fully masked
    masks[1] = True
    out, expected = ours.forward_features(x, masks), ref.forward_features(x, masks)
    compare_features(out, expected)
    assert out["masks"] is masks
    # masking must change the masked image's features (the mask token is a real input), not the unmasked one's
    unmasked = ours.forward_features(x)
    assert max_diff(unmasked["x_prenorm"][0], out["x_prenorm"][0]) == 0.0
    assert max_diff(unmasked["x_prenorm"][1], out["x_prenorm"][1]) > 1e-2


@pytest.mark.parametrize("n", [1, 2, [0, 2], [1]])
@pytest.mark.parametrize(("reshape", "return_class_token", "norm"), [(False, False, True), (True, True, False)])
@torch.no_grad()
def test_intermediate_layers_match_official(n, reshape: bool, return_class_token: bool, norm: bool) -> None:
    ours, ref = official_pair("vit_small", depth=3, seed=4)
    x = image(42, 56, batch=2)
    kwargs = dict(n=n, reshape=reshape, return_class_token=return_class_token, norm=norm)
    out, expected = ours.get_intermediate_layers(x, **kwargs), ref.get_intermediate_layers(x, **kwargs)
    assert len(out) == len(expected) == (n if isinstance(n, int) else len(n))
    for got, want in zip(out, expected):
        if return_class_token:
            assert max_diff(got[1], want[1]) <= TOL
            got, want = got[0], want[0]
        assert got.shape == ((2, 384, 3, 4) if reshape else (2, 12, 384))
        assert max_diff(got, want) <= TOL


@torch.no_grad()
def test_intermediate_layers_of_chunked_official_model() -> None:
    ours, ref = official_pair("vit_small", depth=4, seed=5, block_chunks=2)
    x = image(28, 42)
    for got, want in zip(ours.get_intermediate_layers(x, n=3), ref.get_intermediate_layers(x, n=3)):
        assert max_diff(got, want) <= TOL


@torch.no_grad()
def test_intermediate_layers_edge_cases() -> None:
    ours, ref = official_pair("vit_small", depth=2, seed=7)
    x = image(28, 28)
    assert ours.get_intermediate_layers(x, n=0) == ref.get_intermediate_layers(x, n=0) == ()
    assert ours.get_intermediate_layers(x, n=[]) == ()
    # indices given out of order come back in block order, as in the official code
    for got, want in zip(ours.get_intermediate_layers(x, n=[1, 0]), ref.get_intermediate_layers(x, n=[1, 0])):
        assert max_diff(got, want) <= TOL
    with pytest.raises(ValueError, match="out of range for a 2-block model"):
        ours.get_intermediate_layers(x, n=[2])
    with pytest.raises(ValueError, match="out of range"):
        ours.get_intermediate_layers(x, n=3)
    with pytest.raises(ValueError, match="repeat a block"):
        ours.get_intermediate_layers(x, n=[1, 1])


@torch.no_grad()
def test_list_of_crops_matches_official_one_by_one() -> None:
    """Global and local crops in one call (sequence packing); the official code needs xFormers for lists, so
    its per-crop outputs are the reference."""
    ours, ref = official_pair("vit_small", depth=2, seed=8)
    globals_, locals_ = image(56, 56, batch=2, seed=1), image(28, 28, batch=3, seed=2)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, :5] = True
    out = ours.forward_features([globals_, locals_], [masks, None])
    compare_features(out[0], ref.forward_features(globals_, masks))
    compare_features(out[1], ref.forward_features(locals_))


@torch.no_grad()
def test_last_self_attention_is_softmax_of_scaled_scores() -> None:
    ours, ref = official_pair("vit_small", depth=2, seed=9)
    x = image(28, 42, batch=2)
    tokens = ref.blocks[0](ref.prepare_tokens_with_masks(x))  # input of the last block, by the official code
    last = ref.blocks[1]
    q, k, _ = last.attn.qkv(last.norm1(tokens)).reshape(2, 7, 3, 6, 64).permute(2, 0, 3, 1, 4)  # [B, heads, T, 64]
    expected = torch.softmax(torch.einsum("bhqc,bhkc->bhqk", q, k) / 64**0.5, dim=-1)
    attention = ours.get_last_self_attention(x)
    assert attention.shape == (2, 6, 7, 7)
    assert max_diff(attention, expected) <= 1e-5
