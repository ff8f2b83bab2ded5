"""Export a DINOv2 backbone to the formats other tools read, each export checked against the source model.

Formats (``FORMATS``):

* ``released``: the official ``.pth`` / ``.safetensors`` layout (``dinolab.hub.load_backbone`` reads it back);
* ``hf``: a Hugging Face transformers directory (``config.json``, ``model.safetensors``,
  ``preprocessor_config.json``) for ``AutoModel.from_pretrained`` (``Dinov2Model``, or
  ``Dinov2WithRegistersModel`` for register models);
* ``timm``: a state dict for ``timm.create_model("vit_*_patch14[_reg4]_dinov2", ...)``;
* ``onnx``: a graph with dynamic batch, height and width, outputs ``cls_token``, ``patch_tokens`` (and
  ``register_tokens``), opset :data:`ONNX_OPSET`;
* ``torchscript``: the same computation as a traced TorchScript module.

Every export is written to a temporary folder next to the output, read back with the library that will use it,
and compared with the source model on random images at two resolutions (and, for ONNX and TorchScript, at batch
sizes other than the one they were traced with). Only then is it moved into place; a failed check leaves nothing.

Position-embedding resize: the released models without registers resize with the legacy rule (``+0.1`` offset,
no antialias); transformers and timm cannot express it and resize to the target size instead (timm with
antialias). Such exports are exact at the stored grid and follow the library's rule elsewhere: the check then
compares with the source model switched to that rule, and :attr:`ExportResult.notes` states the difference with
the source's own rule. ONNX and TorchScript keep the source's rule exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinolab.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinolab.hub.convert import save_safetensors, to_hf, to_timm
from dinolab.models.layers import LayerScale, Mlp, SwiGLUFFNFused
from dinolab.models.vit import ARCHS, DinoVisionTransformer, position_interpolation

FORMATS = ("released", "hf", "timm", "onnx", "torchscript")
ONNX_OPSET = 18
"""Opset of the ONNX exports: 18 is the first whose ``Resize`` has the ``antialias`` the register models use."""
DEFAULT_TOLERANCE = 1e-4
"""Largest accepted ``max |export - source|``, relative to ``max(1, max |source|)``."""

# architecture -> timm's model name stem (timm calls ViT-g "giant")
_TIMM_NAMES = {"vit_small": "vit_small", "vit_base": "vit_base", "vit_large": "vit_large", "vit_giant2": "vit_giant"}
_ONNX_EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf files stop at 2 GiB: larger models keep weights beside the graph


class ExportError(RuntimeError):
    """The target format cannot express the model, or the written export does not reproduce it."""


class Features(NamedTuple):
    """The three outputs every export is compared on (all after the final LayerNorm)."""

    cls: Tensor  # [B, D]
    registers: Tensor  # [B, R, D]
    patches: Tensor  # [B, N, D]


@dataclass(frozen=True)
class ParityCheck:
    """One comparison of an export with the source model on random images."""

    batch: int
    height: int
    width: int
    max_abs_diff: float
    """``max |export - reference|`` over the CLS, register and patch tokens."""
    reference: str
    """``"source"``, or the source with the target's position-embedding resize rule (see the module docstring)."""


@dataclass
class ExportResult:
    """What :func:`export_backbone` wrote and how it was checked."""

    path: Path
    format: str
    checks: list[ParityCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """How to load the export, and where it differs from the source (position-embedding resize)."""
    files: list[Path] = field(default_factory=list)
    """Everything written (the ONNX weights of models over 2 GB live in ``<path>.data``)."""


def infer_format(output: str | os.PathLike) -> str:
    """The format an output path implies: ``.onnx`` -> onnx, ``.ts`` / ``.torchscript`` -> torchscript,
    ``.pth`` / ``.pt`` / ``.safetensors`` -> released, no suffix (a directory) -> hf. timm files need
    ``fmt="timm"``: their suffixes are the released ones."""
    suffix = Path(output).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".ts", ".torchscript"):
        return "torchscript"
    if suffix in (".pth", ".pt", ".safetensors"):
        return "released"
    if not suffix:
        return "hf"
    raise ValueError(
        f"cannot tell the export format from {str(output)!r}; name a format ({', '.join(FORMATS)}) or use a "
        ".pth / .safetensors / .onnx / .ts path or a directory (Hugging Face)"
    )


