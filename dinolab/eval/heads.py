"""Linear heads on frozen patch tokens for semantic segmentation and depth, and the loaders for the released
DINOv2 heads (mmseg / mmcv checkpoints, read here without mmcv).

Released layouts (``state_dict`` of ``dinov2_vits14_ade20k_linear_head.pth`` / ``..._nyu_linear_head.pth``):

- segmentation ``BNHead``: ``decode_head.bn.{weight,bias,running_mean,running_var,num_batches_tracked}`` and
  ``decode_head.conv_seg.{weight [K, C, 1, 1], bias [K]}``; C = D (last block) or 4·D (last 4 blocks, "ms").
- depth ``BNHead`` (its BatchNorm is disabled in the official code): ``decode_head.conv_depth.{weight
  [256, C, 1, 1], bias}``; C = 2·D (patch tokens with the CLS token) per block, 1 or 4 blocks.

Our modules use the same attribute names, so a released head maps key for key once ``decode_head.`` is removed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinolab.hub.convert import CheckpointMismatchError, load_strict
from dinolab.runtime import autocast_context

Blocks = int | Sequence[int]
"""Which blocks feed a head: ``n`` = the last n blocks, or a list of block indices."""


def official_depth_blocks(n_blocks: int) -> list[int]:
    """The 4 blocks the released 4-layer depth heads read: evenly spread, ending at the last block (fewer for
    models with fewer than 4 blocks)."""
    known = {12: [2, 5, 8, 11], 24: [4, 11, 17, 23], 40: [9, 19, 29, 39]}
    if n_blocks in known:
        return known[n_blocks]
    return sorted({math.ceil((i + 1) * n_blocks / 4) - 1 for i in range(4)})


# ----------------------------------------------------------------------------------------------- features
def center_pad(images: Tensor, multiple: int) -> tuple[Tensor, tuple[int, int]]:
    """Zero-pad ``[B, C, H, W]`` so H and W are multiples of ``multiple``, splitting the padding evenly (the
    official ``CenterPadding``). Returns the padded images and the (top, left) offset of the original."""
    height, width = images.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    top, left = pad_h // 2, pad_w // 2
    padded = F.pad(images, (left, pad_w - left, top, pad_h - top))
    return padded, (top, left)


def dense_features(backbone: nn.Module, images: Tensor, blocks: Blocks, norm: bool, with_cls: bool) -> Tensor:
    """Patch-token maps of the chosen blocks concatenated on channels, ``[B, L·D·(1+with_cls), h, w]``.

    With ``with_cls`` each block contributes ``[patch tokens, CLS broadcast to every patch]`` (the depth heads'
    input); ``images`` must already have sides that are multiples of the patch size.
    """
    outputs = backbone.get_intermediate_layers(images, n=blocks, reshape=True, return_class_token=with_cls, norm=norm)
    maps = []
    for output in outputs:
        if with_cls:
            patches, cls = output  # [B, D, h, w], [B, D]
            maps += [patches, cls[:, :, None, None].expand_as(patches)]
        else:
            maps.append(output)
    return torch.cat(maps, dim=1)


# ----------------------------------------------------------------------------------------------- heads
class LinearSegHead(nn.Module):
    """BatchNorm + 1x1 convolution: per-patch class logits from frozen features (the official ``BNHead``)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_channels)
        self.conv_seg = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        # mmseg's decode heads start from normal(0, 0.01) weights and zero bias
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features: Tensor) -> Tensor:
        return self.conv_seg(self.bn(features))  # [B, C, h, w] -> [B, K, h, w]


def depth_bins(min_depth: float, max_depth: float, n_bins: int, spacing: str = "linear") -> Tensor:
    """Bin centres ``[n_bins]`` from ``min_depth`` to ``max_depth``: evenly spaced ("linear", the official
    "UD") or evenly spaced in log depth ("log"; the official "SID" option called ``torch.logspace(min, max)``,
    i.e. 10^min .. 10^max, which we do not reproduce)."""
    if spacing == "linear":
        return torch.linspace(min_depth, max_depth, n_bins)
    if spacing == "log":
        return torch.exp(torch.linspace(math.log(min_depth), math.log(max_depth), n_bins))
    raise ValueError(f"unknown bin spacing {spacing!r}; choose 'linear' or 'log'")


