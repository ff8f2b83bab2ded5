"""Monocular depth with a linear head on frozen patch tokens (+ CLS): losses, training, inference and the
standard metrics.

Recipe of the released linear depth heads (Monocular-Depth-Estimation-Toolbox configs): 256 bins between the
dataset's depth range, "linear" bin normalisation, features upsampled 4x; loss = scale-invariant log loss
(lambda 0.85, 100 warm-up iterations) + 0.5 x multi-scale gradient loss; AdamW (weight decay 0.01) with a
one-cycle schedule over 38400 iterations at batch 16; NYU crops 416 x 544, KITTI 352 x 704; random flip,
rotation (2.5 / 1 degree) and colour augmentation (gamma, brightness, per-channel colour).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from dinolab.data.transforms import make_normalize
from dinolab.eval.dense import DEFAULT_EVALUATION, DenseEvaluation, one_by_one_loader, slide_inference, train_head
from dinolab.eval.readers.depth import DepthSet

DEPTH_METRICS = ("delta1", "delta2", "delta3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")


# ----------------------------------------------------------------------------------------------- losses
def sigloss(pred: Tensor, target: Tensor, valid: Tensor, lambd: float = 0.85, warm_up: bool = False) -> Tensor:
    """Scale-invariant log loss (Eigen et al.) as in the official ``SigLoss``, over the ``valid`` pixels::

    g = log(pred + 1e-3) - log(target + 1e-3)
    loss = sqrt(var(g) + (1 - lambd) * mean(g)^2)    # var unbiased; = sqrt(mean(g^2) - lambd mean(g)^2) for large N
    warm-up iterations: sqrt((1 - lambd) * mean(g)^2)
    """
    g = torch.log(pred[valid] + 1e-3) - torch.log(target[valid] + 1e-3)  # [P] valid pixels of the whole batch
    if warm_up:
        return torch.sqrt((1 - lambd) * g.mean() ** 2)
    return torch.sqrt(g.var() + (1 - lambd) * g.mean() ** 2)


def gradient_loss(pred: Tensor, target: Tensor, valid: Tensor, strides: tuple[int, ...] = (1, 2, 4, 6)) -> Tensor:
    """Multi-scale gradient matching of log depth (the official ``GradientLoss``), averaged over images.

    For each image and stride s (the official list is 1, 2, 4, 6): on the subsampled maps
    ``d = (log(pred + 1e-3) - log(target + 1e-3)) * valid``, sum ``|d[y] - d[y+2]|`` over vertically and
    ``|d[x] - d[x+2]|`` over horizontally valid pairs, divided by the number of valid pixels.
    ``pred``, ``target``, ``valid``: ``[B, 1, H, W]``.
    """
    per_image = []
    for p, t, m in zip(pred[:, 0], target[:, 0], valid[:, 0].to(pred.dtype)):
        total = pred.new_zeros(())
        for s in strides:
            ps, ts, ms = p[::s, ::s], t[::s, ::s], m[::s, ::s]
            count = ms.sum()
            if count == 0:
                continue
            d = (torch.log(ps + 1e-3) - torch.log(ts + 1e-3)) * ms
            vertical = (d[:-2] - d[2:]).abs() * ms[:-2] * ms[2:]
            horizontal = (d[:, :-2] - d[:, 2:]).abs() * ms[:, :-2] * ms[:, 2:]
            total = total + (vertical.sum() + horizontal.sum()) / count
        per_image.append(total)
    return torch.stack(per_image).mean()


# ----------------------------------------------------------------------------------------------- metrics
def eval_crop_mask(height: int, width: int, crop: str) -> np.ndarray:
    """``[H, W]`` bool region that is scored: "none"; "nyu_eigen" (rows 45:471, columns 41:601 of 480 x 640,
    scaled to other sizes); "kitti_eigen" / "kitti_garg" (the fractional boxes of Eigen / Garg)."""
    mask = np.zeros((height, width), dtype=bool)
    if crop == "none":
        mask[:] = True
    elif crop == "nyu_eigen":
        mask[
            round(45 / 480 * height) : round(471 / 480 * height), round(41 / 640 * width) : round(601 / 640 * width)
        ] = 1
    elif crop == "kitti_eigen":
        mask[int(0.3324324 * height) : int(0.91351351 * height), int(0.0359477 * width) : int(0.96405229 * width)] = 1
    elif crop == "kitti_garg":
        mask[int(0.40810811 * height) : int(0.99189189 * height), int(0.03594771 * width) : int(0.96405229 * width)] = 1
    else:
        raise ValueError(f"unknown evaluation crop {crop!r}; choose none, nyu_eigen, kitti_eigen or kitti_garg")
    return mask


def depth_metrics(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """The standard metrics on matching 1-D arrays of valid pixels (metres, all > 0).

    delta_k = fraction with max(gt/pred, pred/gt) < 1.25^k; abs_rel = mean |gt - pred| / gt;
    sq_rel = mean (gt - pred)^2 / gt; rmse; rmse_log = RMSE of log depth; log10 = mean |log10 gt - log10 pred|;
    silog = 100 sqrt(mean(e^2) - mean(e)^2), e = log pred - log gt.
    """
    pred, gt = pred.astype(np.float64), gt.astype(np.float64)
    ratio = np.maximum(gt / pred, pred / gt)
    err = np.log(pred) - np.log(gt)
    return {
        "delta1": float((ratio < 1.25).mean()),
        "delta2": float((ratio < 1.25**2).mean()),
        "delta3": float((ratio < 1.25**3).mean()),
        "abs_rel": float(np.mean(np.abs(gt - pred) / gt)),
        "sq_rel": float(np.mean((gt - pred) ** 2 / gt)),
        "rmse": float(np.sqrt(np.mean((gt - pred) ** 2))),
        "rmse_log": float(np.sqrt(np.mean(err**2))),
        "log10": float(np.mean(np.abs(np.log10(gt) - np.log10(pred)))),
        "silog": float(np.sqrt(max(np.mean(err**2) - np.mean(err) ** 2, 0.0)) * 100),
    }


# ----------------------------------------------------------------------------------------------- data
@dataclass(frozen=True, kw_only=True)
class DepthAugmentation:
    """Training augmentation (the toolbox's NYU values by default; KITTI: crop (352, 704), rotate 1)."""

    crop_size: tuple[int, int] = (416, 544)
    """(height, width) of the random training crop (padded with unknown depth when the image is smaller)."""
    flip_prob: float = 0.5
    rotate_degrees: float = 2.5
    """Rotate by a uniform angle in +-this with probability 0.5 (0 disables)."""
    color_prob: float = 0.5
    """Probability of the colour change: gamma 0.9-1.1, brightness 0.75-1.25, per-channel colour 0.9-1.1."""

    def __post_init__(self) -> None:
        if min(self.crop_size) < 1:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")
        if not 0 <= self.flip_prob <= 1 or not 0 <= self.color_prob <= 1 or self.rotate_degrees < 0:
            raise ValueError("flip_prob and color_prob must be in [0, 1], rotate_degrees >= 0")


def _uniform(low: float, high: float, size: tuple[int, ...] = ()) -> Tensor:
    return torch.empty(size).uniform_(low, high)


class DepthTrainDataset(Dataset):
    """Augmented crops: ``(image [3, h, w] normalised, depth [1, h, w] metres, 0 = unknown)``."""

    def __init__(self, data: DepthSet, augmentation: DepthAugmentation) -> None:
        self.data, self.aug = data, augmentation
        self.normalize = make_normalize()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        aug = self.aug
        rgb, depth_np = self.data.read(index)
        image = TF.to_tensor(rgb)  # [3, H, W] in [0, 1]
        depth = torch.from_numpy(depth_np)[None]  # [1, H, W]
        if aug.rotate_degrees and float(torch.rand(())) < 0.5:
            angle = float(_uniform(-aug.rotate_degrees, aug.rotate_degrees))
            image = TF.rotate(image, angle, InterpolationMode.BILINEAR)
            depth = TF.rotate(depth, angle, InterpolationMode.NEAREST, fill=0.0)  # corners become "unknown"
        crop_h, crop_w = aug.crop_size
        height, width = image.shape[-2:]
        top = int(torch.randint(0, max(height - crop_h, 0) + 1, ()))
        left = int(torch.randint(0, max(width - crop_w, 0) + 1, ()))
        image = image[:, top : top + crop_h, left : left + crop_w]
        depth = depth[:, top : top + crop_h, left : left + crop_w]
        if float(torch.rand(())) < aug.flip_prob:
            image, depth = image.flip(-1), depth.flip(-1)
        if float(torch.rand(())) < aug.color_prob:
            image = image ** float(_uniform(0.9, 1.1)) * float(_uniform(0.75, 1.25))
            image = (image * _uniform(0.9, 1.1, (3, 1, 1))).clamp(0, 1)
        pad = (0, crop_w - image.shape[2], 0, crop_h - image.shape[1])
        return F.pad(self.normalize(image), pad), F.pad(depth, pad)


# ----------------------------------------------------------------------------------------------- training
@dataclass(frozen=True, kw_only=True)
class DepthTrainConfig:
    """Optimisation of the linear depth head (the backbone stays frozen)."""

    iters: int = 38400
    batch_size: int = 16
    lr: float = 1e-4
    """Peak learning rate of the one-cycle schedule (starts at lr / 25, ends at lr / 2500)."""
    weight_decay: float = 0.01
    sig_lambda: float = 0.85
    sig_warmup_iters: int = 100
    """Iterations that use only the mean term of the log loss (the official ``warm_up``)."""
    gradient_weight: float = 0.5
    """Weight of the gradient loss (0 = log loss only)."""
    num_workers: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if self.iters < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("iters, batch_size and lr must be positive")
        if not 0 <= self.sig_lambda <= 1 or self.gradient_weight < 0 or self.weight_decay < 0:
            raise ValueError("sig_lambda must be in [0, 1]; gradient_weight and weight_decay non-negative")


def train_depth(
    model: nn.Module,
    dataset: Dataset,
    config: DepthTrainConfig,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> list[float]:
    """Train ``model.head`` on ``(image, depth)`` crops; returns the loss of every iteration that had valid
    pixels. ``model(images)`` must give ``[B, 1, H, W]`` depth at the input resolution."""

    def loss(step: int, pred: Tensor, depths: Tensor) -> Tensor | None:  # pred [B, 1, H, W]
        valid = depths > 0
        if valid.sum() <= 1:  # the log loss needs at least two pixels for its variance
            return None
        value = sigloss(pred, depths, valid, config.sig_lambda, warm_up=step < config.sig_warmup_iters)
        if config.gradient_weight:
            value = value + config.gradient_weight * gradient_loss(pred, depths, valid)
        return value

    def one_cycle(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=config.iters, pct_start=0.3, div_factor=25, final_div_factor=100
        )

    return train_head(model, dataset, loss, one_cycle, config, device, progress, "depth head")


# ----------------------------------------------------------------------------------------------- inference
@dataclass(frozen=True, kw_only=True)
class DepthInference:
    """How a whole image is predicted."""

    window: int | None = None
    """Sliding-window side (None = the whole image in one pass)."""
    stride: int = 320
    flip: bool = True
    """Average with the prediction on the horizontally flipped image (the official "slide_flip" / "flip")."""
    batch_size: int = 8

    def __post_init__(self) -> None:
        if (self.window is not None and self.window < 1) or self.stride < 1:
            raise ValueError("window and stride must be positive")


@torch.no_grad()
def predict_depth(model: nn.Module, images: Tensor, inference: DepthInference) -> Tensor:
    """Depth ``[B, 1, H, W]`` for normalised ``images`` ``[B, 3, H, W]``, clamped to the head's range."""

    def run(x: Tensor) -> Tensor:
        if inference.window is None:
            return model(x)
        return slide_inference(model, x, inference.window, inference.stride, inference.batch_size)

    depth = run(images)
    if inference.flip:
        depth = (depth + run(images.flip(-1)).flip(-1)) / 2
    head = model.head
    return depth.clamp(head.min_depth, head.max_depth)


@dataclass
class DepthResults:
    """Per-image metrics averaged over the images with scored pixels (as the official evaluation)."""

    metrics: dict[str, float]
    num_images: int
    pictures: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {**self.metrics, "num_images": self.num_images, "pictures": [str(p) for p in self.pictures]}

    def summary_line(self) -> str:
        m = self.metrics
        return f"RMSE {m['rmse']:.4f}  AbsRel {m['abs_rel']:.4f}  d1 {m['delta1']:.4f}  ({self.num_images} images)"


class DepthEvalDataset(Dataset):
    """``(index, image [3, H, W] normalised, depth [H, W] metres, original RGB [H, W, 3])``."""

    def __init__(self, data: DepthSet) -> None:
        self.data = data
        self.normalize = make_normalize()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[int, Tensor, np.ndarray, np.ndarray]:
        rgb, depth = self.data.read(index)
        return index, self.normalize(TF.to_tensor(rgb)), depth, np.asarray(rgb)


def evaluate_depth(
    model: nn.Module,
    data: DepthSet,
    inference: DepthInference,
    run: DenseEvaluation = DEFAULT_EVALUATION,
) -> DepthResults:
    """Predict each image at its stored resolution and score the pixels with ``min_depth < gt < max_depth``
    inside ``data.eval_crop``; metrics are computed per image and averaged."""
    from dinolab.eval.visualize import save_depth_picture

    device, picture_dir = run.device, run.picture_dir
    loader, count = one_by_one_loader(DepthEvalDataset(data), run.max_images, run.num_workers)
    model.to(device).eval()
    per_image: list[dict[str, float]] = []
    pictures: list[Path] = []
    for index, image, gt, rgb in tqdm(loader, total=count, desc="depth eval", disable=not run.progress):
        pred = predict_depth(model, image[None].to(device), inference)[0, 0].cpu().numpy()
        mask = (gt > data.min_depth) & (gt < data.max_depth) & eval_crop_mask(*gt.shape, data.eval_crop)
        if mask.any():
            per_image.append(depth_metrics(pred[mask], gt[mask]))
        if picture_dir is not None and len(pictures) < run.num_pictures:
            path = Path(picture_dir) / f"depth_{index:05d}_{data.images[index].stem}.png"
            pictures.append(save_depth_picture(rgb, pred, gt, path))
    if not per_image:
        raise ValueError(f"{data.name}: no image had depth inside {data.min_depth}..{data.max_depth} to score")
    metrics = {name: float(np.mean([m[name] for m in per_image])) for name in DEPTH_METRICS}
    return DepthResults(metrics, len(per_image), pictures)
