"""run.activation_checkpointing: the values it takes, and what 'auto' chooses on each device."""

import pytest
import torch

from dinolab.config import ConfigError, apply_overrides
from dinolab.train import parallel
from dinolab.train.meta_arch import SSLMetaArch
from dinolab.train.parallel import (
    ACTIVATIONS_PER_TOKEN,
    apply_activation_checkpointing,
    choose_activation_checkpointing,
    student_tokens_per_step,
)
from dinolab.train.recipes import get_recipe


@pytest.mark.parametrize(
    ("value", "mode"), [("auto", "auto"), ("selective", "selective"), ("true", "full"), ("false", "none")]
)
def test_values_and_the_old_booleans(value: str, mode: str) -> None:
    config = apply_overrides(get_recipe("test_tiny"), [f"run.activation_checkpointing={value}"])
    assert config.run.activation_checkpointing == mode


def test_a_bad_value_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="auto, none, selective or full"):
        apply_overrides(get_recipe("test_tiny"), ["run.activation_checkpointing=some"])


def test_student_tokens_count_every_crop() -> None:
    config = get_recipe("test_tiny")  # 2 x 28 px + 2 x 14 px crops, patch 14, batch 4
    assert student_tokens_per_step(config, patch_size=14, registers=0) == 4 * (2 * (4 + 1) + 2 * (1 + 1))
    assert student_tokens_per_step(config, patch_size=14, registers=4) == 4 * (2 * 9 + 2 * 6)


def _model_and_config(**run: str):
    config = apply_overrides(get_recipe("test_tiny"), [f"run.{k}={v}" for k, v in run.items()])
    return SSLMetaArch.from_config(config), config


def test_auto_on_a_cpu_keeps_activations_in_fp32_unless_they_pass_half_the_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fp32: 'none' (the fused branches keep about as little as selective checkpointing), 'full' past half of the
    machine's memory; bf16 (plain autograd): 'selective' for large activations. Explicit values are kept."""
    model, config = _model_and_config()
    cpu = torch.device("cpu")
    assert choose_activation_checkpointing(config, model, cpu) == "none"  # a few kB of activations
    monkeypatch.setattr(parallel, "physical_memory_bytes", lambda: 1000)
    assert choose_activation_checkpointing(config, model, cpu) == "full"
    model, config = _model_and_config(dtype="bf16")
    assert choose_activation_checkpointing(config, model, cpu) == "none"
    monkeypatch.setattr(parallel, "CPU_SELECTIVE_ABOVE", 1000)
    assert choose_activation_checkpointing(config, model, cpu) == "selective"
    model, config = _model_and_config(activation_checkpointing="none")
    assert choose_activation_checkpointing(config, model, torch.device("cpu")) == "none"
    apply_activation_checkpointing(model, "full")
    assert {block.activation_checkpointing for block in model.student["backbone"].blocks} == {"full"}
    assert {block.activation_checkpointing for block in model.teacher["backbone"].blocks} == {"none"}


def test_physical_memory_is_known_here() -> None:
    assert parallel.physical_memory_bytes() > 2**30


def test_auto_on_a_gpu_keeps_activations_only_when_they_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    model, config = _model_and_config()
    backbone = model.student["backbone"]
    tokens = student_tokens_per_step(config, backbone.patch_size, 0)
    moments = 2 * 4 * sum(p.numel() for p in model.student.parameters())

    def activations(mode: str) -> int:  # fp32 bytes of the student's kept activations
        return tokens * backbone.embed_dim * ACTIVATIONS_PER_TOKEN[mode] * 4 * len(backbone.blocks)

    cuda = torch.device("cuda")
    for free, expected in (
        (2 * (activations("none") + moments), "none"),
        (2 * (activations("none") + moments) - 2, "selective"),
        (2 * (activations("selective") + moments), "selective"),
        (2 * (activations("selective") + moments) - 2, "full"),
    ):
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 10 * free))
        assert choose_activation_checkpointing(config, model, cuda) == expected
