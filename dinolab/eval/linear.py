"""The linear-probe grid: every (feature variant x learning rate) linear classifier trained together on frozen
features, the best chosen on a validation set.

As in the official ``dinov2/eval/linear.py``: variants are the CLS tokens of the last 1 or 4 blocks
(concatenated, oldest first), with or without the mean of the last block's patch tokens; 13 learning rates
(1e-5 … 0.1) each scaled by ``batch_size / 256``; weights ~ N(0, 0.01), zero bias; the summed cross-entropy of
all heads; SGD with momentum 0.9 and no weight decay; a cosine schedule to 0 (``CosineAnnealingLR``, stepped
after every iteration); best head = highest top-1 on the validation set (the first one in grid order on ties).

All heads of a variant share one weight tensor ``[H, C, D]``, so one ``einsum`` computes them together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dinolab.eval.features import Features
from dinolab.eval.readers.classification import stratified_split
from dinolab.eval.results import HeadScore, LinearResult, accuracy
from dinolab.runtime import resolve_device

LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
"""The official grid (``dinov2/eval/linear.py``), before the ``batch_size / 256`` scaling."""


@dataclass(frozen=True)
class FeatureVariant:
    """Input of one group of heads: CLS of the last ``n_blocks`` blocks, optionally + mean patch token."""

    n_blocks: int
    avgpool: bool

    @property
    def name(self) -> str:
        return f"last{self.n_blocks}_cls" + ("+avgpool" if self.avgpool else "")

    def input_dim(self, embed_dim: int) -> int:
        return embed_dim * (self.n_blocks + int(self.avgpool))

    def build(self, cls_tokens: Tensor, patch_mean: Tensor | None) -> Tensor:
        """``cls_tokens [B, L, D]``, ``patch_mean [B, D]`` -> ``[B, D * (n_blocks + avgpool)]``."""
        parts = [cls_tokens[:, -self.n_blocks :].flatten(1)]  # oldest block first, as the official concat
        if self.avgpool:
            parts.append(patch_mean)
        return torch.cat(parts, dim=1).float()


@dataclass(frozen=True, kw_only=True)
class LinearConfig:
    """Linear-probe grid settings (defaults: the official ones, except the training length)."""

    learning_rates: tuple[float, ...] = LEARNING_RATES
    n_last_blocks: tuple[int, ...] = (1, 4)
    """Feature variants: CLS of the last n blocks (capped at what was extracted)."""
    avgpool: tuple[bool, ...] = (False, True)
    """Feature variants: without / with the mean patch token (dropped when not extracted)."""
    epochs: int = 10
    """Passes over the training features (official: 10 "epochs" of 1250 iterations)."""
    iterations: int | None = None
    """Total iterations; overrides ``epochs``."""
    batch_size: int = 128
    momentum: float = 0.9
    val_fraction: float = 0.1
    """Fraction of train held out (stratified) for choosing the best head when no validation set is given."""
    seed: int = 0
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.learning_rates or min(self.learning_rates) <= 0:
            raise ValueError(f"learning rates must be positive, got {self.learning_rates}")
        if not self.n_last_blocks or min(self.n_last_blocks) < 1 or not self.avgpool:
            raise ValueError("need at least one feature variant: n_last_blocks >= 1 and avgpool in {False, True}")
        if self.epochs < 1 or self.batch_size < 1 or (self.iterations is not None and self.iterations < 1):
            raise ValueError("epochs, iterations and batch_size must be >= 1")


def linear_scaled_lr(base_lr: float, batch_size: int) -> float:
    """The official linear scaling rule: ``lr * batch_size / 256`` (one process here)."""
    return base_lr * batch_size / 256.0


def cosine_factor(step: int, total: int) -> float:
    """``CosineAnnealingLR(T_max=total, eta_min=0)`` as a multiplier of the base lr at ``step``."""
    return 0.5 * (1.0 + math.cos(math.pi * step / total))


class LinearGrid(nn.Module):
    """``len(variants) x H`` linear heads; head ``g = v * H + h`` reads variant ``v`` with learning rate ``h``."""

    def __init__(
        self,
        variants: Sequence[FeatureVariant],
        embed_dim: int,
        heads_per_variant: int,
        num_classes: int,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        self.variants = list(variants)
        self.heads_per_variant = heads_per_variant
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for variant in self.variants:
            weight = torch.empty(heads_per_variant, num_classes, variant.input_dim(embed_dim))
            self.weights.append(nn.Parameter(weight.normal_(0.0, 0.01, generator=generator)))
            self.biases.append(nn.Parameter(torch.zeros(heads_per_variant, num_classes)))

    @property
    def num_heads(self) -> int:
        return len(self.variants) * self.heads_per_variant

    def forward(self, cls_tokens: Tensor, patch_mean: Tensor | None) -> Tensor:
        """``cls_tokens [B, L, D]``, ``patch_mean [B, D]`` -> logits ``[B, G, C]`` of all ``G`` heads."""
        logits = []
        for variant, weight, bias in zip(self.variants, self.weights, self.biases):
            x = variant.build(cls_tokens, patch_mean)  # [B, Dv]
            logits.append(torch.einsum("bd,hcd->bhc", x, weight) + bias)
        return torch.cat(logits, dim=1)


class GridSGD:
    """SGD with momentum, no weight decay, a per-head learning rate and a cosine schedule, on stacked heads.

    Same update as ``torch.optim.SGD(momentum=m, dampening=0, nesterov=False)`` with one param group per head
    and ``CosineAnnealingLR(T_max=total_steps, eta_min=0)`` stepped after each step::

        buf = m * buf + grad;  param -= lr_head * cosine(t) * buf
    """

    def __init__(self, grid: LinearGrid, head_lrs: Tensor, total_steps: int, momentum: float = 0.9) -> None:
        self.grid = grid
        self.head_lrs = head_lrs  # [H] learning rates of the heads of one variant
        self.total_steps = total_steps
        self.momentum = momentum
        self.buffers = [torch.zeros_like(p) for p in grid.parameters()]
        self.steps = 0

    def step(self, cls_tokens: Tensor, patch_mean: Tensor | None, labels: Tensor) -> float:
        """One iteration on a batch; returns the summed loss of all heads."""
        logits = self.grid(cls_tokens, patch_mean)  # [B, G, C]
        batch, heads = logits.shape[:2]
        # sum over heads of each head's batch-mean cross-entropy: each head gets exactly its own gradient
        loss = F.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(heads), reduction="sum") / batch
        params = list(self.grid.parameters())
        grads = torch.autograd.grad(loss, params)
        factor = cosine_factor(self.steps, self.total_steps)
        with torch.no_grad():
            for param, grad, buf in zip(params, grads, self.buffers):
                buf.mul_(self.momentum).add_(grad)
                lr = (self.head_lrs * factor).view(-1, *([1] * (param.ndim - 1)))  # [H, 1(, 1)]
                param.sub_(lr * buf)
        self.steps += 1
        return loss.item()


@torch.no_grad()
def grid_top1(grid: LinearGrid, features: Features, device: torch.device, chunk: int = 4096) -> Tensor:
    """Top-1 accuracy (%) of every head, ``[G]``, computed in chunks so the ``[N, G, C]`` logits never coexist."""
    correct = torch.zeros(grid.num_heads, device=device)
    labels = torch.from_numpy(features.labels).to(device)
    for start in range(0, len(features), chunk):
        cls_tokens, patch_mean = _slice(features, slice(start, start + chunk), device)
        predictions = grid(cls_tokens, patch_mean).argmax(dim=2)  # [n, G]
        correct += (predictions == labels[start : start + chunk, None]).sum(dim=0)
    return (100.0 * correct / max(len(features), 1)).cpu()


@torch.no_grad()
def head_logits(grid: LinearGrid, features: Features, head: int, device: torch.device, chunk: int = 4096) -> Tensor:
    """Logits ``[N, C]`` of one head (on the CPU)."""
    outputs = []
    for start in range(0, len(features), chunk):
        cls_tokens, patch_mean = _slice(features, slice(start, start + chunk), device)
        outputs.append(grid(cls_tokens, patch_mean)[:, head].cpu())
    return torch.cat(outputs)


def _slice(features: Features, index: slice | np.ndarray, device: torch.device) -> tuple[Tensor, Tensor | None]:
    cls_tokens = torch.as_tensor(features.cls[index]).to(device, non_blocking=True)
    patch_mean = features.patch_mean
    return cls_tokens, (torch.as_tensor(patch_mean[index]).to(device) if patch_mean is not None else None)


def available_variants(config: LinearConfig, features: Features) -> list[FeatureVariant]:
    """The configured variants that the extracted features allow (n capped at the blocks kept; avgpool needs
    the mean patch token), deduplicated, in the official order."""
    variants: list[FeatureVariant] = []
    for n in config.n_last_blocks:
        for avgpool in config.avgpool:
            if avgpool and features.patch_mean is None:
                continue
            variant = FeatureVariant(min(n, features.n_blocks), avgpool)
            if variant not in variants:
                variants.append(variant)
    return variants


def _batches(num_items: int, batch_size: int, generator: torch.Generator) -> Iterator[np.ndarray]:
    """Endless shuffled batches (a new permutation per pass, incomplete last batch dropped)."""
    while True:
        order = torch.randperm(num_items, generator=generator).numpy()
        for start in range(0, num_items - batch_size + 1, batch_size):
            yield np.sort(order[start : start + batch_size])


def run_linear(
    train: Features,
    val: Features | None = None,
    tests: Sequence[Features] = (),
    config: LinearConfig = LinearConfig(),
    *,
    train_epoch_features: Callable[[int], Features] | None = None,
) -> LinearResult:
    """Train the grid on ``train``, pick the best head on ``val`` (or on a stratified hold-out of train when
    ``val`` is None), and report it on ``val`` and every set of ``tests``.

    ``train_epoch_features(epoch)``, when given, supplies fresh (augmented) training features for each epoch
    instead of reusing ``train``: the official training-time augmentation, at the cost of one extraction per epoch.
    """
    device = resolve_device(config.device)
    selection_name = val.name if val is not None else f"{train.name} hold-out ({config.val_fraction:.0%})"
    if val is None:
        if train_epoch_features is not None:
            raise ValueError("augmented training needs an explicit validation set (split the images beforehand)")
        kept, held = stratified_split(train.labels, config.val_fraction, config.seed)
        train, val = train.subset(kept), train.subset(held, selection_name)
    variants = available_variants(config, train)
    batch_size = min(config.batch_size, len(train))
    iterations_per_epoch = max(1, len(train) // batch_size)
    total = config.iterations or config.epochs * iterations_per_epoch
    lrs = [linear_scaled_lr(lr, batch_size) for lr in config.learning_rates]

    generator = torch.Generator().manual_seed(config.seed)
    num_classes = max(train.num_classes, val.num_classes, *(t.num_classes for t in tests))
    grid = LinearGrid(variants, train.cls.shape[-1], len(lrs), num_classes, generator).to(device)
    optimizer = GridSGD(grid, torch.tensor(lrs, device=device), total, config.momentum)

    epoch_features = train
    batches = _batches(len(train), batch_size, generator)
    labels = torch.from_numpy(train.labels).to(device)
    for step in tqdm(range(total), desc="linear grid", disable=not config.progress, unit="it"):
        if train_epoch_features is not None and step % iterations_per_epoch == 0:
            epoch_features = train_epoch_features(step // iterations_per_epoch)
            if not np.array_equal(epoch_features.labels, train.labels):
                raise RuntimeError("augmented training features must cover the same images, in the same order")
        index = next(batches)
        cls_tokens, patch_mean = _slice(epoch_features, index, device)
        optimizer.step(cls_tokens, patch_mean, labels[torch.from_numpy(index).to(device)])

    per_head_top1 = grid_top1(grid, val, device)  # [G]
    heads = [
        HeadScore(variant.name, variant.n_blocks, variant.avgpool, base_lr, lr, float(per_head_top1[g]))
        for g, (variant, (base_lr, lr)) in enumerate(
            (v, pair) for v in variants for pair in zip(config.learning_rates, lrs)
        )
    ]
    best_index = int(np.argmax([h.selection_top1 for h in heads]))  # first maximum, as the official strict ">"
    evals = {}
    for evaluated in (val, *tests):
        logits = head_logits(grid, evaluated, best_index, device)
        evals[evaluated.name] = accuracy(logits, torch.from_numpy(evaluated.labels))
    return LinearResult(
        best=heads[best_index],
        heads=heads,
        selection_set=selection_name,
        evals=evals,
        num_train=len(train),
        iterations=total,
        batch_size=batch_size,
        augmented=train_epoch_features is not None,
    )