# ----------------------------------------------------------------------------------------------- model facts
def _stored_grid(model: DinoVisionTransformer) -> int:
    return math.isqrt(model.pos_embed.shape[1] - 1)


def _arch_name(model: DinoVisionTransformer) -> str | None:
    heads = model.blocks[0].attn.num_heads
    return next((n for n, a in ARCHS.items() if a.embed_dim == model.embed_dim and a.num_heads == heads), None)


def _ffn_kind(model: DinoVisionTransformer) -> str:
    mlp = model.blocks[0].mlp
    return "swiglu" if isinstance(mlp, SwiGLUFFNFused) else "mlp" if isinstance(mlp, Mlp) else type(mlp).__name__


def _has_layerscale(model: DinoVisionTransformer) -> bool:
    return isinstance(model.blocks[0].ls1, LayerScale)


def _mlp_ratio(model: DinoVisionTransformer) -> float:
    mlp = model.blocks[0].mlp
    return mlp.fc1.out_features / model.embed_dim if isinstance(mlp, Mlp) else 4.0


def _biases(model: DinoVisionTransformer) -> dict[str, bool]:
    block = model.blocks[0]
    ffn = block.mlp.fc1 if isinstance(block.mlp, Mlp) else block.mlp.w12
    return {
        "qkv": block.attn.qkv.bias is not None,
        "proj": block.attn.proj.bias is not None,
        "ffn": ffn.bias is not None,
    }


Rule = tuple[float, bool]  # (interpolate_offset, interpolate_antialias)


def _rule(model: DinoVisionTransformer) -> Rule:
    return (float(model.interpolate_offset), bool(model.interpolate_antialias))


def _describe_rule(rule: Rule) -> str:
    offset, antialias = rule
    if offset:
        return f"legacy offset {offset:g}, {'with' if antialias else 'no'} antialias"
    return f"to the target size, {'with' if antialias else 'no'} antialias"


@contextlib.contextmanager
def _resize_rule(model: DinoVisionTransformer, rule: Rule | None) -> Iterator[None]:
    """Run ``model`` with another position-embedding resize rule (the one the target library uses)."""
    if rule is None or rule == _rule(model):
        yield
        return
    saved = _rule(model)
    model.interpolate_offset, model.interpolate_antialias = rule
    model._pos_embed_cache = None  # the cache key does not include the rule
    try:
        yield
    finally:
        model.interpolate_offset, model.interpolate_antialias = saved
        model._pos_embed_cache = None


# ----------------------------------------------------------------------------------------------- traceable model
def legacy_bicubic_matrix(out_size: int, in_size: int, offset: float) -> Tensor:
    """``[out, in]`` weights ``W`` with ``W @ v`` = ``F.interpolate(v, scale_factor=(out + offset) / in,
    mode="bicubic", align_corners=False)`` along one axis (the legacy DINOv2 resize, Keys kernel ``a = -0.75``).

    Written with tensor arithmetic on ``out_size`` so that exporters keep it dynamic: the ``scale_factor`` form of
    ``F.interpolate`` does not survive ``torch.export`` with symbolic sizes.
    """
    a = -0.75
    dst = torch.arange(out_size, dtype=torch.float32)
    size = torch.ones(out_size, dtype=torch.float64).sum()  # out_size as a tensor: the scale stays in the graph
    # PyTorch takes the inverse scale in double and rounds it to float once; so does this, to agree to the last bit
    inverse_scale = (in_size / (size + offset)).float()
    src = (dst + 0.5) * inverse_scale - 0.5  # source coordinate of each output sample
    base = src.floor()
    t = src - base  # [out], in [0, 1)
    near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1  # noqa: E731  (|x| <= 1)
    far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # noqa: E731  (1 < |x| < 2)
    weights = torch.stack([far(t + 1), near(t), near(1 - t), far((1 - t) + 1)], dim=-1)  # [out, 4]
    taps = (base[:, None] + torch.arange(-1, 3, dtype=torch.float32)).clamp(0, in_size - 1)  # [out, 4], edge-clamped
    columns = torch.arange(in_size, dtype=torch.float32)
    return ((taps[..., None] == columns).to(weights.dtype) * weights[..., None]).sum(dim=1)  # [out, in]


