"""Evaluation transforms (the official classification eval transform), normalisation constants, and
:class:`Resolution`: the one description of how images reach a model's input size, used by ``dinolab embed`` /
``pca`` / ``attention``, the classification evaluations and curation's embedding stores."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image
from torch import Tensor
from torchvision import transforms

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def make_normalize() -> transforms.Normalize:
    return transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)


def make_eval_transform(resize_size: int = 256, crop_size: int = 224) -> transforms.Compose:
    """Resize the short side (bicubic) then center-crop, as in the official evaluation (256 -> 224)."""
    return transforms.Compose(
        [
            transforms.Resize(resize_size, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(crop_size),
            transforms.ToTensor(),
            make_normalize(),
        ]
    )


def make_resize_transform(height: int, width: int | None = None) -> transforms.Compose:
    """Resize the whole image to ``height x width`` (bicubic), no crop: dense features of the full picture."""
    return transforms.Compose(
        [
            transforms.Resize((height, width or height), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            make_normalize(),
        ]
    )


@dataclass(frozen=True)
class Resolution:
    """How images are brought to the model's input size.

    ``mode="crop"``: resize the short side to ``resize`` then center-crop ``crop x crop`` (the official evaluation
    transform, 256 -> 224). ``mode="resize"``: resize the whole image to ``height x width`` (dense features of the
    full picture, e.g. 448 for PCA pictures).
    """

    mode: str = "crop"
    resize: int = 256
    """Short side before the center crop (``mode="crop"``)."""
    crop: int = 224
    """Side of the square center crop (``mode="crop"``)."""
    height: int = 224
    """Input height (``mode="resize"``)."""
    width: int = 224
    """Input width (``mode="resize"``)."""

    def __post_init__(self) -> None:
        if self.mode not in ("crop", "resize"):
            raise ValueError(f"resolution mode must be 'crop' or 'resize', got {self.mode!r}")
        sizes = {"resize": self.resize, "crop": self.crop, "height": self.height, "width": self.width}
        for name, value in sizes.items():
            if value <= 0:
                raise ValueError(f"{name} must be a positive number of pixels, got {value}")
        if self.mode == "crop" and self.crop > self.resize:
            raise ValueError(f"crop {self.crop} is larger than resize {self.resize}; choose crop <= resize")

    @classmethod
    def from_resize_crop(cls, resize: int, crop: int) -> Resolution:
        """``resize`` then center-crop ``crop``; ``crop=0`` resizes the whole image to ``resize x resize`` (the
        spelling of curation stores and their ``--resize/--crop`` options)."""
        if crop == 0:
            return cls(mode="resize", height=resize, width=resize)
        return cls(resize=resize, crop=crop)

    @property
    def input_size(self) -> tuple[int, int]:
        """``(height, width)`` of the tensors the model sees."""
        return (self.crop, self.crop) if self.mode == "crop" else (self.height, self.width)

    def check_patch_size(self, patch_size: int) -> None:
        """Raise a clear error when the input size is not a whole number of patches."""
        height, width = self.input_size
        if height % patch_size or width % patch_size:
            flag = f"--crop {self.crop}" if self.mode == "crop" else f"--image-size {height}x{width}"
            near = [max(patch_size, round(side / patch_size) * patch_size) for side in (height, width)]
            raise ValueError(
                f"{flag}: the input size {height}x{width} must be a multiple of the model's patch size {patch_size} "
                f"on both sides; use e.g. {near[0]}x{near[1]} (or {near[0]} for a square input)"
            )

    def transform(self) -> Callable[[Image.Image], Tensor]:
        """PIL image -> normalised ``[3, H, W]`` tensor."""
        if self.mode == "crop":
            return make_eval_transform(self.resize, self.crop)
        return make_resize_transform(self.height, self.width)

    def describe(self) -> dict[str, object]:
        """A JSON-friendly description (for ``summary.json``)."""
        height, width = self.input_size
        if self.mode == "crop":
            return {"mode": "resize_short_side_then_center_crop", "resize": self.resize, "crop": self.crop}
        return {"mode": "resize_whole_image", "height": height, "width": width}


def parse_image_size(text: str) -> tuple[int, int]:
    """``"448"`` -> ``(448, 448)``, ``"448x672"`` -> ``(448, 672)`` (height x width)."""
    parts = text.lower().replace("×", "x").split("x")
    if len(parts) not in (1, 2) or not all(part.strip().isdigit() for part in parts):
        raise ValueError(f"image size {text!r} is not H or HxW in pixels (e.g. 448 or 448x672)")
    height, width = (int(parts[0]), int(parts[-1]))
    if height <= 0 or width <= 0:
        raise ValueError(f"image size {text!r} must be positive")
    return height, width
