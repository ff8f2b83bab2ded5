"""Schedules must equal the arrays of the official dinov2.utils.utils.CosineScheduler / build_schedulers."""

import math

import numpy as np
import pytest
from dinov2.utils.utils import CosineScheduler

from dinolab.train.schedules import (
    CosineSchedule,
    LinearWarmupThenConstant,
    ZeroUntil,
    build_schedules,
    scale_lr,
)


def _values(schedule, n: int) -> np.ndarray:
    return np.array([schedule(it) for it in range(n)])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(base_value=0.004, final_value=1e-6, total_iters=50, warmup_iters=10),
        dict(base_value=0.04, final_value=0.2, total_iters=37),
        dict(base_value=0.992, final_value=1.0, total_iters=20),
        dict(base_value=1.0, final_value=0.1, total_iters=30, warmup_iters=5, start_warmup_value=0.3, freeze_iters=4),
        dict(base_value=2.0, final_value=0.0, total_iters=12, warmup_iters=1, freeze_iters=2),
        dict(base_value=0.07, final_value=0.07, total_iters=9, warmup_iters=9, start_warmup_value=0.04),
    ],
)
def test_cosine_matches_official_array(kwargs: dict) -> None:
    official = CosineScheduler(**kwargs)
    ours = CosineSchedule(**kwargs)
    n = kwargs["total_iters"] + 5  # past the end: final value
    np.testing.assert_allclose(_values(ours, n), [official[it] for it in range(n)], rtol=1e-12, atol=1e-15)


def test_cosine_formula_points() -> None:
    s = CosineSchedule(base_value=1.0, final_value=0.0, total_iters=110, warmup_iters=10, freeze_iters=0)
    assert s(0) == 0.0 and s(9) == 1.0 and s(10) == 1.0
    assert math.isclose(s(10 + 50), 0.5)  # half-way through the cosine
    assert s(110) == 0.0 and s(10**9) == 0.0


def test_teacher_temp_matches_official_build() -> None:
    # official build_schedulers: CosineScheduler(0.07, 0.07, total=warmup=30 epochs, start_warmup_value=0.04)
    warmup = 30
    official = CosineScheduler(0.07, 0.07, total_iters=warmup, warmup_iters=warmup, start_warmup_value=0.04)
    ours = LinearWarmupThenConstant(start_value=0.04, value=0.07, warmup_iters=warmup)
    np.testing.assert_allclose(_values(ours, 40), [official[it] for it in range(40)], rtol=1e-12)
    assert ours(0) == 0.04 and ours(29) == pytest.approx(0.07) and ours(1000) == 0.07


def test_build_schedules_matches_official_build_schedulers() -> None:
    total, warmup, freeze = 60, 10, 5
    ours = build_schedules(
        base_lr=0.002,
        min_lr=1e-6,
        total_iters=total,
        warmup_iters=warmup,
        wd=0.04,
        wd_end=0.2,
        momentum=0.992,
        momentum_end=1.0,
        teacher_temp=0.07,
        warmup_teacher_temp=0.04,
        teacher_temp_warmup_iters=20,
        freeze_last_layer_iters=freeze,
    )
    lr = CosineScheduler(0.002, 1e-6, total, warmup_iters=warmup, start_warmup_value=0)
    last_layer_lr = CosineScheduler(0.002, 1e-6, total, warmup_iters=warmup, start_warmup_value=0)
    last_layer_lr.schedule[:freeze] = 0  # as the official build_schedulers does
    official = {
        "lr": lr,
        "wd": CosineScheduler(0.04, 0.2, total),
        "momentum": CosineScheduler(0.992, 1.0, total),
        "teacher_temp": CosineScheduler(0.07, 0.07, 20, warmup_iters=20, start_warmup_value=0.04),
        "last_layer_lr": last_layer_lr,
    }
    for it in range(total + 3):
        values = ours.values(it)
        assert values.keys() == official.keys()
        for key, schedule in official.items():
            assert values[key] == pytest.approx(schedule[it], rel=1e-12, abs=1e-15), (key, it)


def test_zero_until_does_not_shift() -> None:
    inner = CosineSchedule(1.0, 0.0, 20, warmup_iters=10)
    zeroed = ZeroUntil(inner, 3)
    assert [zeroed(it) for it in range(3)] == [0.0, 0.0, 0.0]
    assert all(zeroed(it) == inner(it) for it in range(3, 25))


def test_scale_lr() -> None:
    assert scale_lr(0.004, 1024) == 0.004
    assert scale_lr(0.004, 256) == pytest.approx(0.002)
    assert scale_lr(2e-4, 3072) == pytest.approx(2e-4 * math.sqrt(3))


def test_invalid_values_raise() -> None:
    with pytest.raises(ValueError, match="exceed total_iters"):
        CosineSchedule(1.0, 0.0, total_iters=5, warmup_iters=4, freeze_iters=2)
    with pytest.raises(ValueError, match="iterations >= 0"):
        CosineSchedule(1.0, 0.0, total_iters=5)(-1)
    with pytest.raises(ValueError, match="global_batch_size"):
        scale_lr(0.004, 0)
