"""Checkpoint formats: timm and Hugging Face state dicts and files load into dinolab, safetensors export, arch inference.

Numeric parity per format at every input size is in ``tests/models/test_vit_parity_*.py``; here the files round
trip exactly, and register models (whose position-embedding resize timm and HF share with us at any size) are
also compared with the library that wrote the weights.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.vision_transformer import checkpoint_filter_fn
from torch import Tensor, nn
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

import dinolab.hub as hub
from dinolab.hub import (
    CheckpointMismatchError,
    detect_format,
    infer_arch,
    load_backbone,
    read_state_dict,
    save_safetensors,
    to_dinov2_state_dict,
)
from dinolab.models import vit_small


def _perturb(model: nn.Module, seed: int) -> nn.Module:
    """Move every weight away from its init (LayerScale 1e-5, zero biases) so that nothing is trivially equal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


@functools.cache  # built once per module: the models are only read
def timm_source(registers: int) -> nn.Module:
    name = "vit_small_patch14_reg4_dinov2" if registers else "vit_small_patch14_dinov2"
    model = timm.create_model(name, pretrained=False, img_size=518, depth=2, num_classes=0, dynamic_img_size=True)
    return _perturb(model, seed=1)


@functools.cache
def hf_source(registers: int) -> nn.Module:
    common = dict(hidden_size=384, num_hidden_layers=2, num_attention_heads=6, image_size=518, patch_size=14)
    if registers:
        model = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
    else:
        model = Dinov2Model(Dinov2Config(**common))
    return _perturb(model, seed=2)


def _reference_patch_tokens(source: nn.Module, x: Tensor) -> Tensor:
    if isinstance(source, timm.models.VisionTransformer):
        return source.forward_features(x)[:, 1 + source.num_reg_tokens :]
    return source(pixel_values=x).last_hidden_state[:, 1 + getattr(source.config, "num_register_tokens", 0) :]


def _save(state_dict: dict[str, Tensor], path: Path) -> None:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    else:
        torch.save(state_dict, path)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("library", ["timm", "hf"])
@torch.no_grad()
def test_foreign_checkpoints_load_from_files(tmp_path: Path, library: str, registers: int, suffix: str) -> None:
    source = timm_source(registers) if library == "timm" else hf_source(registers)
    foreign = source.state_dict()
    assert detect_format(foreign) == library
    converted = to_dinov2_state_dict(foreign)
    assert detect_format(converted) == "dinov2"

    for kind, state_dict in (("raw", foreign), ("converted", converted)):
        path = tmp_path / f"{kind}{suffix}"
        _save(state_dict, path)
        model = load_backbone(path)
        assert not model.training
        assert (model.n_blocks, model.embed_dim, model.num_register_tokens) == (2, 384, registers)
        assert model.state_dict().keys() == converted.keys()
        assert all(torch.equal(model.state_dict()[k], v) for k, v in converted.items()), kind

    if registers:
        x = torch.randn(2, 3, 42, 56)
        diff = (model.forward_features(x)["x_norm_patchtokens"] - _reference_patch_tokens(source, x)).abs().max()
        assert diff <= 1e-4


def test_timm_conversion_round_trips_through_timm(random_backbone) -> None:
    """released -> timm (timm's own converter) -> released gives back the same model outputs."""
    ours = random_backbone("dinov2_vits14_reg", depth=2)
    ref = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, img_size=518, depth=2, num_classes=0)
    ref.load_state_dict(checkpoint_filter_fn(dict(ours.state_dict()), ref), strict=True)
    back = hub.make_dinov2_model("dinov2_vits14_reg", pretrained=False, depth=2)
    hub.load_strict(back, to_dinov2_state_dict(ref.state_dict()))
    x = torch.randn(1, 3, 42, 42)
    with torch.no_grad():
        torch.testing.assert_close(back.forward_features(x)["x_prenorm"], ours.forward_features(x)["x_prenorm"])


@torch.no_grad()
def test_safetensors_export_reloads_identically(tmp_path: Path, random_backbone) -> None:
    model = random_backbone("dinov2_vits14_reg", depth=2, seed=3).eval()
    path = save_safetensors(model, tmp_path / "out" / "backbone.safetensors")
    assert path == tmp_path / "out" / "backbone.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == ["backbone.safetensors"]  # no temporary file left
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "dinov2"}
    reloaded = load_backbone(path)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())
    x = torch.randn(1, 3, 28, 56)
    assert torch.equal(reloaded(x), model(x))
    # from a state dict with a non-contiguous tensor (safetensors needs contiguous storage)
    state_dict = dict(model.state_dict())
    state_dict["blocks.0.attn.proj.weight"] = state_dict["blocks.0.attn.proj.weight"].t().contiguous().t()
    assert not state_dict["blocks.0.attn.proj.weight"].is_contiguous()
    again = read_state_dict(save_safetensors(state_dict, tmp_path / "sd.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in state_dict.items())


@pytest.mark.parametrize("name", sorted(hub.RELEASED))
def test_infer_arch_of_released_layouts(name: str) -> None:
    with torch.device("meta"):
        state_dict = getattr(hub, name)(pretrained=False).state_dict()
    arch = infer_arch(state_dict)
    spec = hub.RELEASED[name]
    assert arch.arch_name == spec.arch_name
    assert (arch.patch_size, arch.img_size, arch.num_register_tokens) == (14, 518, spec.num_register_tokens)
    assert arch.depth == {"vit_small": 12, "vit_base": 12, "vit_large": 24, "vit_giant2": 40}[spec.arch_name]


def test_infer_arch_reads_grid_and_depth() -> None:
    with torch.device("meta"):
        state_dict = vit_small(img_size=224, depth=3, num_register_tokens=2).state_dict()
    arch = infer_arch(state_dict)
    assert (arch.arch_name, arch.img_size, arch.depth, arch.num_register_tokens) == ("vit_small", 224, 3, 2)


def test_infer_arch_errors_name_the_problem() -> None:
    with pytest.raises(CheckpointMismatchError, match="no 'pos_embed' key"):
        infer_arch({"cls_token": torch.zeros(1, 1, 384), "patch_embed.proj.weight": torch.zeros(384, 3, 14, 14)})
    with torch.device("meta"):
        state_dict = vit_small(depth=1).state_dict()
    state_dict["cls_token"] = torch.zeros(1, 1, 100)
    with pytest.raises(CheckpointMismatchError, match=r"no known ViT has embed dim 100; known: vit_tiny \(192-d"):
        infer_arch(state_dict)


def test_detect_format_of_chunked_training_keys() -> None:
    chunked = {"cls_token": torch.zeros(1), "mask_token": torch.zeros(1), "blocks.1.3.norm1.weight": torch.zeros(1)}
    assert detect_format(chunked) == "chunked"
    assert set(to_dinov2_state_dict(chunked)) == {"cls_token", "mask_token", "blocks.3.norm1.weight"}
