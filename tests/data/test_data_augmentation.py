"""Multi-crop augmentation: sizes, and every configured probability reaching the crop it is meant for."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from dinolab.data import AugmentationConfig, MultiCropAugmentation, MultiCropViews
from dinolab.data.transforms import IMAGENET_MEAN, IMAGENET_STD

# no randomness except what a test switches on: the whole (square) image, no flip, no colour change, no blur
PLAIN = AugmentationConfig(
    global_size=24,
    local_size=12,
    local_crops_number=2,
    global_scale=(1.0, 1.0),
    local_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    hflip_p=0.0,
    color_jitter_p=0.0,
    grayscale_p=0.0,
    global1_blur_p=0.0,
    global2_blur_p=0.0,
    global2_solarize_p=0.0,
    local_blur_p=0.0,
)


def _image(seed: int = 0, size: int = 40) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _expected(image: Image.Image, size: int, solarize: bool = False, flip: bool = False) -> torch.Tensor:
    """The crop written with torchvision's functional API and the normalisation formula."""
    out = F.resize(image, [size, size], interpolation=InterpolationMode.BICUBIC)
    out = F.solarize(out, 128) if solarize else out
    out = F.hflip(out) if flip else out
    tensor = F.to_tensor(out)
    return (tensor - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def test_default_views_have_the_paper_sizes() -> None:
    config = AugmentationConfig()
    assert (config.global1_blur_p, config.global2_blur_p, config.local_blur_p) == (1.0, 0.1, 0.5)
    torch.manual_seed(0)
    views = MultiCropAugmentation(config)(_image(size=64))
    assert isinstance(views, MultiCropViews)
    assert [tuple(v.shape) for v in views.global_crops] == [(3, 224, 224)] * 2
    assert [tuple(v.shape) for v in views.local_crops] == [(3, 98, 98)] * 8
    assert views.local_size == 98


def test_plain_pipeline_is_resize_and_normalise() -> None:
    image = _image()
    views = MultiCropAugmentation(PLAIN)(image)
    for crop in views.global_crops:
        torch.testing.assert_close(crop, _expected(image, 24))
    for crop in views.local_crops:
        torch.testing.assert_close(crop, _expected(image, 12))


def test_solarize_only_on_the_second_global_crop() -> None:
    image = _image(1)
    views = MultiCropAugmentation(dataclasses.replace(PLAIN, global2_solarize_p=1.0))(image)
    torch.testing.assert_close(views.global_crops[0], _expected(image, 24))
    torch.testing.assert_close(views.global_crops[1], _expected(image, 24, solarize=True))
    for crop in views.local_crops:
        torch.testing.assert_close(crop, _expected(image, 12))


def test_flip_and_grayscale_reach_every_crop() -> None:
    image = _image(2)
    flipped = MultiCropAugmentation(dataclasses.replace(PLAIN, hflip_p=1.0))(image)
    for crop in flipped.global_crops:
        torch.testing.assert_close(crop, _expected(image, 24, flip=True))
    gray = MultiCropAugmentation(dataclasses.replace(PLAIN, grayscale_p=1.0))(image)
    for crop in gray.global_crops + gray.local_crops:
        pixels = crop * torch.tensor(IMAGENET_STD)[:, None, None] + torch.tensor(IMAGENET_MEAN)[:, None, None]
        torch.testing.assert_close(pixels[0], pixels[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(pixels[0], pixels[2], atol=1e-5, rtol=0)


def test_blur_probabilities_are_the_configured_ones_not_inverted() -> None:
    """Count blurred crops over many draws: global 1, global 2 and locals at their own configured rates."""
    # sigma >= 1 so that every blur visibly changes the crop (sigma 0.1 is numerically the identity)
    config = dataclasses.replace(
        PLAIN, global1_blur_p=0.9, global2_blur_p=0.1, local_blur_p=0.5, blur_sigma=(1.0, 2.0), local_crops_number=1
    )
    image = _image(3)
    plain_global, plain_local = _expected(image, 24), _expected(image, 12)
    augment = MultiCropAugmentation(config)
    torch.manual_seed(0)
    trials = 200
    blurred = np.zeros(3)
    for _ in range(trials):
        views = augment(image)
        crops = [*views.global_crops, views.local_crops[0]]
        references = [plain_global, plain_global, plain_local]
        blurred += [not torch.allclose(c, r, atol=1e-4) for c, r in zip(crops, references)]
    rates = blurred / trials
    sd = np.sqrt(np.array([0.9 * 0.1, 0.1 * 0.9, 0.25]) / trials)
    assert (np.abs(rates - [0.9, 0.1, 0.5]) < 4.5 * sd).all(), rates


def test_colour_jitter_probability() -> None:
    config = dataclasses.replace(PLAIN, color_jitter_p=0.3, local_crops_number=0)
    image = _image(4)
    augment = MultiCropAugmentation(config)
    torch.manual_seed(1)
    changed = [not torch.allclose(augment(image).global_crops[0], _expected(image, 24), atol=1e-4) for _ in range(200)]
    assert abs(np.mean(changed) - 0.3) < 4.5 * np.sqrt(0.21 / 200)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("global_size", 0),
        ("local_crops_number", -1),
        ("global_scale", (0.5, 0.2)),
        ("local_blur_p", 1.5),
        ("hue", 0.7),
        ("blur_kernel_size", 8),
        ("blur_sigma", (0.0, 1.0)),
    ],
)
def test_config_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        AugmentationConfig(**{field: value})
