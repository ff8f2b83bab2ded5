"""Target-health statistics against independent references, the collapse warning, and their place in a run."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import entropy

from dinolab.config import apply_overrides
from dinolab.train.health import HealthMonitor, feature_spread, target_stats
from dinolab.train.logger import read_metrics
from dinolab.train.loop import train
from dinolab.train.recipes import get_recipe


def test_target_stats_match_a_reference_written_with_scipy():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.full(16, 0.3), size=40)  # [N, K]
    student = rng.normal(size=(25, 16))
    stats = target_stats(torch.tensor(probs), torch.tensor(student))
    log_k = math.log(16)
    assert stats["row_entropy"] == pytest.approx(np.mean([entropy(row) for row in probs]) / log_k, rel=1e-5)
    assert stats["batch_entropy"] == pytest.approx(entropy(probs.mean(axis=0)) / log_k, rel=1e-5)
    assert stats["prototypes_used"] == len(set(probs.argmax(axis=1)))
    assert stats["agreement"] == pytest.approx(np.mean(student.argmax(1) == probs[:25].argmax(1)))


def test_uniform_and_one_hot_targets_are_the_two_ends():
    uniform = target_stats(torch.full((8, 32), 1 / 32))
    assert uniform["row_entropy"] == pytest.approx(1.0) and uniform["batch_entropy"] == pytest.approx(1.0)
    one_prototype = torch.zeros(8, 32)
    one_prototype[:, 5] = 1
    collapsed = target_stats(one_prototype)
    assert collapsed["row_entropy"] == pytest.approx(0.0, abs=1e-6)
    assert collapsed["batch_entropy"] == pytest.approx(0.0, abs=1e-6) and collapsed["prototypes_used"] == 1
    assert target_stats(torch.zeros(0, 32)) == {}


def test_feature_spread_is_the_normalised_std_over_the_batch():
    x = torch.randn(500, 64, dtype=torch.float64)
    unit = x / x.norm(dim=1, keepdim=True)
    expected = unit.numpy().std(axis=0, ddof=1).mean() * 8
    assert feature_spread(x) == pytest.approx(expected, rel=1e-5)
    assert 0.9 < feature_spread(x) < 1.1  # spread over the sphere
    same = torch.randn(1, 64).repeat(10, 1) + 1e-7 * torch.randn(10, 64)
    assert feature_spread(same) < 1e-4


def test_the_monitor_waits_then_warns_then_repeats_while_it_lasts():
    monitor = HealthMonitor()
    monitor.thresholds.repeat_every = 3
    bad = {"health/dino_row_entropy": 0.97}
    fired = [monitor.update(step, bad) is not None for step in range(1, 9)]
    # patience 2: first warning at the 2nd bad log, then every 3rd
    assert fired == [False, True, False, False, True, False, False, True]
    assert "nearly uniform" in monitor.warnings[0] and "sinkhorn_knopp" in monitor.warnings[0]
    assert monitor.update(9, {"health/dino_row_entropy": 0.4}) is None and monitor.unhealthy_logs == 0
    concentrated = {"health/dino_batch_entropy": 0.05, "health/dino_prototypes_used": 2}
    assert HealthMonitor().diagnose(concentrated).startswith("the DINO targets are concentrated")


def test_a_collapsing_run_logs_health_and_prints_the_warning(noise_images, tmp_path, caplog):
    # a teacher temperature this high makes every target uniform: nothing can be learned from it
    config = apply_overrides(
        get_recipe("test_tiny"),
        [
            f"run.data={noise_images}",
            f"run.output_dir={tmp_path}",
            "loss.teacher_temp=50",
            "loss.warmup_teacher_temp=50",
        ],
    )
    with caplog.at_level("WARNING", logger="dinolab.train"):
        train(config)
    metrics = read_metrics(tmp_path)
    for key in ("dino_row_entropy", "dino_batch_entropy", "dino_prototypes_used", "dino_agreement"):
        assert f"health/{key}" in metrics[-1]
    assert "health/ibot_row_entropy" in metrics[-1] and "health/teacher_cls_std" in metrics[-1]
    assert metrics[-1]["health/dino_row_entropy"] > 0.99
    assert "grad_norm/backbone" in metrics[-1] and "grad_norm/dino_head" in metrics[-1]
    warnings = [r.getMessage() for r in caplog.records if "nearly uniform" in r.getMessage()]
    assert warnings and warnings[0].startswith("iteration 2:")
