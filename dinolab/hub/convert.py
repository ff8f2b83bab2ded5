"""Checkpoint formats: read any DINOv2 backbone checkpoint and bring it to the released key layout.

One small filter function per foreign format (timm, Hugging Face transformers, chunked training checkpoints,
full training checkpoints), a format detector, strict loading with a readable report, architecture
inference from the weights alone, and safetensors export.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

StateDict = dict[str, Tensor]


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the model: lists missing / unexpected keys and shape mismatches."""


# ----------------------------------------------------------------------------------------------- reading files
def read_state_dict(path: str | Path) -> StateDict:
    """Read a checkpoint file (``.pth``/``.pt``/``.bin`` with ``weights_only=True``, or ``.safetensors``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # SafetensorError, or OSError for a truncated file
            raise CheckpointMismatchError(
                f"{path} is not a readable .safetensors file ({error}); it may be truncated or corrupt: "
                "download or export it again"
            ) from error
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors have many types; name the file and the cause
        raise CheckpointMismatchError(
            f"could not read {path} as a PyTorch checkpoint with weights_only=True ({error}). "
            "dinolab loads only tensors, never pickled code; re-save the file as a plain state dict "
            "(torch.save(model.state_dict(), path)) or as .safetensors"
        ) from error
    return extract_backbone_state_dict(obj)


def extract_backbone_state_dict(obj: Mapping) -> StateDict:
    """Take the backbone weights out of a loaded object: a plain state dict, a training checkpoint of
    dinolab (``{"teacher": ...}``/``{"model": ...}``) or of the official code (``teacher.backbone.*``)."""
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"expected a state dict (a mapping of names to tensors), got {type(obj)}")
    for key in ("teacher_backbone", "teacher", "model", "state_dict"):
        if key in obj and isinstance(obj[key], Mapping):
            return extract_backbone_state_dict(obj[key])
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    for prefix in ("teacher.backbone.", "backbone.", "module.", "model.", "dinov2."):
        if any(k.startswith(prefix) for k in tensors):
            return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors


# ----------------------------------------------------------------------------------------------- formats
def detect_format(state_dict: Mapping[str, Tensor]) -> str:
    """``"dinov2"`` (released layout), ``"chunked"`` (``blocks.{chunk}.{i}``), ``"timm"`` or ``"hf"``."""
    keys = set(state_dict)
    if any(k.startswith("encoder.layer.") or k.startswith("embeddings.") for k in keys):
        return "hf"
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in keys):
        return "chunked"
    if "reg_token" in keys or ("mask_token" not in keys and "blocks.0.norm1.weight" in keys):
        return "timm"
    return "dinov2"


def from_chunked(state_dict: Mapping[str, Tensor]) -> StateDict:
    """``blocks.{chunk}.{i}.*`` (FSDP-chunked training checkpoints; ``i`` is the global index) -> ``blocks.{i}.*``."""
    return {re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", k): v for k, v in state_dict.items()}


def _is_packed_swiglu(state_dict: Mapping[str, Tensor], prefix: str) -> bool:
    fc1, fc2 = state_dict.get(f"{prefix}.fc1.weight"), state_dict.get(f"{prefix}.fc2.weight")
    return fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def from_timm(state_dict: Mapping[str, Tensor]) -> StateDict:
    """timm's ``vit_*_patch14[_reg4]_dinov2`` -> released layout.

    timm drops the mask token (set to zero here: it only matters for masked training) and, for register
    models, folds the CLS position into ``cls_token`` and keeps no CLS position (put back as zero: the sum
    ``cls_token + pos_embed[:, 0]`` is what the model uses, so outputs are identical).
    """
    out: StateDict = {}
    sd = dict(state_dict)
    if "reg_token" in sd:
        out["register_tokens"] = sd.pop("reg_token")
        pos = sd.pop("pos_embed")
        out["pos_embed"] = torch.cat((pos.new_zeros(1, 1, pos.shape[-1]), pos), dim=1)
    swiglu = _is_packed_swiglu(sd, "blocks.0.mlp")
    for key, value in sd.items():
        if key.startswith("head."):
            continue
        if swiglu:
            key = re.sub(r"\.mlp\.fc1\.", ".mlp.w12.", key)
            key = re.sub(r"\.mlp\.fc2\.", ".mlp.w3.", key)
        out[key] = value
    out.setdefault("mask_token", out["cls_token"].new_zeros(1, out["cls_token"].shape[-1]))
    return out


# Files on the Hugging Face Hub (and transformers < 5 models) name the attention projections query / key / value /
# output.dense and the SwiGLU projections weights_in / weights_out; transformers >= 5 models hold them as q_proj /
# k_proj / v_proj / o_proj and gate_proj / up_proj / down_proj in memory. Both layouts are read.
_HF_BLOCK_RENAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.weights_in": "mlp.w12",
    "mlp.weights_out": "mlp.w3",
    "mlp.down_proj": "mlp.w3",
}
# Separate HF linears that the released model fuses: HF name -> (released name, position along the output dim).
_HF_FUSED = {
    "attention.attention.query": ("attn.qkv", 0),
    "attention.attention.key": ("attn.qkv", 1),
    "attention.attention.value": ("attn.qkv", 2),
    "attention.q_proj": ("attn.qkv", 0),
    "attention.k_proj": ("attn.qkv", 1),
    "attention.v_proj": ("attn.qkv", 2),
    "mlp.gate_proj": ("mlp.w12", 0),  # SwiGLU: silu(gate) * up, gate first as in w12
    "mlp.up_proj": ("mlp.w12", 1),
}
_FUSED_PARTS = {"attn.qkv": 3, "mlp.w12": 2}


def from_hf(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` -> released layout (q, k, v fused to qkv;
    SwiGLU gate and up projections fused to w12)."""
    out: StateDict = {}
    fused_parts: dict[tuple[int, str, str], dict[int, Tensor]] = {}
    for key, value in state_dict.items():
        if key == "embeddings.cls_token":
            out["cls_token"] = value
        elif key == "embeddings.mask_token":
            out["mask_token"] = value.reshape(1, -1)
        elif key == "embeddings.position_embeddings":
            out["pos_embed"] = value
        elif key == "embeddings.register_tokens":
            out["register_tokens"] = value
        elif key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("layernorm."):
            out["norm." + key.rsplit(".", 1)[1]] = value
        elif match := re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias|lambda1)$", key):
            index, name, kind = int(match.group(1)), match.group(2), match.group(3)
            if name in _HF_FUSED:
                target, position = _HF_FUSED[name]
                fused_parts.setdefault((index, target, kind), {})[position] = value
            elif kind == "lambda1":
                out[f"blocks.{index}.{_HF_BLOCK_RENAMES[name + '.lambda1']}"] = value
            elif name in _HF_BLOCK_RENAMES:
                out[f"blocks.{index}.{_HF_BLOCK_RENAMES[name]}.{kind}"] = value
            else:
                raise CheckpointMismatchError(f"unknown Hugging Face DINOv2 key {key!r}")
        # pooler / classifier weights are not part of the backbone
    for (index, target, kind), parts in fused_parts.items():
        if len(parts) != _FUSED_PARTS[target]:
            raise CheckpointMismatchError(
                f"Hugging Face checkpoint has only {len(parts)} of the {_FUSED_PARTS[target]} projections that make "
                f"blocks.{index}.{target}.{kind}; the file is incomplete"
            )
        out[f"blocks.{index}.{target}.{kind}"] = torch.cat([parts[i] for i in sorted(parts)])
    return out


