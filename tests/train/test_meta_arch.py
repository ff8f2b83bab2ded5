"""Each efficiency technique of the training forward must leave the losses and gradients unchanged.

Packed sequences, the iBOT head on the masked tokens only and the chunked prototype cross-entropy are compared with
the naive forward (a pass per crop size, heads on every patch token, full logits) on the same weights and batch;
stochastic depth is off so both compute the same function.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from dinolab.data.augmentation import MultiCropViews
from dinolab.data.collate import collate_views
from dinolab.data.masking import MaskingGenerator
from dinolab.train.config import HeadsConfig, LossConfig, ModelConfig
from dinolab.train.meta_arch import SSLMetaArch

# the naive forward (the iBOT code's way) lives with the benchmark that measures against it
_spec = importlib.util.spec_from_file_location(
    "naive_meta_arch", Path(__file__).resolve().parents[2] / "benchmarks" / "naive_meta_arch.py"
)
_naive = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_naive)
IBOTStyleMetaArch = _naive.IBOTStyleMetaArch


def _batch(num_images: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    views = [
        MultiCropViews(
            global_crops=[torch.randn(3, 28, 28, generator=g) for _ in range(2)],
            local_crops=[torch.randn(3, 14, 14, generator=g) for _ in range(3)],
            local_size=14,
        )
        for _ in range(num_images)
    ]
    return collate_views(views, MaskingGenerator(4), mask_sample_probability=1.0, rng=np.random.default_rng(seed))


def _model(centering: str, separate_head: bool, **efficiency) -> SSLMetaArch:
    torch.manual_seed(0)
    model = ModelConfig(
        arch="vit_tiny",
        patch_size=7,
        depth=2,
        drop_path_rate=0.0,
        layerscale_init=0.5,
        packed_sequences=efficiency.get("packed", True),
    )
    heads = HeadsConfig(
        dino_prototypes=40,
        dino_hidden_dim=16,
        dino_bottleneck_dim=8,
        ibot_prototypes=40,
        ibot_hidden_dim=16,
        ibot_bottleneck_dim=8,
        ibot_separate_head=separate_head,
    )
    loss = LossConfig(centering=centering, chunked_cross_entropy=efficiency.get("chunked", True))
    return (IBOTStyleMetaArch if efficiency.get("all_patches") else SSLMetaArch)(model, heads, loss, img_size=28)


def _losses_and_grads(arch: SSLMetaArch, batch):
    terms = arch(batch, teacher_temp=0.05)
    terms.total.backward()
    grads = {name: p.grad.clone() for name, p in arch.student.named_parameters() if p.grad is not None}
    return terms.detached(), grads


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "ema"])
@pytest.mark.parametrize("separate_head", [False, True])
def test_efficient_forward_equals_the_naive_one(centering: str, separate_head: bool) -> None:
    batch = _batch()
    assert batch.mask_indices.numel() > 0
    naive = _losses_and_grads(_model(centering, separate_head, packed=False, chunked=False, all_patches=True), batch)
    for efficiency in ({"packed": True}, {"chunked": False}, {"all_patches": False, "chunked": True}):
        terms, grads = _losses_and_grads(_model(centering, separate_head, **efficiency), batch)
        for name in ("dino", "ibot", "koleo", "total"):
            assert terms[name] == pytest.approx(naive[0][name], rel=1e-5), (efficiency, name)
        assert grads.keys() == naive[1].keys()
        for name, grad in grads.items():
            # float sums in another order: compare against the scale of each gradient, not element by element
            scale = naive[1][name].abs().max().item()
            difference = (grad - naive[1][name]).abs().max().item()
            assert difference <= 1e-5 * scale + 1e-7, (efficiency, name, difference, scale)


def test_ibot_weight_zero_leaves_the_patches_out() -> None:
    batch = _batch()
    arch = _model("sinkhorn_knopp", False)
    arch.loss_config.ibot_weight = 0.0
    terms = arch(batch, teacher_temp=0.05)
    assert terms.ibot.item() == 0.0 and terms.dino.item() > 0


def test_from_config_builds_what_the_config_describes() -> None:
    from dinolab.config import apply_overrides
    from dinolab.train.recipes import get_recipe

    config = get_recipe("test_tiny")
    model = SSLMetaArch.from_config(config)
    grid = config.crops.global_size // config.model.patch_size
    assert model.student["backbone"].pos_embed.shape[1] == 1 + grid * grid
    assert model.student["backbone"].mask_token.requires_grad and not model.distillation
    unmasked = SSLMetaArch.from_config(apply_overrides(config, ["masking.sample_probability=0", "model.img_size=56"]))
    assert not unmasked.student["backbone"].mask_token.requires_grad  # never gets a gradient: frozen
    assert unmasked.student["backbone"].pos_embed.shape[1] == 1 + (56 // config.model.patch_size) ** 2
    teacher = SSLMetaArch.from_config(config).teacher
    distilled = SSLMetaArch.from_config(config, distillation_teacher=teacher)
    assert (
        distilled.distillation and distilled.teacher is teacher and distilled.produced_backbone is distilled.student_ema
    )
