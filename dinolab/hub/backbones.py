"""The released DINOv2 backbones, with the official torch.hub names and signatures, loaded strictly.

``weights`` takes what the official entry points take (``"LVD142M"``) or a local file / URL of a checkpoint in
any supported format (released ``.pth``, timm, Hugging Face, safetensors, dinolab training checkpoints).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import torch

from dinolab.hub.convert import load_strict, read_state_dict, to_dinov2_state_dict
from dinolab.models.vit import DinoVisionTransformer, build_vit, position_interpolation

BASE_URL = "https://dl.fbaipublicfiles.com/dinov2"
OFFLINE_ENV = "DINOLAB_OFFLINE"


class Weights(Enum):
    LVD142M = "LVD142M"


@dataclass(frozen=True)
class ReleasedBackbone:
    """One row of the table of released backbones."""

    arch_name: str
    num_register_tokens: int
    ffn_layer: str = "mlp"

    @property
    def short(self) -> str:  # "vits14"
        return "vit" + self.arch_name.split("_")[1][0] + "14"

    @property
    def filename(self) -> str:
        suffix = "_reg4" if self.num_register_tokens else ""
        return f"dinov2_{self.short}{suffix}_pretrain.pth"

    @property
    def url(self) -> str:
        return f"{BASE_URL}/dinov2_{self.short}/{self.filename}"


RELEASED: dict[str, ReleasedBackbone] = {
    "dinov2_vits14": ReleasedBackbone("vit_small", 0),
    "dinov2_vitb14": ReleasedBackbone("vit_base", 0),
    "dinov2_vitl14": ReleasedBackbone("vit_large", 0),
    "dinov2_vitg14": ReleasedBackbone("vit_giant2", 0, "swiglufused"),
    "dinov2_vits14_reg": ReleasedBackbone("vit_small", 4),
    "dinov2_vitb14_reg": ReleasedBackbone("vit_base", 4),
    "dinov2_vitl14_reg": ReleasedBackbone("vit_large", 4),
    "dinov2_vitg14_reg": ReleasedBackbone("vit_giant2", 4, "swiglufused"),
}


class WeightsUnavailableError(RuntimeError):
    """Released weights could not be fetched (offline, unreachable host)."""


def is_offline() -> bool:
    """True when ``DINOLAB_OFFLINE`` is set to anything but an empty string, ``0``, ``false`` or ``no``."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def download_weights(url: str, timeout_s: float = 10.0) -> Path:
    """Fetch ``url`` into the torch.hub checkpoint cache (shared with ``torch.hub.load``), once.

    The file is written to a temporary name and renamed when complete (torch.hub's downloader), so an
    interrupted download never leaves a half file. Offline, this fails within ``timeout_s`` with a message
    that says how to pass a local file instead.
    """
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if target.is_file():
        return target
    advice = (
        f"download {url} on a machine with internet and pass it as weights='/path/to/{target.name}', "
        f"or copy it to {target}"
    )
    if is_offline():
        raise WeightsUnavailableError(f"{OFFLINE_ENV} is set and {target} is not cached; {advice}")
    try:  # a quick reachability check, so offline machines fail fast instead of hanging
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s):
            pass
    except urllib.error.HTTPError as error:
        if error.code == 404:
            raise WeightsUnavailableError(f"{url} does not exist (HTTP 404); {advice}") from error
        # the host answered; some servers refuse HEAD requests, so the download itself decides
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise WeightsUnavailableError(f"cannot reach {url} ({error}); {advice}") from error
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(url, str(target), progress=True)
    return target


def resolve_weights(weights: Weights | str | os.PathLike, default_url: str) -> Path:
    """``"LVD142M"`` -> the released file; a URL -> downloaded; a path -> checked to exist."""
    if isinstance(weights, Weights) or str(weights).upper() == Weights.LVD142M.value:
        return download_weights(default_url)
    text = os.fspath(weights)
    if text.startswith(("http://", "https://")):
        return download_weights(text)
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist (pass 'LVD142M', a URL or a local path)")
    return path