def to_timm(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Released layout -> timm's ``vit_*_patch14[_reg4]_dinov2`` (the inverse of :func:`from_timm`).

    The mask token is dropped (timm has none). Register models become timm's ``no_embed_class`` layout: the CLS
    position is added into ``cls_token`` and the position embedding keeps the patch positions only. ViT-g's fused
    SwiGLU ``mlp.w12`` / ``mlp.w3`` become timm's packed ``mlp.fc1`` / ``mlp.fc2`` (gate first in both).
    """
    sd = {k: v for k, v in state_dict.items() if k != "mask_token"}
    if "register_tokens" in sd:
        sd["reg_token"] = sd.pop("register_tokens")
        pos = sd["pos_embed"]
        sd["cls_token"] = sd["cls_token"] + pos[:, :1]
        sd["pos_embed"] = pos[:, 1:]
    renamed = (re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", k) for k in sd)
    return {re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", new): value for new, value in zip(renamed, sd.values())}


# released block parameter -> file name on the Hugging Face Hub (the layout every transformers version reads)
_TO_HF_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj": "attention.output.dense",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "mlp.w3": "mlp.weights_out",
}


def to_hf(state_dict: Mapping[str, Tensor], depth: int | None = None) -> StateDict:
    """Released layout -> Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` in the Hub's file layout
    (the inverse of :func:`from_hf`): ``attn.qkv`` split into query / key / value, SwiGLU ``w12`` kept whole as
    ``weights_in``. Blocks without LayerScale get ``lambda1 = 1`` (transformers always has the scale)."""
    out: StateDict = {}
    dim = state_dict["cls_token"].shape[-1]
    for key, value in state_dict.items():
        if key == "cls_token":
            out["embeddings.cls_token"] = value
        elif key == "mask_token":
            out["embeddings.mask_token"] = value.reshape(1, dim)
        elif key == "pos_embed":
            out["embeddings.position_embeddings"] = value
        elif key == "register_tokens":
            out["embeddings.register_tokens"] = value
        elif key.startswith("patch_embed.proj."):
            out["embeddings.patch_embeddings.projection." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("norm."):
            out["layernorm." + key.rsplit(".", 1)[1]] = value
        elif match := re.match(r"blocks\.(\d+)\.(.+)\.(weight|bias|gamma)$", key):
            prefix, name, kind = f"encoder.layer.{match.group(1)}", match.group(2), match.group(3)
            if name == "attn.qkv":
                for part, tensor in zip(("query", "key", "value"), value.chunk(3)):
                    out[f"{prefix}.attention.attention.{part}.{kind}"] = tensor
            elif name == "mlp.w12":
                out[f"{prefix}.mlp.weights_in.{kind}"] = value
            elif name in ("ls1", "ls2"):
                out[f"{prefix}.layer_scale{name[-1]}.lambda1"] = value
            elif name in _TO_HF_BLOCK:
                out[f"{prefix}.{_TO_HF_BLOCK[name]}.{kind}"] = value
            else:
                raise CheckpointMismatchError(f"no Hugging Face DINOv2 equivalent of {key!r}")
        else:
            raise CheckpointMismatchError(f"no Hugging Face DINOv2 equivalent of {key!r}")
    blocks = depth if depth is not None else 1 + max(int(k.split(".")[2]) for k in out if k.startswith("encoder."))
    for index in range(blocks):
        for scale in ("layer_scale1", "layer_scale2"):
            out.setdefault(f"encoder.layer.{index}.{scale}.lambda1", state_dict["cls_token"].new_ones(dim))
    return out


def to_dinov2_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Any supported format -> the released key layout."""
    fmt = detect_format(state_dict)
    if fmt == "hf":
        return from_hf(state_dict)
    if fmt == "chunked":
        return from_chunked(state_dict)
    if fmt == "timm":
        return from_timm(state_dict)
    return dict(state_dict)


# ----------------------------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class InferredArch:
    """Architecture read off a released-layout state dict."""

    arch_name: str
    patch_size: int
    img_size: int
    num_register_tokens: int
    depth: int
    """Blocks in the checkpoint (the variant's usual depth, or fewer for a reduced-depth model of ours)."""


def infer_arch(state_dict: Mapping[str, Tensor]) -> InferredArch:
    """Guess the ViT variant from the weights' shapes (embed dim, depth, FFN type, registers, grid)."""
    from dinolab.models.vit import ARCHS

    try:
        embed_dim = state_dict["cls_token"].shape[-1]
        patch_size = state_dict["patch_embed.proj.weight"].shape[-1]
        num_positions = state_dict["pos_embed"].shape[1] - 1
    except KeyError as error:
        raise CheckpointMismatchError(f"not a DINOv2 backbone state dict: no {error.args[0]!r} key") from error
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    registers = state_dict["register_tokens"].shape[1] if "register_tokens" in state_dict else 0
    grid = round(num_positions**0.5)
    # the width identifies the variant (and so its number of heads, which no weight shape reveals)
    for name, arch in ARCHS.items():
        if arch.embed_dim == embed_dim:
            return InferredArch(name, patch_size, grid * patch_size, registers, depth)
    raise CheckpointMismatchError(
        f"no known ViT has embed dim {embed_dim}; known: "
        + ", ".join(f"{n} ({a.embed_dim}-d, {a.depth} blocks)" for n, a in ARCHS.items())
    )


# ----------------------------------------------------------------------------------------------- strict loading
def load_strict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """``model.load_state_dict(strict=True)`` with one error that lists every problem at once."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if own[k].shape != state_dict[k].shape
    ]
    if missing or unexpected or shapes:
        lines = [f"{source} does not match the model {type(model).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                shown = ", ".join(items[:12]) + (f", … ({len(items)} in all)" if len(items) > 12 else "")
                lines.append(f"  {title}: {shown}")
        hint = _mismatch_hint(own, state_dict)
        if hint:
            lines.append(f"  hint: {hint}")
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(state_dict, strict=True)


def _mismatch_hint(own: Mapping[str, Tensor], theirs: Mapping[str, Tensor]) -> str:
    try:
        arch = infer_arch(theirs)
    except (CheckpointMismatchError, ValueError):
        return ""
    return (
        f"the checkpoint looks like {arch.arch_name}/{arch.patch_size} with {arch.num_register_tokens} register "
        f"tokens (stored for {arch.img_size}px); build that model or pick the matching dinov2_* entry point"
    )


# ----------------------------------------------------------------------------------------------- export
def save_safetensors(model_or_state_dict: nn.Module | Mapping[str, Tensor], path: str | Path) -> Path:
    """Write backbone weights as ``.safetensors`` (contiguous CPU tensors, atomic rename)."""
    from safetensors.torch import save

    from dinolab.runtime import atomic_write

    sd = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    return atomic_write(path, lambda handle: handle.write(save(tensors, metadata={"format": "dinov2"})))


# ---------------------------------------------------------------------------------- official DINO / iBOT heads
_OFFICIAL_TO_PARAMETRIZED = {
    "last_layer.weight_g": "last_layer.parametrizations.weight.original0",
    "last_layer.weight_v": "last_layer.parametrizations.weight.original1",
}


def head_state_dict_from_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename the keys of an official DINOv2 head state dict to this module's keys.

    ``[prefix]last_layer.weight_g`` / ``weight_v`` (the deprecated ``torch.nn.utils.weight_norm``) become
    ``[prefix]last_layer.parametrizations.weight.original0`` / ``original1``; other keys pass through unchanged,
    so a whole checkpoint (e.g. with ``dino_head.`` prefixes) can be converted at once.
    """
    return {_rename_official_key(key): value for key, value in state_dict.items()}


def _rename_official_key(key: str) -> str:
    for old, new in _OFFICIAL_TO_PARAMETRIZED.items():
        if key == old or key.endswith("." + old):
            return key[: len(key) - len(old)] + new
    return key
