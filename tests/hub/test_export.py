"""Exports to Hugging Face, timm, ONNX, TorchScript and the released layout, each read back by the library that
uses it and compared with dinolab's features (random weights, reduced depth, stored grid 16x16 = 224 px).

Position-embedding resize: register models resize the same way in dinolab, transformers and timm, so they are
compared with the source at every size. Models without registers keep the legacy ``+0.1`` offset in dinolab;
transformers and timm resize to the target size instead, so off the stored grid they are compared with the source
switched to the library's rule, and the test also shows that the source's own rule differs there.
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel

import dinolab.hub.export as export_module
from dinolab.data.transforms import make_eval_transform
from dinolab.hub import make_dinov2_model
from dinolab.hub.convert import from_hf, from_timm, to_hf, to_timm
from dinolab.hub.export import ExportError, export_backbone, infer_format, legacy_bicubic_matrix
from dinolab.models import DinoVisionTransformer, build_vit

TOL = 1e-4
SQUARE, NON_SQUARE = (224, 224), (126, 182)


@functools.cache
def source(arch: str, registers: int, depth: int = 2) -> DinoVisionTransformer:
    """The released architecture (reduced depth, 224 px grid) with weights moved away from their init."""
    name = {"vit_small": "dinov2_vits14", "vit_base": "dinov2_vitb14"}[arch] + ("_reg" if registers else "")
    model = make_dinov2_model(name, pretrained=False, depth=depth, img_size=224)
    generator = torch.Generator().manual_seed(registers + depth)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith("gamma"):
                param.copy_(torch.rand(param.shape, generator=generator) + 0.5)
            elif key.endswith("bias") or param.dim() == 3 or key == "mask_token":
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
    return model.eval()


def image(height: int, width: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def dinolab_tokens(
    model: DinoVisionTransformer, x: torch.Tensor, rule: tuple[float, bool] | None = None
) -> torch.Tensor:
    """``[B, 1 + R + N, D]`` normalised tokens, optionally with another position-embedding resize rule."""
    saved = (model.interpolate_offset, model.interpolate_antialias)
    if rule is not None:
        model.interpolate_offset, model.interpolate_antialias = rule
        model._pos_embed_cache = None
    try:
        out = model.forward_features(x)
    finally:
        model.interpolate_offset, model.interpolate_antialias = saved
        model._pos_embed_cache = None
    return torch.cat([out["x_norm_clstoken"][:, None], out["x_norm_regtokens"], out["x_norm_patchtokens"]], dim=1)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------- Hugging Face
@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("arch", ["vit_small", "vit_base"])
@torch.no_grad()
def test_hf_directory_loads_without_warnings_and_matches(tmp_path: Path, arch: str, registers: int, caplog) -> None:
    model = source(arch, registers)
    result = export_backbone(model, tmp_path / "hf", check_sizes=[SQUARE, NON_SQUARE])
    assert result.format == "hf" and sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
    ]
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING):
        warnings.simplefilter("error")
        hf = AutoModel.from_pretrained(tmp_path / "hf").eval()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert type(hf).__name__ == ("Dinov2WithRegistersModel" if registers else "Dinov2Model")

    x = image(*SQUARE)  # the stored grid: every library uses the embedding as stored
    assert max_diff(hf(pixel_values=x).last_hidden_state, dinolab_tokens(model, x)) < TOL
    x = image(*NON_SQUARE, batch=3)
    ours = hf(pixel_values=x).last_hidden_state
    if registers:
        assert max_diff(ours, dinolab_tokens(model, x)) < TOL
    else:  # Dinov2Model resizes to the target size without the legacy offset
        assert max_diff(ours, dinolab_tokens(model, x, rule=(0.0, False))) < TOL
        assert max_diff(ours, dinolab_tokens(model, x)) > 1e-3
        assert any("differ from the source" in note for note in result.notes)


def test_hf_image_processor_is_the_eval_transform(tmp_path: Path) -> None:
    export_backbone(source("vit_small", 4), tmp_path / "hf", check_sizes=[SQUARE])
    processor = AutoImageProcessor.from_pretrained(tmp_path / "hf")
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)
    picture = Image.fromarray(noise).filter(ImageFilter.GaussianBlur(3))  # smooth: resamplers agree closely
    theirs = processor(images=picture, return_tensors="pt")["pixel_values"][0]
    ours = make_eval_transform()(picture)
    assert theirs.shape == ours.shape == (3, 224, 224)
    # same resize rule (short side 256, bicubic), crop and normalisation; resampling code differs by a few levels
    assert (theirs - ours).abs().mean() < 0.02


# ----------------------------------------------------------------------------------------------- timm
@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("arch", ["vit_small", "vit_base"])
@torch.no_grad()
def test_timm_file_loads_strictly_and_matches(tmp_path: Path, arch: str, registers: int) -> None:
    model = source(arch, registers)
    path = tmp_path / "timm.safetensors"
    export_backbone(model, path, "timm", check_sizes=[SQUARE, NON_SQUARE])
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    name = f"{arch}_patch14_{'reg4_' if registers else ''}dinov2"
    assert metadata["timm_model"] == name
    net = timm.create_model(name, pretrained=False, img_size=224, depth=2, num_classes=0, dynamic_img_size=True)
    net.load_state_dict(load_file(path), strict=True)
    net.eval()
    x = image(*SQUARE)
    assert max_diff(net.forward_features(x), dinolab_tokens(model, x)) < TOL
    x = image(*NON_SQUARE)
    if registers:  # timm resizes like the register models at every size
        assert max_diff(net.forward_features(x), dinolab_tokens(model, x)) < TOL
    else:  # the documented difference: timm resizes to the target size with antialias, no legacy offset
        assert max_diff(net.forward_features(x), dinolab_tokens(model, x, rule=(0.0, True))) < TOL
        assert max_diff(net.forward_features(x), dinolab_tokens(model, x)) > 1e-3


# ----------------------------------------------------------------------------------------------- ONNX, TorchScript
@pytest.mark.parametrize(
    ("arch", "registers"),
    [("vit_small", 0), ("vit_small", 4), pytest.param("vit_base", 0, marks=pytest.mark.slow), ("vit_base", 4)],
)
@torch.no_grad()
def test_onnx_matches_in_onnxruntime_at_any_size_and_batch(tmp_path: Path, arch: str, registers: int) -> None:
    model = source(arch, registers)
    path = tmp_path / "model.onnx"
    result = export_backbone(model, path, check_sizes=[SQUARE, NON_SQUARE])
    assert result.format == "onnx" and "opset 18" in result.notes[0]
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # small models keep their weights inside
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert names == ["cls_token", *(["register_tokens"] if registers else []), "patch_tokens"]
    # traced at batch 2 and 42x56: other batches, sizes, the legacy branch at the stored grid (224x224)
    for batch, (height, width) in [(1, SQUARE), (5, NON_SQUARE), (3, (98, 308))]:
        x = image(height, width, batch=batch)
        outputs = [torch.from_numpy(o) for o in session.run(None, {"pixel_values": x.numpy()})]
        assert max_diff(torch.cat([outputs[0][:, None], *outputs[1:]], dim=1), dinolab_tokens(model, x)) < TOL


@pytest.mark.parametrize("registers", [0, 4])
@pytest.mark.parametrize("arch", ["vit_small", "vit_base"])
@torch.no_grad()
def test_torchscript_matches_at_any_size_and_batch(tmp_path: Path, arch: str, registers: int) -> None:
    model = source(arch, registers)
    path = tmp_path / "model.ts"
    export_backbone(model, path, check_sizes=[SQUARE, NON_SQUARE])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        loaded = torch.jit.load(str(path))
    for batch, (height, width) in [(1, SQUARE), (4, NON_SQUARE), (2, (518, 266))]:
        x = image(height, width, batch=batch)
        outputs = loaded(x)
        assert max_diff(torch.cat([outputs[0][:, None], *outputs[1:]], dim=1), dinolab_tokens(model, x)) < TOL


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_released_layout_round_trips(tmp_path: Path, suffix: str) -> None:
    from dinolab.hub import load_backbone

    model = source("vit_small", 4)
    export_backbone(model, tmp_path / f"m{suffix}")
    loaded = load_backbone(tmp_path / f"m{suffix}")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------------------- failures
def test_a_broken_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def corrupt(state_dict):
        out = to_timm(state_dict)
        out["blocks.1.attn.qkv.weight"] = out["blocks.1.attn.qkv.weight"] * 1.01
        return out

    monkeypatch.setattr(export_module, "to_timm", corrupt)
    target = tmp_path / "out" / "timm.safetensors"
    target.parent.mkdir()
    with pytest.raises(ExportError, match="differs from the source"):
        export_backbone(source("vit_small", 4), target, "timm", check_sizes=[SQUARE])
    assert list(target.parent.iterdir()) == []

    monkeypatch.setattr(
        export_module, "to_hf", lambda sd, depth: {k: v for k, v in to_hf(sd, depth).items() if "query" not in k}
    )
    with pytest.raises(ExportError, match="did not load every weight"):
        export_backbone(source("vit_small", 4), tmp_path / "out" / "hf", check_sizes=[SQUARE])
    assert list(target.parent.iterdir()) == []


def test_a_failed_export_keeps_the_previous_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "model.ts"
    target.write_bytes(b"previous")
    monkeypatch.setattr(export_module, "check_export", lambda *a, **k: (_ for _ in ()).throw(ExportError("no")))
    with pytest.raises(ExportError):
        export_backbone(source("vit_small", 0), target)
    assert target.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["model.ts"]


def test_formats_that_cannot_express_a_model_say_why(tmp_path: Path) -> None:
    swiglu_small = build_vit("vit_small", depth=1, img_size=56, ffn_layer="swiglufused")
    with pytest.raises(ExportError, match=r"SwiGLU|MLP"):
        export_backbone(swiglu_small, tmp_path / "t.pth", "timm")
    with pytest.raises(ExportError, match="S, B, L and g"):
        export_backbone(build_vit("vit_tiny", depth=1, img_size=56), tmp_path / "t.pth", "timm")
    with pytest.raises(ExportError, match="biases"):
        export_backbone(build_vit("vit_small", depth=1, img_size=56, ffn_bias=False), tmp_path / "hf", "hf")
    assert list(tmp_path.iterdir()) == []


@torch.no_grad()
def test_non_standard_models_export_where_the_format_can_express_them(tmp_path: Path) -> None:
    """Patch 16, 3 blocks, no LayerScale, 2 registers with the legacy resize rule: timm and HF take them."""
    model = build_vit("vit_small", patch_size=16, depth=3, img_size=64, num_register_tokens=2, init_values=None).eval()
    sizes = [(64, 64), (48, 80)]
    export_backbone(model, tmp_path / "hf", check_sizes=sizes)
    export_backbone(model, tmp_path / "t.safetensors", "timm", check_sizes=sizes)
    result = export_backbone(model, tmp_path / "m.onnx", check_sizes=sizes)
    assert all(check.reference == "source" for check in result.checks)
    hf = AutoModel.from_pretrained(tmp_path / "hf").eval()
    x = image(*sizes[1])
    assert max_diff(hf(pixel_values=x).last_hidden_state, dinolab_tokens(model, x, rule=(0.0, True))) < TOL


def test_infer_format() -> None:
    assert [infer_format(p) for p in ("a.onnx", "a.ts", "a.pth", "a.safetensors", "dir")] == [
        "onnx",
        "torchscript",
        "released",
        "released",
        "hf",
    ]
    with pytest.raises(ValueError, match="cannot tell"):
        infer_format("a.zip")


# ----------------------------------------------------------------------------------------------- conversions
@pytest.mark.parametrize("registers", [0, 4])
def test_hf_and_timm_mappings_invert_the_readers(registers: int) -> None:
    model = source("vit_small", registers)
    state = model.state_dict()
    back = from_hf(to_hf(state))
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    back = from_timm(to_timm(state))
    assert back.keys() == state.keys()
    # timm keeps no mask token and (register models) folds the CLS position into the CLS token
    assert torch.equal(back["mask_token"], torch.zeros_like(state["mask_token"]))
    assert torch.equal(back["cls_token"] + back["pos_embed"][:, :1], state["cls_token"] + state["pos_embed"][:, :1])
    assert all(torch.equal(back[k], state[k]) for k in state if k not in ("mask_token", "cls_token", "pos_embed"))
    assert torch.equal(back["pos_embed"][:, 1:], state["pos_embed"][:, 1:])


def test_legacy_resize_matrix_is_the_interpolation_it_replaces() -> None:
    grid = torch.randn(1, 4, 37, 37, generator=torch.Generator().manual_seed(0))
    for rows, cols in [(16, 16), (16, 22), (1, 5), (37, 37), (74, 9)]:
        expected = F.interpolate(grid, scale_factor=((rows + 0.1) / 37, (cols + 0.1) / 37), mode="bicubic")
        ours = torch.einsum(
            "hm,bcmn,wn->bchw", legacy_bicubic_matrix(rows, 37, 0.1), grid, legacy_bicubic_matrix(cols, 37, 0.1)
        )
        assert ours.shape == expected.shape and max_diff(ours, expected) < 2e-5


def test_a_folder_of_other_files_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"keep me")
    with pytest.raises(FileExistsError, match="not a Hugging Face export"):
        export_backbone(source("vit_small", 0), tmp_path / "photos", "hf")
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"keep me"
