"""Evaluation transforms (the official classification eval transform) and normalisation constants."""

from __future__ import annotations

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
