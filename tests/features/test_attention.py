"""Attention maps of the CLS and register tokens: rows of softmax(QK^T / sqrt(d)), checked against a naive
computation from the block's own weights, and the ``dinolab attention`` command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dinolab.cli.main import main
from dinolab.features.attention import token_attention
from dinolab.hub import save_safetensors
from dinolab.models import DinoVisionTransformer, build_vit


def perturbed(registers: int) -> DinoVisionTransformer:
    torch.manual_seed(0)
    model = build_vit("vit_small", depth=3, img_size=56, num_register_tokens=registers, init_values=1.0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model.eval()


def naive_attention(model: DinoVisionTransformer, x: torch.Tensor, block: int) -> torch.Tensor:
    """``[B, heads, T, T]`` from the block's qkv weights: a loop over heads, no shared code with the model's."""
    tokens = model.prepare_tokens_with_masks(x)
    for earlier in model.blocks[:block]:
        tokens = earlier(tokens)
    chosen = model.blocks[block]
    normed = torch.nn.functional.layer_norm(
        tokens, (tokens.shape[-1],), chosen.norm1.weight, chosen.norm1.bias, chosen.norm1.eps
    )
    q, k, _ = (normed @ chosen.attn.qkv.weight.T + chosen.attn.qkv.bias).chunk(3, dim=-1)  # each [B, T, D]
    heads, width = chosen.attn.num_heads, tokens.shape[-1] // chosen.attn.num_heads
    maps = []
    for h in range(heads):
        qh, kh = q[..., h * width : (h + 1) * width], k[..., h * width : (h + 1) * width]
        maps.append(torch.softmax(qh @ kh.transpose(1, 2) / width**0.5, dim=-1))
    return torch.stack(maps, dim=1)


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("block", [0, -1])
@torch.no_grad()
def test_token_attention_is_the_softmax_of_scaled_scores(registers: int, block: int) -> None:
    model = perturbed(registers)
    x = torch.randn(2, 3, 42, 70)  # a non-square size other than the stored 56 px grid
    attention = token_attention(model, x, block=block)
    prefix = 1 + registers
    assert attention.weights.shape == (2, prefix, 6, prefix + 3 * 5)
    torch.testing.assert_close(attention.weights.sum(-1), torch.ones(2, prefix, 6))
    expected = naive_attention(model, x, block if block >= 0 else len(model.blocks) + block)  # [B, heads, T, T]
    torch.testing.assert_close(attention.weights, expected[:, :, :prefix].transpose(1, 2), atol=1e-6, rtol=1e-5)
    assert attention.cls.shape == (2, 6, 3, 5) and attention.registers.shape == (2, registers, 6, 3, 5)
    torch.testing.assert_close(attention.cls[1, 2, 1, 4], expected[1, 2, 0, prefix + 1 * 5 + 4])


def test_block_out_of_range_is_an_error() -> None:
    with pytest.raises(ValueError, match="out of range"):
        token_attention(perturbed(0), torch.randn(1, 3, 28, 28), block=3)


def test_attention_command_writes_per_head_maps(tmp_path: Path) -> None:
    model = perturbed(4)
    checkpoint = save_safetensors(model, tmp_path / "model.safetensors")
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8)).save(images / f"p{i}.png")
    out = tmp_path / "out"
    code = main(["attention", "--model", str(checkpoint), str(images), "--output", str(out), "--image-size", "42x56",
                 "--registers", "--device", "cpu", "--no-progress"])  # fmt: skip
    assert code == 0
    maps = np.load(out / "attention.npy")
    assert maps.shape == (3, 5, 6, 3, 4)  # images, CLS + 4 registers, heads, rows, cols
    assert len(list(out.glob("*_attention.png"))) == 3 and len(list(out.glob("*_reg*.png"))) == 12
    picture = Image.open(out / "000_p0_attention.png")
    assert picture.size[1] == 42 and picture.size[0] > 8 * 56  # input, head mean, then the 6 heads
    assert (out / "paths.txt").read_text().splitlines()[0].endswith("p0.png")
