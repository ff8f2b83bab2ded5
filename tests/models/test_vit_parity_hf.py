"""Hugging Face ``Dinov2Model`` / ``Dinov2WithRegistersModel`` weights, converted by ``to_dinov2_state_dict``, must give
dinolab's model the same outputs as the transformers model itself.

Interpolation: HF's ``Dinov2WithRegistersModel`` resizes position embeddings to the target size with antialias,
exactly the rule of the register models, so those are compared at every size. HF's ``Dinov2Model`` resizes to
the target size without the legacy 0.1 offset, so it agrees with the released models without registers (and
with dinolab, which keeps the offset) only at the stored 518x518 grid, where neither interpolates.
"""

from __future__ import annotations

import pytest
import torch
from released_weights import compare_features, dinolab_model, image, max_diff, randomize, uninitialised
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

from dinolab.hub import load_strict, to_dinov2_state_dict

TOL = 1e-4
HF_ARCHS = {"vit_small": (384, 6), "vit_base": (768, 12), "vit_giant2": (1536, 24)}


def hf_model(arch: str, depth: int, registers: int, seed: int) -> nn.Module:
    """A randomly initialised transformers DINOv2 model with the released hyper-parameters (518 px, patch 14)."""
    hidden, heads = HF_ARCHS[arch]
    common = dict(
        hidden_size=hidden,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        mlp_ratio=4,
        image_size=518,
        patch_size=14,
        layerscale_value=1.0,
        use_swiglu_ffn=arch == "vit_giant2",
    )
    if registers:
        model = uninitialised(
            lambda: Dinov2WithRegistersModel(Dinov2WithRegistersConfig(num_register_tokens=registers, **common))
        )
    else:
        model = uninitialised(lambda: Dinov2Model(Dinov2Config(**common)))
    model.load_state_dict(randomize(model.state_dict(), seed), strict=True)
    return model


def hf_features(model: nn.Module, x: Tensor, registers: int) -> dict[str, Tensor]:
    out = model(pixel_values=x, output_hidden_states=True)
    tokens = out.last_hidden_state  # [B, 1 + R + N, D], after the final layernorm
    return {
        "x_norm_clstoken": tokens[:, 0],
        "x_norm_regtokens": tokens[:, 1 : 1 + registers],
        "x_norm_patchtokens": tokens[:, 1 + registers :],
        "x_prenorm": out.hidden_states[-1],  # the last block's output, before the layernorm
    }


def _pair(arch: str, depth: int, registers: int, seed: int):
    ref = hf_model(arch, depth, registers, seed)
    ours = dinolab_model(arch, depth, registers=registers)
    load_strict(ours, to_dinov2_state_dict(ref.state_dict()), source="HF state dict")
    return ours, ref


def _compare(ours: nn.Module, ref: nn.Module, x: Tensor, registers: int) -> None:
    out, expected = ours.forward_features(x), hf_features(ref, x, registers)
    assert out["x_norm_regtokens"].shape[1] == registers
    compare_features(out, expected, TOL)


@pytest.mark.parametrize("arch", ["vit_small", "vit_base"])
@pytest.mark.parametrize(("height", "width"), [(518, 518), (224, 224), (224, 308)])
@torch.no_grad()
def test_register_models_match_hf(arch: str, height: int, width: int) -> None:
    ours, ref = _pair(arch, depth=2, registers=4, seed=20)
    _compare(ours, ref, image(height, width), registers=4)


@pytest.mark.parametrize("arch", ["vit_small", "vit_base"])
@torch.no_grad()
def test_models_without_registers_match_hf_at_518(arch: str) -> None:
    ours, ref = _pair(arch, depth=2, registers=0, seed=21)
    _compare(ours, ref, image(518, 518), registers=0)


@torch.no_grad()
def test_models_without_registers_differ_from_hf_elsewhere() -> None:
    """Documents why only 518 is compared above: HF drops the legacy offset of the models without registers."""
    ours, ref = _pair("vit_small", depth=1, registers=0, seed=22)
    x = image(224, 224)
    assert max_diff(ours.forward_features(x)["x_prenorm"], hf_features(ref, x, 0)["x_prenorm"]) > 1e-3


@torch.no_grad()
def test_giant_swiglu_matches_hf() -> None:
    """HF splits ViT-g's fused ``w12`` into gate and up projections (each 4096 wide); the converter fuses them."""
    ours, ref = _pair("vit_giant2", depth=2, registers=4, seed=23)
    assert ours.blocks[0].mlp.w12.weight.shape == (8192, 1536)
    _compare(ours, ref, image(126, 98), registers=4)


@pytest.mark.parametrize(("arch", "registers"), [("vit_small", 4), ("vit_giant2", 0)])
@torch.no_grad()
def test_hub_file_layout_converts_too(tmp_path, arch: str, registers: int) -> None:
    """Files on the HF Hub keep the older names (``attention.attention.query``, ``mlp.weights_in``) that
    transformers >= 5 renames on load; ``save_pretrained`` writes them back, so it makes such a file here."""
    ref = hf_model(arch, depth=1, registers=registers, seed=24)
    ref.save_pretrained(tmp_path)
    on_disk = load_file(tmp_path / "model.safetensors")
    assert any(".attention.attention.query." in k for k in on_disk)
    from_file, from_memory = to_dinov2_state_dict(on_disk), to_dinov2_state_dict(ref.state_dict())
    assert from_file.keys() == from_memory.keys()
    assert all(torch.equal(from_file[k], from_memory[k]) for k in from_file)
    ours = dinolab_model(arch, depth=1, registers=registers)
    load_strict(ours, from_file)
    if registers:  # without registers HF agrees only at 518 px: too slow for ViT-g here, covered by the tests above
        _compare(ours, ref, image(126, 126), registers=registers)
