"""dinolab's ViT must match the official DINOv2 code (``dinov2`` package) key for key and output for output.

The official April 2023 release has no registers, so register models are compared with timm and Hugging Face
(``test_vit_parity_timm.py``, ``test_vit_parity_hf.py``). Its interpolation is the legacy one (offset 0.1,
no antialias), the rule dinolab uses for models without registers, so every input size is compared here.
"""

from __future__ import annotations

import pytest
import torch
from released_weights import compare_features, dinolab_model, image, max_diff, official_model, official_pair

TOL = 1e-4


@pytest.mark.parametrize("arch", ["vit_small", "vit_base"])
def test_state_dict_keys_and_shapes_match_official(arch: str) -> None:
    with torch.device("meta"):
        ours = dinolab_model(arch, depth=12).state_dict()
        ref = official_model(arch, depth=12).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


@pytest.mark.parametrize(
    ("arch", "depth", "height", "width"),
    [
        ("vit_small", 2, 518, 518),
        ("vit_small", 3, 224, 224),
        ("vit_small", 2, 224, 308),
        ("vit_small", 2, 308, 224),
        ("vit_base", 2, 518, 518),
        ("vit_base", 2, 224, 224),
        ("vit_base", 2, 224, 308),
    ],
)
@torch.no_grad()
def test_forward_features_match_official(arch: str, depth: int, height: int, width: int) -> None:
    ours, ref = official_pair(arch, depth)
    x = image(height, width, batch=2 if height < 518 else 1)
    out, expected = ours.forward_features(x), ref.forward_features(x)
    compare_features(out, expected)
    assert out["x_norm_regtokens"].shape == (x.shape[0], 0, ours.embed_dim)
    assert max_diff(ours(x), ref(x)) <= TOL


@torch.no_grad()
def test_full_depth_small_matches_official_at_224() -> None:
    ours, ref = official_pair("vit_small", depth=12, seed=1)
    x = image(224, 224)
    compare_features(ours.forward_features(x), ref.forward_features(x))


@torch.no_grad()
def test_giant_swiglu_matches_official() -> None:
    """ViT-g's FFN is SwiGLU with fused ``w12``: hidden width (int(6144 * 2 / 3) + 7) // 8 * 8 = 4096."""
    ours, ref = official_pair("vit_giant2", depth=2, seed=6)
    mlp = ours.blocks[1].mlp
    assert (mlp.w12.weight.shape, mlp.w3.weight.shape) == ((2 * 4096, 1536), (1536, 4096))
    assert not hasattr(mlp, "fc1")
    x = image(98, 126)
    compare_features(ours.forward_features(x), ref.forward_features(x))


@torch.no_grad()
def test_chunked_checkpoint_loads_and_matches() -> None:
    """Training checkpoints of the official code use ``blocks.{chunk}.{i}`` keys (FSDP wrapping units)."""
    ours, ref = official_pair("vit_small", depth=4, seed=2, block_chunks=2)
    chunked_keys = [k for k in ref.state_dict() if k.startswith("blocks.")]
    assert "blocks.1.2.norm1.weight" in chunked_keys and "blocks.1.norm1.weight" not in chunked_keys
    x = image(98, 126)
    compare_features(ours.forward_features(x), ref.forward_features(x))