class TraceableBackbone(nn.Module):
    """The backbone's inference forward written for exporters: ``pixel_values [B, 3, H, W]`` ->
    ``(cls_token [B, D], patch_tokens [B, h*w, D])``, plus ``register_tokens [B, R, D]`` in the middle for
    register models.

    Same parameters and result as ``model.forward_features``; the position embedding is resized without Python
    branches on the input size (the legacy rule through :func:`legacy_bicubic_matrix`, the target-size rules
    through ``F.interpolate(size=...)``, which is the identity when the size does not change), so one graph serves
    every batch size and resolution.
    """

    def __init__(self, model: DinoVisionTransformer) -> None:
        super().__init__()
        self.model = model
        self.patch_size = model.patch_size
        self.num_register_tokens = model.num_register_tokens
        self.offset, self.antialias = _rule(model)

    def _pos_embed(self, height: int, width: int) -> Tensor:
        pos = self.model.pos_embed.float()  # [1, 1 + M*M, D]
        stored = math.isqrt(pos.shape[1] - 1)
        dim = pos.shape[-1]
        rows, cols = height // self.patch_size, width // self.patch_size
        grid = pos[0, 1:].reshape(stored, stored, dim)  # [M, M, D]
        if self.offset:
            w_rows = legacy_bicubic_matrix(rows, stored, self.offset)  # [h, M]
            w_cols = legacy_bicubic_matrix(cols, stored, self.offset)  # [w, M]
            # the released code uses the stored embedding as is for a square image of the stored grid
            eye_rows = (torch.arange(rows)[:, None] == torch.arange(stored)).float()
            eye_cols = (torch.arange(cols)[:, None] == torch.arange(stored)).float()
            as_stored = (torch.ones(rows).sum() == stored) & (torch.ones(cols).sum() == stored)
            w_rows = torch.where(as_stored, eye_rows, w_rows)
            w_cols = torch.where(as_stored, eye_cols, w_cols)
            resized = torch.einsum("hm,mnd,wn->hwd", w_rows, grid, w_cols)  # [h, w, D]
        else:
            resized = F.interpolate(
                grid.permute(2, 0, 1)[None], size=(rows, cols), mode="bicubic", antialias=self.antialias
            )[0].permute(1, 2, 0)  # [h, w, D]
        patch_pos = resized.reshape(1, -1, dim)
        return torch.cat((pos[:, :1], patch_pos), dim=1)

    def forward(self, pixel_values: Tensor) -> tuple[Tensor, ...]:
        model = self.model
        height, width = pixel_values.shape[-2:]
        x = model.patch_embed(pixel_values)  # [B, N, D]
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x), dim=1)
        x = x + self._pos_embed(height, width).to(x.dtype)
        if model.register_tokens is not None:
            x = torch.cat((x[:, :1], model.register_tokens.expand(x.shape[0], -1, -1).to(x.dtype), x[:, 1:]), dim=1)
        for block in model.blocks:
            x = block(x)
        x = model.norm(x)
        first_patch = 1 + self.num_register_tokens
        if self.num_register_tokens:
            return x[:, 0], x[:, 1:first_patch], x[:, first_patch:]
        return x[:, 0], x[:, first_patch:]


