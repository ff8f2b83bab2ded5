"""Random weights in the released DINOv2 format, built from the official code's own state dict.

The keys and shapes come from the official ``dinov2`` package (April 2023 release, used only as a test
reference), so a state dict made here is a faithful stand-in for a released ``dinov2_vit*14_pretrain.pth``
file. That release predates registers: the register models' only extra key, ``register_tokens [1, R, D]``,
is added by hand (it is the one difference between the ``_reg4`` files and the plain ones).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from dinov2.layers import MemEffAttention, NestedTensorBlock
from dinov2.models.vision_transformer import DinoVisionTransformer as OfficialViT
from torch import Tensor, nn

from dinolab.hub import load_strict, make_dinov2_model, to_dinov2_state_dict

StateDict = dict[str, Tensor]

HUB_NAMES = {
    "vit_small": "dinov2_vits14",
    "vit_base": "dinov2_vitb14",
    "vit_large": "dinov2_vitl14",
    "vit_giant2": "dinov2_vitg14",
}
# (embed dim, heads, FFN) of the official factories ``dinov2.models.vision_transformer.vit_*``, whose depth is
# fixed; ViT-g's FFN is chosen by its hub entry point (``ffn_layer="swiglufused"``).
OFFICIAL_ARCHS = {
    "vit_small": (384, 6, "mlp"),
    "vit_base": (768, 12, "mlp"),
    "vit_large": (1024, 16, "mlp"),
    "vit_giant2": (1536, 24, "swiglufused"),
}


def uninitialised(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` without running its weight init (slow for big models): built on the meta device, then given
    empty CPU storage. Every caller loads a full state dict strictly right after."""
    with torch.device("meta"):
        model = build()
    return model.to_empty(device="cpu").eval()


def official_model(arch: str, depth: int, block_chunks: int = 0) -> nn.Module:
    """The official backbone as its torch.hub entry point builds it (518 px, LayerScale, patch 14), any depth.

    Uninitialised: load weights next."""
    embed_dim, num_heads, ffn_layer = OFFICIAL_ARCHS[arch]
    return uninitialised(
        lambda: OfficialViT(
            img_size=518,
            patch_size=14,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=4,
            init_values=1.0,
            ffn_layer=ffn_layer,
            block_chunks=block_chunks,
            drop_path_uniform=True,  # its default (a linspace read with .item()) cannot run on the meta device
            block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
        )
    )


def randomize(state_dict: StateDict, seed: int) -> StateDict:
    """Non-trivial random values for every tensor, chosen by its role so activations stay O(1).

    LayerScale gammas ~ U(0.5, 1.5) (released models have gammas far from the 1e-5 init), non-zero biases,
    norm weights around 1, linear/conv weights ~ N(0, 1/fan_in), random tokens and position embeddings.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, std: float, mean: float = 0.0) -> Tensor:
        return mean + std * torch.randn(shape, generator=generator)

    out: StateDict = {}
    for key, value in state_dict.items():
        if key.endswith(("gamma", "lambda1")):
            out[key] = torch.rand(value.shape, generator=generator) + 0.5
        elif "norm" in key and key.endswith("weight"):
            out[key] = normal(value.shape, 0.2, mean=1.0)
        elif key.endswith("bias"):
            out[key] = normal(value.shape, 0.1)
        elif key.endswith("weight"):
            out[key] = normal(value.shape, value[0].numel() ** -0.5)
        else:  # cls / mask / register tokens, position embedding
            out[key] = normal(value.shape, 0.5)
    return out


def released_state_dict(arch: str, depth: int, registers: int = 0, seed: int = 0) -> StateDict:
    """A random state dict with the released keys of ``arch`` at reduced ``depth`` (``_reg4`` layout if asked)."""
    state_dict = dict(official_model(arch, depth).state_dict())
    if registers:
        embed_dim = state_dict["cls_token"].shape[-1]
        state_dict["register_tokens"] = torch.zeros(1, registers, embed_dim)
    return randomize(state_dict, seed)


def dinolab_model(arch: str, depth: int, registers: int = 0) -> nn.Module:
    """dinolab's backbone configured exactly as the hub entry point ``dinov2_vit?14[_reg]`` (reduced depth).

    Uninitialised: load weights next."""
    name = HUB_NAMES[arch] + ("_reg" if registers else "")
    return uninitialised(lambda: make_dinov2_model(name, pretrained=False, depth=depth))


def image(height: int, width: int, batch: int = 1, seed: int = 0) -> Tensor:
    """A random normalised-image-like batch ``[B, 3, H, W]``."""
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


def max_diff(a: Tensor, b: Tensor) -> float:
    """Largest absolute difference (shapes must match exactly)."""
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a - b).abs().max().item() if a.numel() else 0.0


def compare_features(ours: dict, ref: dict, tol: float = 1e-4) -> None:
    """CLS, register (when both have them), patch and pre-norm tokens agree to ``tol`` (max abs difference)."""
    keys = ["x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"]
    if "x_norm_regtokens" in ours and "x_norm_regtokens" in ref:
        keys.append("x_norm_regtokens")
    for key in keys:
        assert max_diff(ours[key], ref[key]) <= tol, key


def official_pair(arch: str, depth: int, seed: int = 0, block_chunks: int = 0) -> tuple[nn.Module, nn.Module]:
    """The official model with random released weights and dinolab's model loaded from its state dict."""
    ref = official_model(arch, depth, block_chunks=block_chunks)
    ref.load_state_dict(randomize(ref.state_dict(), seed), strict=True)
    ours = dinolab_model(arch, depth)
    load_strict(ours, to_dinov2_state_dict(ref.state_dict()))
    return ours, ref
