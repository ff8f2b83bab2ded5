"""Semantic segmentation with a linear head on frozen patch tokens: training (the published recipe's shape),
sliding-window / multi-scale inference and mIoU.

Recipe of the released linear heads (mmseg configs, ADE20K): random rescale of a (2048, 512) scale by 0.5-2.0,
512 x 512 random crop (no class over 75 % of the crop), horizontal flip, photometric jitter; AdamW (lr 1e-3,
weight decay 1e-4), 1500 linear warm-up iterations then a poly schedule (power 1) over 40k iterations at batch
16; test: short side 512, 512 x 512 windows with stride 341. "+ms": scales 1.0, 1.32, 1.73, 2.28, 3.0 and flips.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from dinolab.data.images import load_rgb
from dinolab.data.transforms import make_normalize
from dinolab.eval.dense import DEFAULT_EVALUATION, DenseEvaluation, one_by_one_loader, slide_inference, train_head
from dinolab.eval.readers.segmentation import IGNORE_INDEX, SegmentationSet

MS_SCALES = (1.0, 1.32, 1.73, 2.28, 3.0)
"""Test-time scales of the released "+ms" evaluation (each also flipped)."""


# ----------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True, kw_only=True)
class SegAugmentation:
    """Training augmentation: random rescale, random crop, flip, photometric jitter."""

    crop_size: int = 512
    """Side of the square training crops (padded with ignore labels when the image is smaller)."""
    scale: tuple[int, int] = (2048, 512)
    """(longest, shortest) side limits of the rescale before the random ratio, as mmseg's ``img_scale``."""
    ratio_range: tuple[float, float] = (0.5, 2.0)
    """The rescale limits are multiplied by a ratio drawn uniformly from this range."""
    cat_max_ratio: float = 0.75
    """Re-draw the crop (up to 10 times) while one class covers more than this fraction of it."""
    flip_prob: float = 0.5
    photometric: bool = True
    """Brightness, contrast, saturation and hue jitter (torchvision ``ColorJitter(0.125, 0.5, 0.5, 0.05)``)."""

    def __post_init__(self) -> None:
        if self.crop_size < 1 or min(self.scale) < 1:
            raise ValueError(f"crop_size and scale must be positive, got {self.crop_size}, {self.scale}")
        if not 0 < self.ratio_range[0] <= self.ratio_range[1]:
            raise ValueError(f"ratio_range must satisfy 0 < low <= high, got {self.ratio_range}")
        if not 0 < self.cat_max_ratio <= 1 or not 0 <= self.flip_prob <= 1:
            raise ValueError("cat_max_ratio must be in (0, 1] and flip_prob in [0, 1]")