def _as_features(outputs: Sequence[Tensor], registers: int) -> Features:
    if registers:
        cls, regs, patches = outputs
    else:
        cls, patches = outputs
        regs = cls.new_zeros(cls.shape[0], 0, cls.shape[-1])
    return Features(cls, regs, patches)


def _dinolab_features(model: DinoVisionTransformer, x: Tensor) -> Features:
    out = model.forward_features(x)
    return Features(out["x_norm_clstoken"], out["x_norm_regtokens"], out["x_norm_patchtokens"])  # type: ignore[index]


def _tokens_to_features(tokens: Tensor, registers: int) -> Features:
    return Features(tokens[:, 0], tokens[:, 1 : 1 + registers], tokens[:, 1 + registers :])


# ----------------------------------------------------------------------------------------------- targets
@dataclass
class _Target:
    """How one format is written, read back and compared."""

    write: Callable[[DinoVisionTransformer, Path], list[str]]  # writes the export at the path; returns notes
    load: Callable[[Path, DinoVisionTransformer], Callable[[Tensor], Features]]
    rule: Callable[[DinoVisionTransformer], Rule | None]  # the target's resize rule (None: the source's)
    batches: tuple[int, int] = (1, 2)


def _released_write(model: DinoVisionTransformer, path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        save_safetensors(model, path)
    else:
        torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, path)
    return [f"load with dinolab.hub.load_backbone({str(path)!r})"]


def _released_load(path: Path, model: DinoVisionTransformer) -> Callable[[Tensor], Features]:
    from dinolab.hub.backbones import load_backbone

    loaded = load_backbone(path)
    return lambda x: _dinolab_features(loaded, x)


def _released_rule(model: DinoVisionTransformer) -> Rule:
    # load_backbone picks the rule of the released family from the weights (registers or not)
    rule = position_interpolation(model.num_register_tokens)
    return rule["interpolate_offset"], rule["interpolate_antialias"]


# --- Hugging Face transformers
def _hf_config(model: DinoVisionTransformer) -> dict:
    biases = _biases(model)
    if not (biases["proj"] and biases["ffn"]):
        raise ExportError(
            "transformers' DINOv2 always has biases on the attention output and feed-forward layers; "
            "this model has none there (proj_bias / ffn_bias False), so it has no Hugging Face equivalent"
        )
    if _ffn_kind(model) not in ("mlp", "swiglu"):
        raise ExportError(f"transformers' DINOv2 has no {_ffn_kind(model)} feed-forward layer")
    ratio = _mlp_ratio(model)
    if ratio != int(ratio):
        raise ExportError(f"transformers' DINOv2 takes an integer mlp_ratio; this model's is {ratio}")
    grid = _stored_grid(model)
    config = dict(
        hidden_size=model.embed_dim,
        num_hidden_layers=len(model.blocks),
        num_attention_heads=model.blocks[0].attn.num_heads,
        mlp_ratio=int(ratio),
        hidden_act="gelu",
        layer_norm_eps=model.norm.eps,
        image_size=grid * model.patch_size,
        patch_size=model.patch_size,
        num_channels=model.patch_embed.proj.in_channels,
        qkv_bias=biases["qkv"],
        layerscale_value=1.0,
        use_swiglu_ffn=_ffn_kind(model) == "swiglu",
    )
    if model.num_register_tokens:
        config.update(model_type="dinov2_with_registers", architectures=["Dinov2WithRegistersModel"])
        config["num_register_tokens"] = model.num_register_tokens
    else:
        config.update(model_type="dinov2", architectures=["Dinov2Model"])
    return config


