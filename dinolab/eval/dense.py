"""What the dense evaluations share: the head-training loop, sliding-window inference, one-image loaders and the
result interface.

Segmentation and depth train a head on a frozen backbone with the same loop (:func:`train_head`); they differ
in the loss (a function of the step, the prediction and the target) and the learning-rate schedule. Whole images
of any size are predicted window by window (:func:`slide_inference`) and read one at a time, uncollated
(:func:`one_by_one_loader`). Every task's results have ``to_dict()`` (for results.json) and ``summary_line()``
(the line the command prints): :class:`DenseResult`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

# step, prediction, target -> the loss, or None when the batch has nothing to score (then no update)
StepLoss = Callable[[int, Tensor, Tensor], Tensor | None]


class HeadTraining(Protocol):
    """The optimisation settings :func:`train_head` reads (``SegTrainConfig``, ``DepthTrainConfig``)."""

    iters: int
    batch_size: int
    lr: float
    weight_decay: float
    num_workers: int
    seed: int


@dataclass(frozen=True, kw_only=True)
class DenseEvaluation:
    """How a dense task's evaluation runs (``evaluate_segmentation``, ``evaluate_depth``)."""

    device: torch.device | str = "cpu"
    max_images: int | None = None
    """Score only the first images of the set (None: all)."""
    picture_dir: str | os.PathLike | None = None
    """Where prediction pictures of the first images go (None: no pictures)."""
    num_pictures: int = 4
    num_workers: int = 2
    progress: bool = True


DEFAULT_EVALUATION = DenseEvaluation()


class DenseResult(Protocol):
    """What an evaluation returns: a JSON-able record and one summary line."""

    def to_dict(self) -> dict[str, object]: ...

    def summary_line(self) -> str: ...


# ----------------------------------------------------------------------------------------------- loaders
def single_item(items: list) -> object:
    """``collate_fn`` of a batch of one, left as it is (images of any size, arrays, error messages)."""
    return items[0]


def one_by_one_loader(dataset: Dataset, max_images: int | None, num_workers: int) -> tuple[DataLoader, int]:
    """A loader of single items (images of any size, not collated) over the first ``max_images`` of ``dataset``,
    and how many items it yields."""
    count = len(dataset) if max_images is None else min(max_images, len(dataset))  # type: ignore[arg-type]
    if count < len(dataset):  # type: ignore[arg-type]
        dataset = Subset(dataset, range(count))
    return DataLoader(dataset, batch_size=1, collate_fn=single_item, num_workers=num_workers), count


def forever(loader: DataLoader) -> Iterator:
    """Batches of ``loader`` epoch after epoch (iteration-based training)."""
    while True:
        yield from loader


# ----------------------------------------------------------------------------------------------- training
def train_head(
    model: nn.Module,
    dataset: Dataset,
    loss_fn: StepLoss,
    schedule: Callable[[torch.optim.Optimizer], LRScheduler],
    config: HeadTraining,
    device: torch.device | str = "cpu",
    progress: bool = True,
    description: str = "head",
) -> list[float]:
    """Train ``model.head`` (the backbone is frozen) with AdamW for ``config.iters`` iterations over
    ``(image, target)`` batches of ``dataset``; ``schedule(optimizer)`` steps once per iteration. Returns the loss
    of every iteration that had something to score."""
    torch.manual_seed(config.seed)
    loader = DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        drop_last=len(dataset) >= config.batch_size,  # type: ignore[arg-type]
        num_workers=config.num_workers,
        persistent_workers=config.num_workers > 0,
    )
    params = [p for p in model.head.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = schedule(optimizer)
    model.to(device).train()
    losses: list[float] = []
    batches = forever(loader)
    bar = tqdm(range(config.iters), desc=description, disable=not progress)
    for step in bar:
        images, targets = next(batches)
        targets = targets.to(device)
        loss = loss_fn(step, model(images.to(device)), targets)
        if loss is not None:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        scheduler.step()
    return losses


# ----------------------------------------------------------------------------------------------- inference
def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of the sliding windows along one side (mmseg's ``slide_inference`` grid): every
    ``stride`` pixels, the last window moved back so it ends at the border; one window if ``size <= window``."""
    count = max(size - window + stride - 1, 0) // stride + 1
    return [max(min(i * stride + window, size) - window, 0) for i in range(count)]


def slide_inference(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    window: int | tuple[int, int],
    stride: int | tuple[int, int],
    batch_size: int = 8,
) -> Tensor:
    """Run ``model`` (``[B, 3, h, w] -> [B, C, h, w]``) on overlapping windows of ``images`` ``[B, 3, H, W]`` and
    average the outputs where windows overlap -> ``[B, C, H, W]``. Any H, W: windows are clipped to the image."""
    (win_h, win_w), (step_h, step_w) = _pair(window), _pair(stride)
    batch, _, height, width = images.shape
    crop_h, crop_w = min(win_h, height), min(win_w, width)
    boxes = [(y, x) for y in window_starts(height, win_h, step_h) for x in window_starts(width, win_w, step_w)]
    total: Tensor | None = None
    count = images.new_zeros(1, 1, height, width)
    for first in range(0, len(boxes), batch_size):
        chunk = boxes[first : first + batch_size]
        crops = torch.cat([images[:, :, y : y + crop_h, x : x + crop_w] for y, x in chunk])  # [n·B, 3, h, w]
        outputs = model(crops).float()  # [n·B, C, h, w]
        if total is None:
            total = outputs.new_zeros(batch, outputs.shape[1], height, width)
        for j, (y, x) in enumerate(chunk):
            total[:, :, y : y + crop_h, x : x + crop_w] += outputs[j * batch : (j + 1) * batch]
            count[:, :, y : y + crop_h, x : x + crop_w] += 1
    assert total is not None
    return total / count


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))