def load_checkpoint_into(model: DinoVisionTransformer, path: str | os.PathLike) -> DinoVisionTransformer:
    """Load any supported checkpoint file into ``model`` strictly (converting timm / HF / chunked keys)."""
    state_dict = to_dinov2_state_dict(read_state_dict(path))
    load_strict(model, state_dict, source=str(path))
    return model


def make_dinov2_model(
    name: str,
    *,
    pretrained: bool = True,
    weights: Weights | str | os.PathLike = Weights.LVD142M,
    **kwargs,
) -> DinoVisionTransformer:
    """Build a released backbone by hub name (``dinov2_vits14`` …) and load its weights strictly."""
    if name not in RELEASED:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(RELEASED)}")
    spec = RELEASED[name]
    model_kwargs = dict(
        img_size=518,
        patch_size=14,
        init_values=1.0,
        ffn_layer=spec.ffn_layer,
        num_register_tokens=spec.num_register_tokens,
        **position_interpolation(spec.num_register_tokens),
    )
    model_kwargs.update(kwargs)
    # find (or fail to find) the weights before the slow model construction, so a missing file errors at once
    path = resolve_weights(weights, spec.url) if pretrained else None
    model = build_vit(spec.arch_name, **model_kwargs)
    if path is not None:
        load_checkpoint_into(model, path)
    return model.eval()


def _entry_point(name: str):
    def entry(
        *, pretrained: bool = True, weights: Weights | str | os.PathLike = Weights.LVD142M, **kwargs
    ) -> DinoVisionTransformer:
        return make_dinov2_model(name, pretrained=pretrained, weights=weights, **kwargs)

    spec = RELEASED[name]
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (
        f"DINOv2 {spec.arch_name}/14 with {spec.num_register_tokens} register tokens, pretrained on LVD-142M.\n\n"
        f"``weights``: 'LVD142M' (downloads {spec.filename}), a URL, or a local checkpoint path in any supported "
        "format. Loading is strict."
    )
    return entry


dinov2_vits14 = _entry_point("dinov2_vits14")
dinov2_vitb14 = _entry_point("dinov2_vitb14")
dinov2_vitl14 = _entry_point("dinov2_vitl14")
dinov2_vitg14 = _entry_point("dinov2_vitg14")
dinov2_vits14_reg = _entry_point("dinov2_vits14_reg")
dinov2_vitb14_reg = _entry_point("dinov2_vitb14_reg")
dinov2_vitl14_reg = _entry_point("dinov2_vitl14_reg")
dinov2_vitg14_reg = _entry_point("dinov2_vitg14_reg")


def load_backbone(spec: str | os.PathLike, **kwargs) -> DinoVisionTransformer:
    """A backbone from a hub name (``dinov2_vits14``), an architecture name for random init (``vit_small``),
    or a checkpoint file (architecture inferred from its weights)."""
    from dinolab.hub.convert import infer_arch
    from dinolab.models.vit import ARCHS

    text = os.fspath(spec)
    if text in RELEASED:
        return make_dinov2_model(text, **kwargs)
    if text in ARCHS:
        return build_vit(text, **kwargs).eval()
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{text!r} is neither a released backbone ({', '.join(RELEASED)}), an architecture "
            f"({', '.join(ARCHS)}) nor an existing checkpoint file"
        )
    state_dict = to_dinov2_state_dict(read_state_dict(path))
    arch = infer_arch(state_dict)
    model_kwargs = dict(
        depth=arch.depth,
        patch_size=arch.patch_size,
        img_size=arch.img_size,
        num_register_tokens=arch.num_register_tokens,
        init_values=1.0,
        ffn_layer="swiglufused" if "blocks.0.mlp.w12.weight" in state_dict else "mlp",
        **position_interpolation(arch.num_register_tokens),
    )
    model_kwargs.update(kwargs)  # the caller may override any of them (e.g. the interpolation rule)
    model = build_vit(arch.arch_name, **model_kwargs)
    load_strict(model, state_dict, source=str(path))
    return model.eval()