def preprocessor_config(resize: int = 256, crop: int = 224) -> dict:
    """The image-processor config of dinolab's evaluation transform (short side ``resize``, bicubic, center crop
    ``crop``, ImageNet mean / std), as on the official ``facebook/dinov2-*`` repositories."""
    return {
        "image_processor_type": "BitImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": resize},
        "resample": 3,  # PIL.Image.BICUBIC
        "do_center_crop": True,
        "crop_size": {"height": crop, "width": crop},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
    }


def _hf_write(model: DinoVisionTransformer, path: Path) -> list[str]:
    from safetensors.torch import save_file

    config = _hf_config(model)
    try:
        from transformers import AutoConfig

        config = AutoConfig.for_model(**config).to_dict()  # the installed version's complete config
    except ImportError as error:
        raise ImportError("the Hugging Face export needs transformers: pip install transformers") from error
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (path / "preprocessor_config.json").write_text(json.dumps(preprocessor_config(), indent=2) + "\n")
    weights = to_hf(model.state_dict(), depth=len(model.blocks))
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in weights.items()},
        str(path / "model.safetensors"),
        {"format": "pt"},
    )
    return [f"load with transformers.AutoModel.from_pretrained({str(path)!r}) ({config['architectures'][0]})"]


def _hf_load(path: Path, model: DinoVisionTransformer) -> Callable[[Tensor], Features]:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        loaded, info = AutoModel.from_pretrained(str(path), output_loading_info=True)
    finally:
        hf_logging.enable_progress_bar()
    problems = {k: v for k, v in info.items() if v}
    if problems:
        raise ExportError(f"transformers did not load every weight of the export: {problems}")
    loaded.eval()
    registers = model.num_register_tokens
    return lambda x: _tokens_to_features(loaded(pixel_values=x).last_hidden_state, registers)


def _hf_rule(model: DinoVisionTransformer) -> Rule:
    # Dinov2Model resizes to the target size without antialias; Dinov2WithRegistersModel with antialias
    return (0.0, bool(model.num_register_tokens))


# --- timm
def timm_model_args(model: DinoVisionTransformer) -> tuple[str, dict]:
    """``(name, kwargs)`` of the ``timm.create_model`` call whose model takes this backbone's timm state dict."""
    arch = _arch_name(model)
    if arch not in _TIMM_NAMES:
        raise ExportError(
            f"timm has DINOv2 models for ViT-S, B, L and g only ({model.embed_dim}-d with "
            f"{model.blocks[0].attn.num_heads} heads is none of them)"
        )
    swiglu = _ffn_kind(model) == "swiglu"
    if swiglu != (arch == "vit_giant2"):
        raise ExportError(
            f"timm's {_TIMM_NAMES[arch]} DINOv2 model has {'a SwiGLU' if arch == 'vit_giant2' else 'an MLP'} "
            f"feed-forward layer; this model's is {_ffn_kind(model)}"
        )
    biases = _biases(model)
    if not (biases["proj"] and biases["ffn"]):
        raise ExportError("timm's DINOv2 models have biases on the attention output and feed-forward layers")
    if not swiglu and _mlp_ratio(model) != 4.0:
        raise ExportError(f"timm's DINOv2 models have mlp_ratio 4; this model's is {_mlp_ratio(model)}")
    registers = model.num_register_tokens
    name = f"{_TIMM_NAMES[arch]}_patch14_{'reg4_' if registers else ''}dinov2"
    kwargs: dict = {"img_size": _stored_grid(model) * model.patch_size, "num_classes": 0, "dynamic_img_size": True}
    if model.patch_size != 14:
        kwargs["patch_size"] = model.patch_size
    if len(model.blocks) != ARCHS[arch].depth:
        kwargs["depth"] = len(model.blocks)
    if registers not in (0, 4):
        kwargs["reg_tokens"] = registers
    if not biases["qkv"]:
        kwargs["qkv_bias"] = False
    return name, kwargs


