"""``hubconf.py`` at the repository root: the official torch.hub names work through ``torch.hub.load``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

import dinolab.hub as hub
from dinolab.models import DinoVisionTransformer

REPO = Path(__file__).resolve().parents[2]


def test_hubconf_exposes_the_eight_backbones() -> None:
    # torch.hub.list only reads GitHub repositories, so the file is imported the way torch.hub does it
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    entries = {name for name in dir(module) if callable(getattr(module, name)) and not name.startswith("_")}
    assert entries == set(hub.RELEASED)
    assert all(getattr(module, name) is getattr(hub, name) for name in hub.RELEASED)
    assert module.dependencies == ["torch", "torchvision"]


def test_torch_hub_load_local_without_weights() -> None:
    with torch.device("meta"):
        model = torch.hub.load(str(REPO), "dinov2_vits14", source="local", pretrained=False)
    assert isinstance(model, DinoVisionTransformer)
    assert (model.embed_dim, model.n_blocks, model.num_register_tokens, model.patch_size) == (384, 12, 0, 14)


def test_torch_hub_load_local_with_a_weights_file(tmp_path: Path, random_backbone) -> None:
    source = random_backbone("dinov2_vits14_reg", depth=2)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = torch.hub.load(str(REPO), "dinov2_vits14_reg", source="local", weights=str(tmp_path / "w.pth"), depth=2)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
