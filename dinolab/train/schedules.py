"""Per-iteration schedules of DINOv2 pretraining: learning rate, weight decay, teacher momentum and temperature.

Every schedule is a pure function of the iteration (``schedule(it) -> float``), so resuming at iteration ``it``
needs nothing but ``it``. Values match the arrays of the official ``dinov2.utils.utils.CosineScheduler``
element by element (including its warmup, which is ``numpy.linspace`` and so reaches the base value on the
last warmup iteration).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

Schedule = Callable[[int], float]
"""A schedule maps the iteration (0-based) to a value."""


def scale_lr(base_lr: float, global_batch_size: int) -> float:
    """DINOv2's learning-rate scaling rule: ``base_lr * sqrt(global_batch_size / 1024)``."""
    if base_lr < 0 or global_batch_size < 1:
        raise ValueError(f"scale_lr needs base_lr >= 0 and global_batch_size >= 1, got {base_lr}, {global_batch_size}")
    return base_lr * math.sqrt(global_batch_size / 1024)


def _check_iteration(it: int) -> None:
    if it < 0:
        raise ValueError(f"schedules are defined for iterations >= 0, got {it}")


def _linear_warmup(i: int, n: int, start: float, end: float) -> float:
    # numpy.linspace(start, end, n)[i]: both endpoints included.
    return start if n == 1 else start + i * (end - start) / (n - 1)


@dataclass(frozen=True)
class CosineSchedule:
    """``freeze_iters`` of 0, then a linear warmup from ``start_warmup_value`` to ``base_value`` over
    ``warmup_iters``, then a half cosine from ``base_value`` to ``final_value`` ending at ``total_iters``;
    ``final_value`` from ``total_iters`` on."""

    base_value: float
    final_value: float
    total_iters: int
    warmup_iters: int = 0
    start_warmup_value: float = 0.0
    freeze_iters: int = 0

    def __post_init__(self) -> None:
        if min(self.total_iters, self.warmup_iters, self.freeze_iters) < 0:
            raise ValueError(f"CosineSchedule iteration counts must be >= 0: {self}")
        if self.freeze_iters + self.warmup_iters > self.total_iters:
            raise ValueError(
                f"CosineSchedule: freeze_iters ({self.freeze_iters}) + warmup_iters ({self.warmup_iters}) exceed "
                f"total_iters ({self.total_iters}); shorten the warmup or train longer"
            )

    def __call__(self, it: int) -> float:
        _check_iteration(it)
        if it >= self.total_iters:
            return self.final_value
        if it < self.freeze_iters:
            return 0.0
        it -= self.freeze_iters
        if it < self.warmup_iters:
            return _linear_warmup(it, self.warmup_iters, self.start_warmup_value, self.base_value)
        it -= self.warmup_iters
        cosine_iters = self.total_iters - self.freeze_iters - self.warmup_iters
        progress = it / cosine_iters  # in [0, 1)
        return self.final_value + 0.5 * (self.base_value - self.final_value) * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class LinearWarmupThenConstant:
    """Linear from ``start_value`` to ``value`` over ``warmup_iters`` (``value`` on the last of them), then
    ``value``. DINOv2's teacher temperature: 0.04 -> 0.07 over 30 epochs."""

    start_value: float
    value: float
    warmup_iters: int

    def __post_init__(self) -> None:
        if self.warmup_iters < 0:
            raise ValueError(f"LinearWarmupThenConstant.warmup_iters must be >= 0, got {self.warmup_iters}")

    def __call__(self, it: int) -> float:
        _check_iteration(it)
        if it >= self.warmup_iters:
            return self.value
        return _linear_warmup(it, self.warmup_iters, self.start_value, self.value)


@dataclass(frozen=True)
class ZeroUntil:
    """``0`` for the first ``iters`` iterations, then ``schedule(it)`` (not shifted): DINOv2 freezes the
    heads' last layer this way during the first epoch."""

    schedule: Schedule
    iters: int

    def __post_init__(self) -> None:
        if self.iters < 0:
            raise ValueError(f"ZeroUntil.iters must be >= 0, got {self.iters}")

    def __call__(self, it: int) -> float:
        _check_iteration(it)
        return 0.0 if it < self.iters else self.schedule(it)


@dataclass(frozen=True)
class TrainingSchedules:
    """The schedules a DINOv2 training step reads; keys of :meth:`values` match ``apply_schedules``."""

    lr: Schedule
    """Peak-scaled learning rate (times each parameter group's ``lr_multiplier``)."""
    wd: Schedule
    """Weight decay (times each group's ``wd_multiplier``)."""
    momentum: Schedule
    """Teacher EMA momentum ``m`` in ``teacher = m * teacher + (1 - m) * student``."""
    teacher_temp: Schedule
    """Temperature of the teacher targets."""
    last_layer_lr: Schedule
    """Learning rate of the heads' last (prototype) layer."""

    def values(self, it: int) -> dict[str, float]:
        """All values at iteration ``it``, e.g. for logging: ``{"lr", "wd", "momentum", "teacher_temp",
        "last_layer_lr"}``."""
        return {
            "lr": self.lr(it),
            "wd": self.wd(it),
            "momentum": self.momentum(it),
            "teacher_temp": self.teacher_temp(it),
            "last_layer_lr": self.last_layer_lr(it),
        }


def build_schedules(
    *,
    base_lr: float,
    total_iters: int,
    warmup_iters: int,
    teacher_temp_warmup_iters: int,
    freeze_last_layer_iters: int,
    min_lr: float = 1e-6,
    wd: float = 0.04,
    wd_end: float = 0.2,
    momentum: float = 0.992,
    momentum_end: float = 1.0,
    teacher_temp: float = 0.07,
    warmup_teacher_temp: float = 0.04,
) -> TrainingSchedules:
    """DINOv2's schedules (as the official ``build_schedulers``), from explicit numbers.

    ``base_lr`` is the peak learning rate, already scaled to the batch size (:func:`scale_lr`). The lr warms up
    linearly from 0 over ``warmup_iters`` then follows a cosine to ``min_lr``; weight decay and teacher momentum
    follow a cosine (no warmup) from their start to end values; the teacher temperature warms up linearly from
    ``warmup_teacher_temp`` to ``teacher_temp`` over ``teacher_temp_warmup_iters`` then stays; the last-layer lr
    is the lr schedule set to 0 for the first ``freeze_last_layer_iters``.
    """
    lr = CosineSchedule(base_lr, min_lr, total_iters, warmup_iters=warmup_iters)
    return TrainingSchedules(
        lr=lr,
        wd=CosineSchedule(wd, wd_end, total_iters),
        momentum=CosineSchedule(momentum, momentum_end, total_iters),
        teacher_temp=LinearWarmupThenConstant(warmup_teacher_temp, teacher_temp, teacher_temp_warmup_iters),
        last_layer_lr=ZeroUntil(lr, freeze_last_layer_iters),
    )