def _timm_write(model: DinoVisionTransformer, path: Path) -> list[str]:
    name, kwargs = timm_model_args(model)
    weights = {k: v.detach().cpu().contiguous() for k, v in to_timm(model.state_dict()).items()}
    if not _has_layerscale(model):  # timm ignores init_values=None: a unit LayerScale is the same computation
        gammas = {
            f"blocks.{i}.ls{j}.gamma": torch.ones(model.embed_dim) for i in range(len(model.blocks)) for j in (1, 2)
        }
        weights.update(gammas)
    metadata = {"format": "timm", "timm_model": name, "timm_kwargs": json.dumps(kwargs)}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(weights, str(path), metadata=metadata)
    else:
        torch.save(weights, path)
    call = ", ".join([repr(name), "pretrained=False", *(f"{k}={v!r}" for k, v in kwargs.items())])
    return [f"load with timm.create_model({call}).load_state_dict(<the file's tensors>)"]


def _timm_load(path: Path, model: DinoVisionTransformer) -> Callable[[Tensor], Features]:
    try:
        import timm
    except ImportError as error:
        raise ImportError("the timm export is checked in timm: pip install timm") from error
    from dinolab.hub.convert import read_state_dict

    name, kwargs = timm_model_args(model)
    loaded = timm.create_model(name, pretrained=False, **kwargs).eval()
    loaded.load_state_dict(read_state_dict(path), strict=True)
    registers = model.num_register_tokens
    return lambda x: _tokens_to_features(loaded.forward_features(x), registers)


# --- ONNX
def _onnx_write(model: DinoVisionTransformer, path: Path, opset: int = ONNX_OPSET) -> list[str]:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as error:
        raise ImportError("the ONNX export needs onnx and onnxscript: pip install 'dinolab[onnx]'") from error
    wrapper = TraceableBackbone(model).eval()
    patch = model.patch_size
    rows, cols = torch.export.Dim("rows", min=1, max=4096 // patch), torch.export.Dim("cols", min=1, max=4096 // patch)
    batch = torch.export.Dim("batch", min=1, max=65536)
    example = torch.randn(2, model.patch_embed.proj.in_channels, patch * 3, patch * 4)
    outputs = ["cls_token", *(["register_tokens"] if model.num_register_tokens else []), "patch_tokens"]
    large = sum(p.numel() * p.element_size() for p in model.parameters()) > _ONNX_EXTERNAL_DATA_BYTES
    with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(None):
        warnings.simplefilter("ignore")  # the exporter's progress and deprecation chatter; the check decides
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            dynamo=True,
            input_names=["pixel_values"],
            output_names=outputs,
            dynamic_shapes={"pixel_values": {0: batch, 2: patch * rows, 3: patch * cols}},
            opset_version=opset,
            external_data=large,
            verbose=False,
        )
    io = f"input pixel_values [batch, 3, height, width] (multiples of {patch}); outputs {', '.join(outputs)}"
    return [f"ONNX opset {opset}; {io}" + (f"; weights in {path.name}.data" if large else "")]


def _onnx_load(path: Path, model: DinoVisionTransformer) -> Callable[[Tensor], Features]:
    registers = model.num_register_tokens
    try:
        import onnxruntime
    except ImportError:
        # without onnxruntime, the graph is checked through the exported program it was made from
        exported = torch.export.export(TraceableBackbone(model).eval(), (torch.randn(2, 3, 42, 56),))
        warnings.warn("onnxruntime is not installed: the ONNX export was checked in PyTorch only", stacklevel=3)
        return lambda x: _as_features(exported.module()(x), registers)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: _as_features(
        [torch.from_numpy(o) for o in session.run(None, {"pixel_values": x.numpy()})], registers
    )