def bin_weights(logits: Tensor, normalization: str) -> Tensor:
    """Per-pixel weights over bins that sum to 1, ``[B, K, H, W]``.

    "linear" (the released heads): ``(relu(l) + 0.1) / sum_k (relu(l_k) + 0.1)``; "softmax"; "sigmoid":
    ``sigmoid(l) / sum_k sigmoid(l_k)``.
    """
    if normalization == "linear":
        weights = torch.relu(logits) + 0.1
    elif normalization == "softmax":
        return torch.softmax(logits, dim=1)
    elif normalization == "sigmoid":
        weights = torch.sigmoid(logits)
    else:
        raise ValueError(f"unknown bin normalization {normalization!r}; choose 'linear', 'softmax' or 'sigmoid'")
    return weights / weights.sum(dim=1, keepdim=True)


class LinearDepthHead(nn.Module):
    """1x1 convolution to ``n_bins`` logits on features upsampled ``upsample`` times; depth = expectation of the
    bin centres under the normalised logits (the official depth ``BNHead`` with ``classify=True``)."""

    def __init__(
        self,
        in_channels: int,
        n_bins: int = 256,
        min_depth: float = 1e-3,
        max_depth: float = 10.0,
        bin_spacing: str = "linear",
        normalization: str = "linear",
        upsample: int = 4,
    ) -> None:
        super().__init__()
        if not 0 < min_depth < max_depth:
            raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth}, {max_depth}")
        bin_weights(torch.zeros(1, 1, 1, 1), normalization)  # validate the name early
        self.upsample = upsample
        self.normalization = normalization
        self.min_depth, self.max_depth = min_depth, max_depth
        self.conv_depth = nn.Conv2d(in_channels, n_bins, kernel_size=1)
        nn.init.normal_(self.conv_depth.weight, std=0.01)
        nn.init.zeros_(self.conv_depth.bias)
        self.register_buffer("bins", depth_bins(min_depth, max_depth, n_bins, bin_spacing), persistent=False)

    def forward(self, features: Tensor) -> Tensor:
        # features [B, C, h, w] -> depth [B, 1, h·upsample, w·upsample]
        if self.upsample > 1:
            features = F.interpolate(features, scale_factor=self.upsample, mode="bilinear", align_corners=False)
        weights = bin_weights(self.conv_depth(features), self.normalization)  # [B, K, H, W]
        return torch.einsum("bkhw,k->bhw", weights, self.bins.to(weights.dtype)).unsqueeze(1)


