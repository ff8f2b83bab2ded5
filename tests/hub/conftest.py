from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from dinolab.hub import make_dinov2_model
from dinolab.models import DinoVisionTransformer


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch.hub cache (weights land in ``<cache>/checkpoints``), online mode."""
    cache = tmp_path / "torch_hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(cache))
    monkeypatch.delenv("DINOLAB_OFFLINE", raising=False)
    return cache


@pytest.fixture
def random_backbone() -> Callable[..., DinoVisionTransformer]:
    """``make(hub_name, depth, seed)``: the released architecture (reduced depth) with random, non-trivial weights:
    LayerScale gammas ~ U(0.5, 1.5), non-zero biases, random tokens and position embedding."""

    def make(name: str, depth: int = 2, seed: int = 0) -> DinoVisionTransformer:
        model = make_dinov2_model(name, pretrained=False, depth=depth)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, param in model.named_parameters():
                if key.endswith("gamma"):
                    param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
                elif key.endswith("bias") or param.dim() == 3 or key == "mask_token":
                    param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        return model

    return make