# --- TorchScript
def _torchscript_write(model: DinoVisionTransformer, path: Path) -> list[str]:
    wrapper = TraceableBackbone(model).eval()
    example = torch.randn(2, model.patch_embed.proj.in_channels, model.patch_size * 3, model.patch_size * 4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about the shape arithmetic; the check decides
        traced = torch.jit.trace(wrapper, (example,), check_trace=False)
    traced.save(str(path))
    return [f"load with torch.jit.load({str(path)!r}); returns (cls_token, [register_tokens,] patch_tokens)"]


def _torchscript_load(path: Path, model: DinoVisionTransformer) -> Callable[[Tensor], Features]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        loaded = torch.jit.load(str(path), map_location="cpu").eval()
    return lambda x: _as_features(loaded(x), model.num_register_tokens)


_TARGETS: dict[str, _Target] = {
    "released": _Target(_released_write, _released_load, _released_rule),
    "hf": _Target(_hf_write, _hf_load, _hf_rule),
    "timm": _Target(_timm_write, _timm_load, lambda model: (0.0, True)),  # timm: target size with antialias
    "onnx": _Target(_onnx_write, _onnx_load, lambda model: None, batches=(1, 3)),
    "torchscript": _Target(_torchscript_write, _torchscript_load, lambda model: None, batches=(1, 3)),
}


# ----------------------------------------------------------------------------------------------- checks
def default_check_sizes(model: DinoVisionTransformer) -> list[tuple[int, int]]:
    """The stored grid's square size (where every library uses the embedding as stored) and a smaller
    non-square one (where each resizes it)."""
    grid, patch = _stored_grid(model), model.patch_size
    return [(grid * patch, grid * patch), (patch * max(2, grid // 2 + 1), patch * max(3, grid // 2 + 3))]


def _max_diff(ours: Features, reference: Features) -> float:
    diffs = [(a.float() - b.float()).abs().max().item() for a, b in zip(ours, reference) if b.numel()]
    return max(diffs)


def _scale(reference: Features) -> float:
    return max([1.0, *(t.abs().max().item() for t in reference if t.numel())])


@torch.no_grad()
def check_export(
    model: DinoVisionTransformer,
    run_export: Callable[[Tensor], Features],
    *,
    sizes: Sequence[tuple[int, int]],
    batches: Sequence[int],
    rule: Rule | None,
    tolerance: float = DEFAULT_TOLERANCE,
    seed: int = 0,
) -> tuple[list[ParityCheck], list[str]]:
    """Compare an export with ``model`` on random images; raise :class:`ExportError` above ``tolerance``.

    ``rule`` is the target's position-embedding resize rule; the reference is ``model`` switched to it. Returns
    the checks and notes stating how much the source's own rule differs, where it does.
    """
    generator = torch.Generator().manual_seed(seed)
    checks, notes = [], []
    same_rule = rule is None or rule == _rule(model)
    reference_name = "source" if same_rule else f"source with the target's resize rule ({_describe_rule(rule)})"
    channels = model.patch_embed.proj.in_channels
    for (height, width), batch in zip(sizes, batches):
        x = torch.randn(batch, channels, height, width, generator=generator)
        with _resize_rule(model, rule):
            reference = _dinolab_features(model, x)
        exported = run_export(x)
        shapes = [tuple(t.shape) for t in exported], [tuple(t.shape) for t in reference]
        if shapes[0] != shapes[1]:
            raise ExportError(
                f"at {batch}x{height}x{width} the export returns shapes {shapes[0]}, the source {shapes[1]}"
            )
        diff = _max_diff(exported, reference)
        checks.append(ParityCheck(batch, height, width, diff, reference_name))
        if not diff <= tolerance * _scale(reference):  # also catches NaN
            raise ExportError(
                f"the export differs from the {reference_name} by {diff:.3g} at {batch}x{channels}x{height}x{width} "
                f"(tolerance {tolerance:g} x max(1, max |features|) = {tolerance * _scale(reference):.3g})"
            )
        if not same_rule:
            own = _max_diff(_dinolab_features(model, x), reference)
            if own > tolerance * _scale(reference):
                notes.append(
                    f"at {height}x{width} the target resizes the position embedding {_describe_rule(rule)}, the "
                    f"source {_describe_rule(_rule(model))}: features differ from the source's by up to {own:.3g} "
                    f"(identical at the stored {_stored_grid(model) * model.patch_size}px square size)"
                )
    return checks, notes


# ----------------------------------------------------------------------------------------------- export
def _cpu_fp32(model: DinoVisionTransformer) -> DinoVisionTransformer:
    params = list(model.parameters())
    if all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params):
        return model
    return copy.deepcopy(model).float().cpu()


def _check_model(model: nn.Module) -> DinoVisionTransformer:
    if not isinstance(model, DinoVisionTransformer):
        raise TypeError(f"export_backbone takes a dinolab DinoVisionTransformer, got {type(model).__name__}")
    if model.pos_embed.shape[1] - 1 != _stored_grid(model) ** 2:
        raise ExportError("the position embedding is not a square grid; no export format can resize it")
    return model


def _move_into_place(written: Path, output: Path) -> list[Path]:
    """Move the export (and any files beside it that share its name, e.g. ONNX ``.data``) to ``output``."""
    moved = []
    for item in sorted(written.parent.iterdir()):
        target = output.parent / (output.name + item.name[len(written.name) :])
        if target.is_dir() and not target.is_symlink():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.replace(old)
            item.replace(target)
            shutil.rmtree(old)
        else:
            item.replace(target)
        moved.append(target)
    return moved


def export_backbone(
    model: DinoVisionTransformer,
    output: str | os.PathLike,
    fmt: str | None = None,
    *,
    check_sizes: Sequence[tuple[int, int]] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    opset: int = ONNX_OPSET,
) -> ExportResult:
    """Write ``model`` to ``output`` in format ``fmt`` (see :data:`FORMATS`; default from the path, see
    :func:`infer_format`) after checking the written export against ``model``.

    The export is made in a temporary folder beside ``output``, loaded back with the library that reads the format
    (transformers, timm, onnxruntime, ``torch.jit.load``, ``load_backbone``) and compared with ``model`` on random
    images at ``check_sizes`` (default :func:`default_check_sizes`). It replaces ``output`` only if every output
    agrees within ``tolerance``; otherwise :class:`ExportError` is raised and nothing is left behind.
    """
    source = _cpu_fp32(_check_model(model))
    fmt = fmt or infer_format(output)
    if fmt not in _TARGETS:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    target = _TARGETS[fmt]
    output = Path(output)
    sizes = list(check_sizes) if check_sizes is not None else default_check_sizes(source)
    if len(sizes) > len(target.batches):
        batches = [target.batches[i % len(target.batches)] for i in range(len(sizes))]
    else:
        batches = list(target.batches[: len(sizes)])
    for height, width in sizes:
        if height % source.patch_size or width % source.patch_size:
            raise ValueError(f"check size {height}x{width} is not a multiple of the patch size {source.patch_size}")
    if output.is_dir() and any(output.iterdir()) and not (output / "config.json").is_file():
        # only an earlier Hugging Face export is replaced; never a folder of other files
        raise FileExistsError(f"{output} is a folder that is not a Hugging Face export; choose a new or empty path")
    output.parent.mkdir(parents=True, exist_ok=True)
    was_training = source.training
    source.eval()
    try:
        with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as tmp:
            written = Path(tmp) / output.name
            if fmt == "onnx":
                notes = _onnx_write(source, written, opset)
            else:
                notes = target.write(source, written)
            notes = [note.replace(str(written), str(output)) for note in notes]
            checks, differences = check_export(
                source,
                target.load(written, source),
                sizes=sizes,
                batches=batches,
                rule=target.rule(source),
                tolerance=tolerance,
            )
            files = _move_into_place(written, output)
    finally:
        source.train(was_training)
    return ExportResult(path=output, format=fmt, checks=checks, notes=notes + differences, files=files)