# ----------------------------------------------------------------------------------------------- full models
class _FrozenBackboneModel(nn.Module):
    """A frozen backbone (always in eval mode, no gradients) feeding a trainable head."""

    def __init__(self, backbone: nn.Module, head: nn.Module, blocks: Blocks, norm: bool, with_cls: bool) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.head = head
        self.blocks = blocks
        self.norm, self.with_cls = norm, with_cls
        self.patch_size: int = backbone.patch_size
        self.feature_dtype = "fp32"
        """Autocast dtype of the backbone pass ("fp32", "bf16", "fp16"); the head always runs in fp32."""

    def train(self, mode: bool = True) -> _FrozenBackboneModel:
        super().train(mode)
        self.backbone.eval()  # frozen features: dropout / drop-path stay off while the head trains
        return self

    def head_output(self, images: Tensor) -> Tensor:
        """Head output resampled to the input: ``[B, 3, H, W]`` (any H, W) -> ``[B, K, H, W]``."""
        height, width = images.shape[-2:]
        padded, (top, left) = center_pad(images, self.patch_size)
        with torch.no_grad(), autocast_context(images.device, self.feature_dtype):
            features = dense_features(self.backbone, padded, self.blocks, self.norm, self.with_cls)
        out = self.head(features.float())
        out = F.interpolate(out, size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return out[:, :, top : top + height, left : left + width]


class Segmenter(_FrozenBackboneModel):
    """Frozen backbone + :class:`LinearSegHead`; ``forward`` gives class logits at the input resolution.

    ``blocks=1`` is the "linear" variant (last block), ``blocks=4`` the multi-layer one (last 4, concatenated).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, blocks: Blocks = 1) -> None:
        n = blocks if isinstance(blocks, int) else len(blocks)
        super().__init__(backbone, LinearSegHead(n * backbone.embed_dim, num_classes), blocks, True, False)

    def forward(self, images: Tensor) -> Tensor:
        return self.head_output(images)  # [B, K, H, W] logits


class Depther(_FrozenBackboneModel):
    """Frozen backbone + :class:`LinearDepthHead` on un-normalised patch tokens with the CLS token (as the
    released heads); ``forward`` gives depth ``[B, 1, H, W]`` at the input resolution."""

    def __init__(self, backbone: nn.Module, head: LinearDepthHead, blocks: Blocks = 1, with_cls: bool = True) -> None:
        super().__init__(backbone, head, blocks, False, with_cls)

    def forward(self, images: Tensor) -> Tensor:
        return self.head_output(images)


def make_depth_head(
    backbone: nn.Module, blocks: Blocks = 1, with_cls: bool = True, **head_kwargs: object
) -> LinearDepthHead:
    """A :class:`LinearDepthHead` sized for ``backbone`` and the chosen blocks."""
    n = blocks if isinstance(blocks, int) else len(blocks)
    return LinearDepthHead(n * backbone.embed_dim * (2 if with_cls else 1), **head_kwargs)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------- released heads
def read_head_checkpoint(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of an mmseg/mmcv head checkpoint (``{"state_dict": ..., "meta": ...}`` or a bare state dict),
    read with ``weights_only=True`` (tensors and plain data only, never pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"head checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors come in many types; name the file and the cause
        raise CheckpointMismatchError(
            f"could not read {path} with weights_only=True ({error}); re-save it as "
            "torch.save({'state_dict': head_state_dict}, path)"
        ) from error
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping):
        raise CheckpointMismatchError(f"{path}: expected a state dict or {{'state_dict': ...}}, got {type(obj)}")
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def released_to_head_state(state: Mapping[str, Tensor], head: nn.Module, source: str = "checkpoint") -> dict:
    """Map ``decode_head.*`` keys onto ``head``'s own keys. Backbone keys (``backbone.*``) are ignored, any other
    key is an error; a missing ``num_batches_tracked`` (older mmcv) is filled in."""
    other = sorted(k for k in state if not k.startswith(("decode_head.", "backbone.")))
    if other:
        raise CheckpointMismatchError(
            f"{source}: keys {other[:6]} are neither decode_head.* nor backbone.*; is this an mmseg head checkpoint?"
        )
    mapped = {k.removeprefix("decode_head."): v for k, v in state.items() if k.startswith("decode_head.")}
    own = head.state_dict()
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in mapped:
            mapped[key] = torch.zeros_like(value)
    return mapped


def load_released_head(head: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Tensor]) -> nn.Module:
    """Load a released / mmseg-layout head checkpoint into ``head`` strictly (one error lists every problem)."""
    source = str(checkpoint) if not isinstance(checkpoint, Mapping) else "state dict"
    state = read_head_checkpoint(checkpoint) if not isinstance(checkpoint, Mapping) else dict(checkpoint)
    load_strict(head, released_to_head_state(state, head, source), source=source)
    return head


def seg_head_from_checkpoint(checkpoint: str | os.PathLike | Mapping[str, Tensor]) -> LinearSegHead:
    """A :class:`LinearSegHead` shaped and filled from a released segmentation head."""
    state = read_head_checkpoint(checkpoint) if not isinstance(checkpoint, Mapping) else dict(checkpoint)
    weight = state.get("decode_head.conv_seg.weight")
    if weight is None or weight.ndim != 4:
        raise CheckpointMismatchError(
            f"{checkpoint if not isinstance(checkpoint, Mapping) else 'state dict'}: no decode_head.conv_seg.weight "
            "[K, C, 1, 1]; this is not a linear (BNHead) segmentation head"
        )
    head = LinearSegHead(in_channels=weight.shape[1], num_classes=weight.shape[0])
    return load_released_head(head, state)  # type: ignore[return-value]


def depth_head_from_checkpoint(
    checkpoint: str | os.PathLike | Mapping[str, Tensor], **head_kwargs: object
) -> LinearDepthHead:
    """A :class:`LinearDepthHead` shaped and filled from a released linear depth head (``head_kwargs``: depth
    range, bin spacing, normalisation, upsample; the defaults are the released heads' NYU settings)."""
    state = read_head_checkpoint(checkpoint) if not isinstance(checkpoint, Mapping) else dict(checkpoint)
    weight = state.get("decode_head.conv_depth.weight")
    if weight is None or weight.ndim != 4:
        raise CheckpointMismatchError(
            "no decode_head.conv_depth.weight [bins, C, 1, 1]: not a linear depth head (DPT heads are not supported)"
        )
    head = LinearDepthHead(in_channels=weight.shape[1], n_bins=weight.shape[0], **head_kwargs)  # type: ignore[arg-type]
    return load_released_head(head, state)  # type: ignore[return-value]


def head_checkpoint(head: nn.Module, meta: Mapping[str, object] | None = None) -> dict[str, object]:
    """``head`` in the released (mmseg) layout: ``{"state_dict": {"decode_head.*": ...}, "meta": meta}``."""
    state = {f"decode_head.{k}": v.detach().cpu() for k, v in head.state_dict().items()}
    return {"state_dict": state, "meta": dict(meta or {})}
