"""DINOv2 multi-crop views: 2 global crops and N local crops per image, with colour and blur augmentations.

Pipelines (torchvision v1 transforms on PIL images; randomness from torch's global RNG, which
:class:`~dinolab.data.datasets.UnlabeledImageDataset` can seed per sample):

    global crop 1: RandomResizedCrop(global_size, global_scale, bicubic) -> hflip -> colour -> blur(p=global1_blur_p)
    global crop 2: RandomResizedCrop(global_size, global_scale, bicubic) -> hflip -> colour -> blur(p=global2_blur_p)
                   -> solarize(threshold, p=global2_solarize_p)
    local crop k:  RandomResizedCrop(local_size, local_scale, bicubic) -> hflip -> colour -> blur(p=local_blur_p)
    colour = ColorJitter(brightness, contrast, saturation, hue) with p=color_jitter_p, then grayscale with p=grayscale_p
    each crop ends with ToTensor and the ImageNet mean/std normalisation.

The blur probabilities are the ones the paper intends (global 1 always, global 2 rarely, locals half the time): the
official ``GaussianBlur`` passes ``1 - p`` to ``RandomApply``, which inverts them (global 1 never blurred, global 2
blurred 90% of the time). Set the ``*_blur_p`` fields to ``0.0 / 0.9 / 0.5`` to reproduce the official behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from PIL import Image
from torch import Tensor
from torchvision import transforms

from dinolab.data.transforms import IMAGENET_MEAN, IMAGENET_STD


@dataclass(kw_only=True)
class AugmentationConfig:
    """Multi-crop views of DINOv2 (the values of the paper, with the intended blur probabilities)."""

    global_size: int = 224
    """Side of the 2 square global crops, in pixels (a multiple of the patch size; 518 in the high-res phase)."""
    local_size: int = 98
    """Side of the square local crops (98 = 7 patches of 14; 96 for patch 16)."""
    local_crops_number: int = 8
    """Local crops per image (0 = global crops only)."""
    global_scale: tuple[float, float] = (0.32, 1.0)
    """Range of the fraction of the image area a global crop covers (RandomResizedCrop ``scale``)."""
    local_scale: tuple[float, float] = (0.05, 0.32)
    """Range of the fraction of the image area a local crop covers."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Range of the aspect ratio of the cropped region before resizing (torchvision's default)."""
    hflip_p: float = 0.5
    """Probability of a horizontal flip, for every crop."""
    color_jitter_p: float = 0.8
    """Probability of applying the colour jitter to a crop."""
    brightness: float = 0.4
    """ColorJitter brightness strength."""
    contrast: float = 0.4
    """ColorJitter contrast strength."""
    saturation: float = 0.2
    """ColorJitter saturation strength."""
    hue: float = 0.1
    """ColorJitter hue strength (at most 0.5)."""
    grayscale_p: float = 0.2
    """Probability of converting a crop to grayscale (3 equal channels)."""
    blur_kernel_size: int = 9
    """Side of the Gaussian blur kernel (odd)."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Range of the blur's standard deviation (drawn uniformly per application)."""
    global1_blur_p: float = 1.0
    """Probability of blurring the first global crop."""
    global2_blur_p: float = 0.1
    """Probability of blurring the second global crop."""
    global2_solarize_p: float = 0.2
    """Probability of solarizing the second global crop (the only crop that is ever solarized)."""
    solarize_threshold: int = 128
    """Pixels at or above this value (0-255) are inverted by the solarisation."""
    local_blur_p: float = 0.5
    """Probability of blurring each local crop."""
    mean: tuple[float, float, float] = IMAGENET_MEAN
    """Per-channel mean subtracted after ToTensor (ImageNet)."""
    std: tuple[float, float, float] = IMAGENET_STD
    """Per-channel standard deviation divided by after ToTensor (ImageNet)."""

    def __post_init__(self) -> None:
        for name in ("global_size", "local_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"crops.{name} must be a positive number of pixels, got {getattr(self, name)}")
        if self.local_crops_number < 0:
            raise ValueError(f"crops.local_crops_number must be >= 0, got {self.local_crops_number}")
        for name in ("global_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"crops.{name} must satisfy 0 < min <= max <= 1, got {getattr(self, name)}")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crops.crop_ratio must satisfy 0 < min <= max, got {self.crop_ratio}")
        probabilities = ("hflip_p", "color_jitter_p", "grayscale_p", "global1_blur_p", "global2_blur_p")
        for name in (*probabilities, "global2_solarize_p", "local_blur_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"crops.{name} is a probability and must be in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"crops.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"crops.hue must be in [0, 0.5], got {self.hue}")
        if self.blur_kernel_size < 1 or self.blur_kernel_size % 2 == 0:
            raise ValueError(f"crops.blur_kernel_size must be a positive odd number, got {self.blur_kernel_size}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"crops.blur_sigma must satisfy 0 < min <= max, got {self.blur_sigma}")
        if not 0 <= self.solarize_threshold <= 256:
            raise ValueError(f"crops.solarize_threshold must be in [0, 256], got {self.solarize_threshold}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"crops.mean and crops.std need 3 values each (std > 0), got {self.mean} and {self.std}")


@dataclass
class MultiCropViews:
    """The views of one image: tensors ``[C, global_size, global_size]`` and ``[C, local_size, local_size]``."""

    global_crops: list[Tensor]
    local_crops: list[Tensor] = field(default_factory=list)
    local_size: int = 0
    """Side of the local crops, so that a batch without local crops can still state its shape."""


class MultiCropAugmentation:
    """Image -> :class:`MultiCropViews` (2 global crops, ``config.local_crops_number`` local crops)."""

    def __init__(self, config: AugmentationConfig | None = None) -> None:
        self.config = config = config or AugmentationConfig()
        self.global_crop = self._geometric(config.global_size, config.global_scale)
        self.local_crop = self._geometric(config.local_size, config.local_scale)
        to_normalized_tensor = [transforms.ToTensor(), transforms.Normalize(mean=config.mean, std=config.std)]
        self.global_transform_1 = transforms.Compose(
            [*self._colour(), self._blur(config.global1_blur_p), *to_normalized_tensor]
        )
        self.global_transform_2 = transforms.Compose(
            [
                *self._colour(),
                self._blur(config.global2_blur_p),
                transforms.RandomSolarize(threshold=config.solarize_threshold, p=config.global2_solarize_p),
                *to_normalized_tensor,
            ]
        )
        self.local_transform = transforms.Compose(
            [*self._colour(), self._blur(config.local_blur_p), *to_normalized_tensor]
        )

    def _geometric(self, size: int, scale: tuple[float, float]) -> transforms.Compose:
        return transforms.Compose(
            [
                transforms.RandomResizedCrop(
                    size, scale=scale, ratio=self.config.crop_ratio, interpolation=transforms.InterpolationMode.BICUBIC
                ),
                transforms.RandomHorizontalFlip(p=self.config.hflip_p),
            ]
        )

    def _colour(self) -> list:
        c = self.config
        jitter = transforms.ColorJitter(
            brightness=c.brightness, contrast=c.contrast, saturation=c.saturation, hue=c.hue
        )
        return [transforms.RandomApply([jitter], p=c.color_jitter_p), transforms.RandomGrayscale(p=c.grayscale_p)]

    def _blur(self, p: float) -> transforms.RandomApply:
        # RandomApply(p) applies the blur with probability p: the intended value, not the official 1 - p
        blur = transforms.GaussianBlur(kernel_size=self.config.blur_kernel_size, sigma=self.config.blur_sigma)
        return transforms.RandomApply([blur], p=p)

    def __call__(self, image: Image.Image) -> MultiCropViews:
        global_1 = self.global_transform_1(self.global_crop(image))
        global_2 = self.global_transform_2(self.global_crop(image))
        local = [self.local_transform(self.local_crop(image)) for _ in range(self.config.local_crops_number)]
        return MultiCropViews(global_crops=[global_1, global_2], local_crops=local, local_size=self.config.local_size)

    def __repr__(self) -> str:
        return f"MultiCropAugmentation({self.config})"
