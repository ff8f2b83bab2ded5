"""The eight released backbones: architecture (against the official code), strict loading, safe reading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dinov2.models import vision_transformer as official

import dinolab.hub as hub
from dinolab.hub import CheckpointMismatchError, load_strict, read_state_dict
from dinolab.models import DinoVisionTransformer, vit_base, vit_small

OFFICIAL_FACTORY = {"vits14": "vit_small", "vitb14": "vit_base", "vitl14": "vit_large", "vitg14": "vit_giant2"}
# parameter counts of the released models (millions; DINOv2 paper / spec table)
PARAMS_M = {"vits14": 22.1, "vitb14": 86.6, "vitl14": 304.4, "vitg14": 1136.5}


def _official_shapes(name: str) -> dict[str, torch.Size]:
    """Key -> shape of the official hub model ``name`` (built on the meta device; registers added by hand,
    since the 2023 release of the code predates them: ``register_tokens [1, 4, D]`` is their only extra key)."""
    short = name.split("_")[1]
    factory = getattr(official, OFFICIAL_FACTORY[short])
    ffn = "swiglufused" if short == "vitg14" else "mlp"
    with torch.device("meta"):
        # drop_path_uniform: the official default reads a linspace with .item(), impossible on meta
        model = factory(
            patch_size=14, img_size=518, init_values=1.0, block_chunks=0, ffn_layer=ffn, drop_path_uniform=True
        )
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    if name.endswith("_reg"):
        shapes["register_tokens"] = torch.Size([1, 4, model.embed_dim])
    return shapes


@pytest.mark.parametrize("name", sorted(hub.RELEASED))
def test_architecture_matches_official(name: str) -> None:
    with torch.device("meta"):
        model = getattr(hub, name)(pretrained=False)
    assert {k: v.shape for k, v in model.state_dict().items()} == _official_shapes(name)
    registers = 4 if name.endswith("_reg") else 0
    assert model.num_register_tokens == registers
    # register models were trained with the newer position-embedding resize (target size, antialias)
    assert (model.interpolate_offset, model.interpolate_antialias) == ((0.0, True) if registers else (0.1, False))
    assert not model.training
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions == pytest.approx(PARAMS_M[name.split("_")[1]], abs=0.2)


def test_strict_load_lists_every_problem_with_a_hint() -> None:
    model = vit_small(depth=2, img_size=56, num_register_tokens=4)
    with torch.device("meta"):
        theirs = vit_base(depth=2, img_size=518).state_dict()
    theirs["extra.weight"] = torch.zeros(1)
    del theirs["norm.bias"]
    with pytest.raises(CheckpointMismatchError) as info:
        load_strict(model, theirs, source="ckpt.pth")
    message = str(info.value)
    assert "ckpt.pth does not match" in message
    assert "missing keys: norm.bias, register_tokens" in message
    assert "unexpected keys: extra.weight" in message
    assert "blocks.0.attn.proj.bias: checkpoint (768,) vs model (384,)" in message
    assert "(34 in all)" in message  # every tensor but norm.bias mismatches; the list is cut after 12
    assert "hint: the checkpoint looks like vit_base/14 with 0 register tokens (stored for 518px)" in message


def test_strict_load_does_not_partially_load() -> None:
    model = vit_small(depth=1, img_size=28)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    theirs = {k: torch.ones_like(v) for k, v in before.items()}
    theirs["pos_embed"] = torch.ones(1, 5, 7)
    with pytest.raises(CheckpointMismatchError, match="pos_embed: checkpoint"):
        load_strict(model, theirs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _RunsCodeWhenUnpickled:
    """A pickle payload that would create a file if unpickling ran arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_objects_are_refused_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1), "payload": _RunsCodeWhenUnpickled(marker)}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "weights_only=True" in message
    assert "torch.save(model.state_dict(), path)" in message and ".safetensors" in message
    assert not marker.exists()


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pth"):
        hub.dinov2_vits14(weights=tmp_path / "nope.pth")


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"teacher": {f"backbone.{k}": v for k, v in sd.items()}},  # official teacher_checkpoint.pth
        lambda sd: {
            "model": {  # official full training checkpoint: student and teacher side by side
                **{f"student.backbone.{k}": torch.zeros_like(v) for k, v in sd.items()},
                **{f"teacher.backbone.{k}": v for k, v in sd.items()},
                "teacher.dino_head.last_layer.weight": torch.zeros(3, 2),
            },
            "iteration": 7,
        },
    ],
    ids=["plain", "teacher", "training"],
)
def test_reads_backbone_out_of_training_checkpoints(tmp_path: Path, random_backbone, wrap) -> None:
    model = random_backbone("dinov2_vits14", depth=1)
    torch.save(wrap(model.state_dict()), tmp_path / "ckpt.pth")
    read = read_state_dict(tmp_path / "ckpt.pth")
    assert read.keys() == model.state_dict().keys()
    assert all(torch.equal(read[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["dinov2_vits14", "dinov2_vits14_reg"])
@torch.no_grad()
def test_entry_point_loads_a_released_file(tmp_path: Path, random_backbone, name: str) -> None:
    """Save random weights as a released ``.pth`` file; the entry point loads them all, strictly, in eval mode.

    Reduced depth keeps it fast; ``test_full_size_round_trip`` (slow) does the same for all eight full models."""
    source = random_backbone(name, depth=3, seed=1)
    path = tmp_path / f"{name}_pretrain.pth"
    torch.save(source.state_dict(), path)
    model = getattr(hub, name)(weights=str(path), depth=3)
    assert isinstance(model, DinoVisionTransformer) and not model.training
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    x = torch.randn(2, 3, 56, 70)
    out = model.forward_features(x)
    expected = source.eval().forward_features(x)
    assert out["x_norm_patchtokens"].shape == (2, 20, 384)
    assert torch.equal(out["x_prenorm"], expected["x_prenorm"])
    assert torch.equal(model(x), expected["x_norm_clstoken"])


def test_entry_point_refuses_a_file_of_another_model(tmp_path: Path, random_backbone) -> None:
    path = tmp_path / "reg.pth"
    torch.save(random_backbone("dinov2_vits14_reg", depth=1).state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected keys: register_tokens(.|\n)*4 register tokens"):
        hub.dinov2_vits14(weights=path, depth=1)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(hub.RELEASED))
@torch.no_grad()
def test_full_size_round_trip(tmp_path: Path, name: str) -> None:
    """Every full-size backbone (ViT-g: 4.5 GB in fp32) saved as a released file and loaded by its entry point."""
    entry = getattr(hub, name)
    source = entry(pretrained=False)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    x = torch.randn(1, 3, 28, 42)
    expected = source(x)
    del source  # one full model in memory at a time
    model = entry(weights=path)
    saved = torch.load(path, mmap=True, weights_only=True)
    assert model.state_dict().keys() == saved.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert torch.equal(model(x), expected)


def test_unknown_names_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown backbone 'dinov2_vitx14'"):
        hub.make_dinov2_model("dinov2_vitx14", pretrained=False)
    with pytest.raises(FileNotFoundError, match="neither a released backbone"):
        hub.load_backbone(tmp_path / "missing.pth")


def test_load_backbone_by_name_without_weights() -> None:
    with torch.device("meta"):
        assert hub.load_backbone("dinov2_vitb14_reg", pretrained=False).num_register_tokens == 4
        assert hub.load_backbone("vit_small", depth=2).n_blocks == 2
