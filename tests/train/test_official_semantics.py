"""Where dinolab must do what the official trainer and configs do: each test would have caught a past deviation."""

import numpy as np
import pytest
import torch
from torch import nn

from dinolab.config import ConfigError
from dinolab.hub import load_backbone
from dinolab.models.heads import DINOHead
from dinolab.train.checkpoint import save_backbone
from dinolab.train.config import ModelConfig
from dinolab.train.loop import clip_gradients
from dinolab.train.meta_arch import build_backbone
from dinolab.train.recipes import get_recipe


def student_with_gradients(scale_head: float) -> nn.ModuleDict:
    torch.manual_seed(0)
    student = nn.ModuleDict(
        {"backbone": nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), "dino_head": DINOHead(8, 16, 16, 8)}
    )
    for name, param in student.named_parameters():
        param.grad = torch.randn_like(param) * (scale_head if name.startswith("dino_head") else 0.1)
    return student


def test_per_module_clipping_clips_each_sub_module_on_its_own():
    """Official: ``for v in model.student.values(): v.clip_grad_norm_(3.0)``."""
    student = student_with_gradients(scale_head=10.0)
    before = {n: p.grad.clone().numpy() for n, p in student.named_parameters()}
    norms = clip_gradients(student, 3.0, "per_module")
    for module in ("backbone", "dino_head"):
        names = [n for n in before if n.startswith(module)]
        norm = np.sqrt(sum((before[n] ** 2).sum() for n in names))
        assert norms[f"grad_norm/{module}"] == pytest.approx(norm, rel=1e-5)
        factor = min(1.0, 3.0 / (norm + 1e-6))
        for n in names:
            np.testing.assert_allclose(dict(student.named_parameters())[n].grad.numpy(), before[n] * factor, rtol=1e-5)
    # the large head gradient did not shrink the backbone's (its norm is under 3)
    assert norms["grad_norm/backbone"] < 3.0 and norms["grad_norm/dino_head"] > 3.0


def test_global_clipping_scales_everything_by_one_factor():
    student = student_with_gradients(scale_head=10.0)
    before = {n: p.grad.clone().numpy() for n, p in student.named_parameters()}
    norms = clip_gradients(student, 3.0, "global")
    total = np.sqrt(sum((g**2).sum() for g in before.values()))
    assert norms["grad_norm"] == pytest.approx(total, rel=1e-5)
    for n, p in student.named_parameters():
        np.testing.assert_allclose(p.grad.numpy(), before[n] * 3.0 / (total + 1e-6), rtol=1e-5)


# The official training configs (facebookresearch/dinov2, dinov2/configs/train/*.yaml), values written here by hand.
OFFICIAL = {
    "vitg14_lvd142m": dict(
        arch="vit_giant2", ffn="swiglu", drop_path=0.4, batch=12, dino_k=131072, dino_bottleneck=384,
        ibot_separate=True, ibot_k=131072, ibot_bottleneck=256, layer_decay=1.0, base_lr=2e-4, momentum=0.994,
    ),
    "vitl14_lvd142m": dict(
        arch="vit_large", ffn="swiglu", drop_path=0.4, batch=32, dino_k=131072, dino_bottleneck=384,
        ibot_separate=True, ibot_k=131072, ibot_bottleneck=256, layer_decay=1.0, base_lr=2e-4, momentum=0.994,
    ),
    "vitl16_imagenet1k_short": dict(
        arch="vit_large", ffn="mlp", drop_path=0.3, batch=64, dino_k=65536, dino_bottleneck=256,
        ibot_separate=False, ibot_k=65536, ibot_bottleneck=256, layer_decay=0.9, base_lr=0.004, momentum=0.992,
    ),
}  # fmt: skip


@pytest.mark.parametrize("recipe", sorted(OFFICIAL))
def test_recipes_match_the_official_configs(recipe):
    config, expected = get_recipe(recipe), OFFICIAL[recipe]
    ffn = config.model.ffn_layer or ("swiglu" if config.model.arch == "vit_giant2" else "mlp")
    assert (config.model.arch, ffn, config.model.drop_path_rate) == (
        expected["arch"],
        expected["ffn"],
        expected["drop_path"],
    )
    assert config.optim.batch_size_per_process == expected["batch"]
    heads = config.heads
    assert (heads.dino_prototypes, heads.dino_bottleneck_dim) == (expected["dino_k"], expected["dino_bottleneck"])
    assert heads.ibot_separate_head == expected["ibot_separate"]
    if heads.ibot_separate_head:
        assert (heads.ibot_prototypes, heads.ibot_bottleneck_dim) == (expected["ibot_k"], expected["ibot_bottleneck"])
    assert config.optim.layer_decay == expected["layer_decay"] and config.optim.base_lr == expected["base_lr"]
    assert config.optim.momentum_teacher == expected["momentum"]
    assert config.optim.clip_grad == 3.0 and config.optim.clip_grad_mode == "per_module"


@pytest.mark.parametrize(
    ("arch", "ffn", "first", "shape"),
    [
        # SwiGLU: hidden = 2/3 of the MLP's 4 x dim, rounded up to a multiple of 8 (w12 holds both halves)
        ("vit_tiny", "swiglu", "w12", (2 * 512, 192)),
        ("vit_small", "swiglu", "w12", (2 * 1024, 384)),
        ("vit_base", "swiglu", "w12", (2 * 2048, 768)),
        ("vit_large", "swiglu", "w12", (2 * 2736, 1024)),
        ("vit_giant2", "", "w12", (2 * 4096, 1536)),
        ("vit_giant2", "mlp", "fc1", (6144, 1536)),
        ("vit_large", "", "fc1", (4096, 1024)),
    ],
)
def test_the_feed_forward_of_every_size(arch, ffn, first, shape):
    backbone = build_backbone(ModelConfig(arch=arch, depth=1, ffn_layer=ffn), img_size=28)
    assert tuple(getattr(backbone.blocks[0].mlp, first).weight.shape) == shape


def test_a_swiglu_model_exports_and_loads_back(tmp_path):
    backbone = build_backbone(ModelConfig(arch="vit_small", depth=2, ffn_layer="swiglu"), img_size=56).eval()
    path = save_backbone(backbone.state_dict(), tmp_path / "swiglu.pth")
    loaded = load_backbone(path)
    x = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(loaded(x), backbone(x))


def test_invalid_choices_are_refused():
    with pytest.raises(ConfigError, match="ffn_layer"):
        ModelConfig(ffn_layer="geglu")
    with pytest.raises(ConfigError, match="weight_init"):
        ModelConfig(weight_init="kaiming")


def test_xavier_initialisation_of_the_blocks():
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(arch="vit_small", depth=1, weight_init="xavier_uniform"), img_size=28)
    weight = backbone.blocks[0].mlp.fc1.weight.detach()  # [1536, 384]: bound sqrt(6 / (fan_in + fan_out))
    bound = (6 / (384 + 1536)) ** 0.5
    assert weight.abs().max() <= bound and weight.abs().max() > 0.95 * bound
    assert weight.std() == pytest.approx(bound / 3**0.5, rel=0.02)
