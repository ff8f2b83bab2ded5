"""Shared inputs of the hardening tests: tiny images, a tiny checkpoint file, a finished tiny training run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hardening_helpers import tiny_config, write_images

from dinolab.hub import save_safetensors
from dinolab.models.vit import vit_tiny
from dinolab.train.loop import train


@pytest.fixture(scope="session")
def noise_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve small random images and one corrupt file."""
    folder = tmp_path_factory.mktemp("noise_images")
    write_images(folder, 12)
    (folder / "corrupt.jpg").write_bytes(b"this is not an image")
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-block ViT-Ti/14 as a .safetensors file."""
    torch.manual_seed(0)
    return save_safetensors(vit_tiny(depth=2, img_size=56), tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def finished_run(noise_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test_tiny recipe run to the end (6 iterations, checkpoints every 2)."""
    out = tmp_path_factory.mktemp("finished_run")
    assert train(tiny_config(noise_images, out)).finished
    return out
