"""The DINOv2 Vision Transformer, with the released models' exact architecture and state-dict keys.

API-compatible with the official torch.hub backbones: ``forward_features``, ``forward``,
``get_intermediate_layers`` behave the same, so code written for ``torch.hub.load("facebookresearch/dinov2", …)``
runs unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinolab.models.layers import Block, PatchEmbed


@dataclass(frozen=True)
class ViTArch:
    """Architecture of a ViT variant (the released models' values)."""

    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    ffn_layer: str = "mlp"


ARCHS: dict[str, ViTArch] = {
    "vit_tiny": ViTArch(192, 12, 3),
    "vit_small": ViTArch(384, 12, 6),
    "vit_base": ViTArch(768, 12, 12),
    "vit_large": ViTArch(1024, 24, 16),
    "vit_giant2": ViTArch(1536, 40, 24, ffn_layer="swiglufused"),
}


def position_interpolation(num_register_tokens: int) -> dict[str, float | bool]:
    """How the released family interpolates its position embedding to another grid, as constructor keywords:
    the register models were trained with the newer rule (target size, antialias), the others with the legacy
    one (scale factor ``(n + 0.1) / M``, no antialias)."""
    if num_register_tokens:
        return {"interpolate_offset": 0.0, "interpolate_antialias": True}
    return {"interpolate_offset": 0.1, "interpolate_antialias": False}


class DinoVisionTransformer(nn.Module):
    """Vision Transformer backbone of DINOv2.

    Tokens: patch embedding -> masked patches replaced by ``mask_token`` -> CLS prepended -> position
    embedding added (interpolated to the input grid) -> register tokens inserted after CLS (no position
    embedding) -> blocks -> LayerNorm.
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = True,
        init_values: float | None = 1e-5,
        ffn_layer: str = "mlp",
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        efficient_drop_path: bool = True,
        block_chunks: int = 0,
    ) -> None:
        """``block_chunks`` is accepted for signature compatibility with the official code and ignored: the
        blocks are always a flat list (chunked checkpoints are converted on load)."""
        super().__init__()
        del block_chunks
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset
        self._pos_embed_cache: tuple[tuple, Tensor] | None = None

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                proj_bias=proj_bias,
                ffn_bias=ffn_bias,
                init_values=init_values,
                drop_path=rate,
                ffn_layer=ffn_layer,
                efficient_drop_path=efficient_drop_path,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    # ----------------------------------------------------------------------------------------------- init
    def init_weights(self, linear_init: str = "trunc_normal") -> None:
        """The official initialisation: truncated normal (std 0.02) for linears and the position embedding.

        ``linear_init="xavier_uniform"`` initialises the blocks' linear layers xavier-uniform instead (the tokens
        and position embedding as before): at std 0.02 a narrow ViT starts with tiny residual branches, which
        small models trained briefly do not recover from as well.
        """
        if linear_init not in ("trunc_normal", "xavier_uniform"):
            raise ValueError(f"linear_init must be trunc_normal or xavier_uniform, got {linear_init!r}")
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if linear_init == "xavier_uniform":
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    # ----------------------------------------------------------------------------------------------- tokens
    def interpolate_pos_encoding(self, x: Tensor, height: int, width: int) -> Tensor:
        """Position embedding for an ``height x width`` image, bicubically resized in fp32 from the stored grid.

        Models without registers use the legacy offset (scale factor ``(n + 0.1) / M``, no antialias); register
        models pass the target size directly with antialias. Skipped when the grid matches and the image is
        square, as in the released code. In inference (eval mode, no grad) the result is cached for the last
        size: a released model stores its grid for 518 px and would otherwise resize it on every 224 px batch.
        """
        if x.shape[1] - 1 == self.pos_embed.shape[1] - 1 and height == width:
            return self.pos_embed
        if self.training or torch.is_grad_enabled():
            return self._resize_pos_embed(height, width, x.dtype)
        # the parameter's version counter changes with every in-place update (load_state_dict, optimiser steps)
        key = (height, width, x.dtype, self.pos_embed.device, self.pos_embed.data_ptr(), self.pos_embed._version)
        if self._pos_embed_cache is None or self._pos_embed_cache[0] != key:
            self._pos_embed_cache = (key, self._resize_pos_embed(height, width, x.dtype))
        return self._pos_embed_cache[1]

    def _resize_pos_embed(self, height: int, width: int, dtype: torch.dtype) -> Tensor:
        num_stored = self.pos_embed.shape[1] - 1
        pos_embed = self.pos_embed.float()
        class_pos_embed, patch_pos_embed = pos_embed[:, :1], pos_embed[:, 1:]
        dim = pos_embed.shape[-1]
        rows, cols = height // self.patch_size, width // self.patch_size
        stored = int(math.sqrt(num_stored))
        if stored * stored != num_stored:
            raise ValueError(f"pos_embed holds {num_stored} patch positions, not a square grid")
        grid = patch_pos_embed.reshape(1, stored, stored, dim).permute(0, 3, 1, 2)  # [1, D, M, M]
        if self.interpolate_offset:
            scale = ((rows + self.interpolate_offset) / stored, (cols + self.interpolate_offset) / stored)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", antialias=self.interpolate_antialias)
        if grid.shape[-2:] != (rows, cols):
            raise RuntimeError(f"position embedding resized to {tuple(grid.shape[-2:])}, expected {(rows, cols)}")
        patch_pos_embed = grid.permute(0, 2, 3, 1).reshape(1, rows * cols, dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1).to(dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """``[B, C, H, W]`` image (and optional ``[B, N]`` bool patch mask) -> ``[B, 1 + R + N, D]`` tokens."""
        _, _, height, width = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, height, width)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x

    # ----------------------------------------------------------------------------------------------- forward
    def _output(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        x_norm = self.norm(x)
        first_patch = 1 + self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1:first_patch],
            "x_norm_patchtokens": x_norm[:, first_patch:],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features_list(
        self, x_list: list[Tensor], masks_list: Sequence[Tensor | None] | None = None, packed: bool = True
    ) -> list[dict[str, Tensor | None]]:
        """Several batches of different resolutions (e.g. global and local crops).

        With ``packed`` (default) all token groups go through each block together (sequence packing);
        otherwise one pass per group. Both give the same result.
        """
        masks_list = list(masks_list) if masks_list is not None else [None] * len(x_list)
        if not packed:
            return [self.forward_features(x, m) for x, m in zip(x_list, masks_list)]
        tokens = [self.prepare_tokens_with_masks(x, m) for x, m in zip(x_list, masks_list)]
        for block in self.blocks:
            tokens = block(tokens)
        return [self._output(t, m) for t, m in zip(tokens, masks_list)]

    def forward_features(
        self, x: Tensor | list[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> dict[str, Tensor | None] | list[dict[str, Tensor | None]]:
        """Normalised CLS / register / patch tokens, the pre-norm tokens and the masks (official keys)."""
        if isinstance(x, list):
            return self.forward_features_list(x, masks)  # type: ignore[arg-type]
        tokens = self.prepare_tokens_with_masks(x, masks)  # type: ignore[arg-type]
        for block in self.blocks:
            tokens = block(tokens)
        return self._output(tokens, masks)  # type: ignore[arg-type]

    def forward(self, *args, is_training: bool = False, **kwargs):
        """The normalised CLS token ``[B, D]`` (or, with ``is_training``, the full ``forward_features`` dict)."""
        out = self.forward_features(*args, **kwargs)
        if is_training:
            return out
        return self.head(out["x_norm_clstoken"])  # type: ignore[index]

    def _intermediate_outputs(self, x: Tensor, n: int | Sequence[int]) -> list[Tensor]:
        tokens = self.prepare_tokens_with_masks(x)
        total = len(self.blocks)
        wanted = set(range(total - n, total)) if isinstance(n, int) else set(n)
        if not wanted <= set(range(total)):
            raise ValueError(f"block indices {sorted(wanted)} out of range for a {total}-block model")
        if not isinstance(n, int) and len(wanted) != len(n):
            raise ValueError(f"block indices {list(n)} repeat a block; list each block once")
        if not wanted:  # n=0 or n=[]: nothing to run, as in the official code
            return []
        outputs = []
        for index, block in enumerate(self.blocks):
            tokens = block(tokens)
            if index in wanted:
                outputs.append(tokens)
            if index >= max(wanted):
                break
        return outputs

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
    ) -> tuple:
        """Patch tokens of the last ``n`` blocks (or of the listed block indices), as in the official API.

        Each output is ``[B, N, D]`` (or ``[B, D, h, w]`` with ``reshape``); with ``return_class_token`` each
        item is a ``(patch_tokens, cls_token)`` pair. CLS and register tokens are stripped from the patches.
        """
        outputs = self._intermediate_outputs(x, n)
        if norm:
            outputs = [self.norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        outputs = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            batch, _, height, width = x.shape
            rows, cols = height // self.patch_size, width // self.patch_size
            outputs = [out.reshape(batch, rows, cols, -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
        if return_class_token:
            return tuple(zip(outputs, class_tokens))
        return tuple(outputs)

    @torch.no_grad()
    def get_last_self_attention(self, x: Tensor) -> Tensor:
        """Attention weights ``[B, heads, T, T]`` of the last block (for attention-map pictures)."""
        return self.get_self_attention(x, block=-1)

    @torch.no_grad()
    def get_self_attention(self, x: Tensor, block: int = -1, num_queries: int | None = None) -> Tensor:
        """Attention weights ``[B, heads, Q, T]`` of block ``block`` (negative: from the end) for the first
        ``Q = num_queries`` tokens as queries (all by default; ``1 + num_register_tokens`` is CLS and registers)."""
        index = block + len(self.blocks) if block < 0 else block
        if not 0 <= index < len(self.blocks):
            raise ValueError(f"block {block} out of range for a {len(self.blocks)}-block model")
        tokens = self.prepare_tokens_with_masks(x)
        for earlier in self.blocks[:index]:
            tokens = earlier(tokens)
        chosen = self.blocks[index]
        return chosen.attn.attention_map(chosen.norm1(tokens), num_queries)


def _build(arch_name: str, patch_size: int, **kwargs) -> DinoVisionTransformer:
    arch = ARCHS[arch_name]
    params = dict(
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=arch.mlp_ratio,
        ffn_layer=arch.ffn_layer,
    )
    params.update(kwargs)
    return DinoVisionTransformer(patch_size=patch_size, **params)


def vit_tiny(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    """ViT-Ti (192-d, 12 blocks, 3 heads): not released; for tests and CPU experiments."""
    return _build("vit_tiny", patch_size, **kwargs)


def vit_small(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    """ViT-S (384-d, 12 blocks, 6 heads, 22M parameters)."""
    return _build("vit_small", patch_size, **kwargs)


def vit_base(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    """ViT-B (768-d, 12 blocks, 12 heads, 86M parameters)."""
    return _build("vit_base", patch_size, **kwargs)


def vit_large(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    """ViT-L (1024-d, 24 blocks, 16 heads, 304M parameters)."""
    return _build("vit_large", patch_size, **kwargs)


def vit_giant2(patch_size: int = 14, **kwargs) -> DinoVisionTransformer:
    """ViT-g (1536-d, 40 blocks, 24 heads, SwiGLU FFN, 1.1B parameters)."""
    return _build("vit_giant2", patch_size, **kwargs)


def build_vit(arch_name: str, **kwargs) -> DinoVisionTransformer:
    """Build a backbone by name (``vit_tiny`` … ``vit_giant2``)."""
    if arch_name not in ARCHS:
        raise ValueError(f"unknown architecture {arch_name!r}; choose one of {sorted(ARCHS)}")
    return _build(arch_name, kwargs.pop("patch_size", 14), **kwargs)