@dataclass(frozen=True, kw_only=True)
class SegTrainConfig:
    """Optimisation of the linear head (the backbone stays frozen)."""

    iters: int = 40000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_iters: int = 1500
    """Linear warm-up from ``lr * warmup_ratio`` (mmcv's "linear" warm-up of the poly schedule)."""
    warmup_ratio: float = 1e-6
    poly_power: float = 1.0
    min_lr: float = 0.0
    num_workers: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1:
            raise ValueError(f"iters and batch_size must be positive, got {self.iters}, {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_iters < 0 or self.min_lr < 0:
            raise ValueError("lr must be positive; weight_decay, warmup_iters and min_lr non-negative")


@dataclass(frozen=True, kw_only=True)
class SegInference:
    """How a whole image is predicted."""

    window: int = 512
    """Side of the sliding windows (clipped to the image when it is smaller)."""
    stride: int = 341
    scales: tuple[float, ...] = (1.0,)
    """Image scales (relative to the test resize) whose softmax outputs are averaged."""
    flip: bool = False
    """Also average the horizontally flipped prediction at each scale."""
    short_side: int | None = 512
    """Test resize: shortest side to this (longest at most 4x it, as mmseg's (2048, 512)); None = as stored."""
    batch_size: int = 8
    """Windows run through the model together."""

    def __post_init__(self) -> None:
        if self.window < 1 or self.stride < 1:
            raise ValueError(f"window and stride must be positive, got {self.window}, {self.stride}")
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be positive, got {self.scales}")


# ----------------------------------------------------------------------------------------------- data
def rescale_size(width: int, height: int, scale: tuple[int, int], ratio: float = 1.0) -> tuple[int, int]:
    """(width, height) after mmseg's keep-ratio resize to ``scale`` x ``ratio`` (longest, shortest limits)."""
    long_max, short_max = scale[0] * ratio, scale[1] * ratio
    factor = min(long_max / max(width, height), short_max / min(width, height))
    return max(1, int(width * factor + 0.5)), max(1, int(height * factor + 0.5))


def _crop_box(height: int, width: int, crop: int) -> tuple[int, int]:
    top = int(torch.randint(0, max(height - crop, 0) + 1, ()).item())
    left = int(torch.randint(0, max(width - crop, 0) + 1, ()).item())
    return top, left


class SegTrainDataset(Dataset):
    """Augmented training crops: ``(image [3, S, S] normalised, label [S, S] int64)``, S = ``crop_size``."""

    def __init__(self, data: SegmentationSet, augmentation: SegAugmentation) -> None:
        self.data = data
        self.aug = augmentation
        self.jitter = transforms.ColorJitter(0.125, 0.5, 0.5, 0.05)
        self.normalize = make_normalize()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        aug = self.aug
        image = load_rgb(self.data.images[index])
        label = self.data.read_mask(index)
        if label.shape != (image.height, image.width):
            raise ValueError(f"{self.data.masks[index]}: mask {label.shape} does not match image {image.size[::-1]}")
        ratio = float(torch.empty(()).uniform_(*aug.ratio_range))
        size = rescale_size(image.width, image.height, aug.scale, ratio)
        image = image.resize(size, Image.BILINEAR)
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
        top, left = self._choose_crop(label)
        crop = aug.crop_size
        image = image.crop((left, top, left + min(crop, size[0]), top + min(crop, size[1])))
        label = label[top : top + crop, left : left + crop]
        if float(torch.rand(())) < aug.flip_prob:
            image, label = TF.hflip(image), label[:, ::-1]
        if aug.photometric:
            image = self.jitter(image)
        tensor = self.normalize(TF.to_tensor(image))
        pad_h, pad_w = crop - tensor.shape[1], crop - tensor.shape[2]
        tensor = F.pad(tensor, (0, pad_w, 0, pad_h), value=0.0)
        target = torch.from_numpy(np.array(label, dtype=np.int64))  # a copy: PIL-backed arrays are read-only
        target = F.pad(target, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        return tensor, target

    def _choose_crop(self, label: np.ndarray) -> tuple[int, int]:
        crop = self.aug.crop_size
        box = _crop_box(*label.shape, crop)
        for _ in range(10):
            window = label[box[0] : box[0] + crop, box[1] : box[1] + crop]
            values, counts = np.unique(window, return_counts=True)
            counts = counts[values != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < self.aug.cat_max_ratio:
                break
            box = _crop_box(*label.shape, crop)
        return box


def eval_resize(image: Image.Image, short_side: int | None) -> Image.Image:
    """The evaluation resize: shortest side to ``short_side`` (longest at most 4x it), or unchanged."""
    if short_side is None:
        return image
    return image.resize(rescale_size(image.width, image.height, (4 * short_side, short_side)), Image.BILINEAR)


# ----------------------------------------------------------------------------------------------- training
def poly_lr_factor(step: int, config: SegTrainConfig) -> float:
    """Multiplier of ``config.lr`` at ``step``: mmcv's poly schedule with linear warm-up.

    poly: ``(lr - min_lr) (1 - step / iters)^power + min_lr``; during warm-up that value times
    ``1 - (1 - step / warmup_iters)(1 - warmup_ratio)``.
    """
    progress = min(step, config.iters) / config.iters
    lr = (config.lr - config.min_lr) * (1 - progress) ** config.poly_power + config.min_lr
    if step < config.warmup_iters:
        lr *= 1 - (1 - step / config.warmup_iters) * (1 - config.warmup_ratio)
    return lr / config.lr


def train_segmentation(
    model: nn.Module,
    dataset: Dataset,
    config: SegTrainConfig,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[float]:
    """Train ``model.head`` (the backbone is frozen) with per-pixel cross-entropy (ignore index 255) on the
    ``(image, label)`` crops of ``dataset``; returns the loss of every iteration."""

    def loss(_step: int, logits: Tensor, labels: Tensor) -> Tensor | None:  # logits [B, K, H, W]
        if not (labels != IGNORE_INDEX).any():  # an all-ignore batch has no loss (cross-entropy would be NaN)
            return None
        return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)

    def poly(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: poly_lr_factor(step, config))

    return train_head(model, dataset, loss, poly, config, device, progress, "segmentation head")


# ----------------------------------------------------------------------------------------------- inference
@torch.no_grad()
def predict_segmentation(model: nn.Module, images: Tensor, inference: SegInference) -> Tensor:
    """Class scores ``[B, K, H, W]`` for normalised ``images`` ``[B, 3, H, W]``: sliding-window logits for one
    scale without flip, else the softmax probabilities averaged over scales and flips (as mmseg's aug_test)."""
    height, width = images.shape[-2:]
    runs = [(s, f) for s in inference.scales for f in ((False, True) if inference.flip else (False,))]
    total: Tensor | None = None
    for scale, flip in runs:
        scaled = images
        if scale != 1.0:
            size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
            scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        if flip:
            scaled = scaled.flip(-1)
        scores = slide_inference(model, scaled, inference.window, inference.stride, inference.batch_size)
        if flip:
            scores = scores.flip(-1)
        if len(runs) == 1:
            return scores
        scores = F.interpolate(scores, size=(height, width), mode="bilinear", align_corners=False).softmax(1)
        total = scores if total is None else total + scores
    assert total is not None
    return total / len(runs)


# ----------------------------------------------------------------------------------------------- metrics
def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int) -> np.ndarray:
    """``[K, K]`` pixel counts, rows = true class, columns = predicted; ``IGNORE_INDEX`` pixels are skipped."""
    valid = label != IGNORE_INDEX
    truth, guess = label[valid].astype(np.int64), pred[valid].astype(np.int64)
    if truth.size and (truth.max() >= num_classes or guess.max() >= num_classes or guess.min() < 0):
        raise ValueError(f"labels / predictions must lie in 0..{num_classes - 1} (or {IGNORE_INDEX} = ignore)")
    return np.bincount(truth * num_classes + guess, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(confusion: np.ndarray) -> tuple[np.ndarray, float]:
    """Per-class IoU ``[K]`` (NaN for classes absent from both truth and prediction) and their mean (mIoU)."""
    intersection = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersection / union, np.nan)
    return iou, float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")


@dataclass
class SegResults:
    """Scores over a segmentation set (accumulated over all pixels, as mmseg)."""

    miou: float
    pixel_accuracy: float
    per_class_iou: dict[str, float | None]
    num_images: int
    confusion: np.ndarray = field(repr=False)
    pictures: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "mIoU": self.miou,
            "aAcc": self.pixel_accuracy,
            "num_images": self.num_images,
            "per_class_IoU": self.per_class_iou,
            "pictures": [str(p) for p in self.pictures],
        }

    def summary_line(self) -> str:
        return f"mIoU {100 * self.miou:.2f}  aAcc {100 * self.pixel_accuracy:.2f}"


class SegEvalDataset(Dataset):
    """``(index, image [3, h, w] normalised after the test resize, label [H, W] as stored, original RGB)``."""

    def __init__(self, data: SegmentationSet, short_side: int | None) -> None:
        self.data, self.short_side = data, short_side
        self.normalize = make_normalize()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[int, Tensor, np.ndarray, np.ndarray]:
        image = load_rgb(self.data.images[index])
        label = self.data.read_mask(index)
        if label.shape != (image.height, image.width):
            raise ValueError(f"{self.data.masks[index]}: mask {label.shape} does not match image {image.size[::-1]}")
        tensor = self.normalize(TF.to_tensor(eval_resize(image, self.short_side)))
        return index, tensor, label, np.asarray(image)


def evaluate_segmentation(
    model: nn.Module,
    data: SegmentationSet,
    inference: SegInference,
    run: DenseEvaluation = DEFAULT_EVALUATION,
) -> SegResults:
    """mIoU of ``model`` over ``data``: predict at the test scale, upsample the scores to the stored mask's size,
    take the arg-max, accumulate one confusion matrix. Writes prediction pictures of the first images."""
    from dinolab.eval.visualize import save_segmentation_picture

    device, picture_dir = run.device, run.picture_dir
    loader, count = one_by_one_loader(SegEvalDataset(data, inference.short_side), run.max_images, run.num_workers)
    model.to(device).eval()
    confusion = np.zeros((data.num_classes, data.num_classes), dtype=np.int64)
    pictures: list[Path] = []
    for index, image, label, rgb in tqdm(loader, total=count, desc="segmentation eval", disable=not run.progress):
        scores = predict_segmentation(model, image[None].to(device), inference)
        scores = F.interpolate(scores, size=label.shape, mode="bilinear", align_corners=False)
        pred = scores[0].argmax(0).cpu().numpy()
        confusion += confusion_matrix(pred, label, data.num_classes)
        if picture_dir is not None and len(pictures) < run.num_pictures:
            path = Path(picture_dir) / f"segmentation_{index:05d}_{data.images[index].stem}.png"
            pictures.append(save_segmentation_picture(rgb, pred, label, path, data.num_classes))
    iou, miou = iou_from_confusion(confusion)
    accuracy = float(np.diag(confusion).sum() / max(confusion.sum(), 1))
    per_class = {name: (None if np.isnan(v) else float(v)) for name, v in zip(data.class_names, iou)}
    return SegResults(miou, accuracy, per_class, count, confusion, pictures)


def segmentation_blocks(layers: int) -> int | Sequence[int]:
    """Blocks read by the head variant: 1 = "linear" (last block), 4 = "multi-layer" (last 4)."""
    if layers not in (1, 4):
        raise ValueError(f"the segmentation head reads the last 1 or 4 blocks, got {layers}")
    return layers
