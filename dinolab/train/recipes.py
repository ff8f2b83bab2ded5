"""Recipes: functions that return a :class:`TrainConfig`, each derived from another by the changes it makes.

The published values come from the DINOv2 paper and the official training configs (``ssl_default_config.yaml``,
``vitl16_short.yaml``, ``vitg14.yaml``). Each docstring starts with the command that runs the recipe.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from dinolab.data.augmentation import AugmentationConfig
from dinolab.train.config import (
    HeadsConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)


def _replace(config: TrainConfig, **sections: dict) -> TrainConfig:
    """A copy of ``config`` with some fields of some sections changed (re-validated)."""
    changed = {name: dataclasses.replace(getattr(config, name), **fields) for name, fields in sections.items()}
    return dataclasses.replace(config, **changed)


def default() -> TrainConfig:
    """``dinolab train --recipe default --data DIR``

    The defaults of every config field: a ViT-S/14 with the paper's method settings (65536 prototypes, Sinkhorn-Knopp,
    batch 64 per process, 100 epochs of 1250 iterations, base lr 0.004 with sqrt scaling)."""
    return TrainConfig()


def vitl16_imagenet1k_short() -> TrainConfig:
    """``torchrun --nproc-per-node=8 -m dinolab train --recipe vitl16_imagenet1k_short --data IMAGENET/train``

    The ImageNet-1k ViT-L/16 run of the official ``vitl16_short.yaml`` (100 epochs of 1250 iterations, batch 64
    per GPU on 32 GPUs = 2048, base lr 0.004 with sqrt scaling, EMA-centered targets, local crops 96 px).
    Reported: ~82% k-NN / ~84% linear top-1 on ImageNet-1k after 100 epochs.
    """
    config = TrainConfig(
        model=ModelConfig(arch="vit_large", patch_size=16, drop_path_rate=0.3),
        loss=LossConfig(centering="ema"),
        optim=OptimConfig(batch_size_per_process=64, epochs=100, base_lr=0.004, weight_decay_end=0.4),
        crops=AugmentationConfig(global_size=224, local_size=96),
        run=RunConfig(dtype="bf16", output_dir="runs/vitl16_imagenet1k_short"),
    )
    return config


def vitg14_lvd142m() -> TrainConfig:
    """``srun ... torchrun -m dinolab train --recipe vitg14_lvd142m --data LVD142M.txt`` (96 nodes x 8 GPUs)

    The ViT-g/14 run of the paper (``vitg14.yaml``): batch 3072 (12 per GPU on 256 GPUs), 625k iterations with
    100k warm-up, base lr 2e-4, layer decay 1.0, drop-path 0.4, SwiGLU FFN, 131072 prototypes, separate iBOT
    head, 384-d bottleneck, Sinkhorn-Knopp, teacher momentum 0.994, weight decay 0.04 -> 0.2.
    """
    config = TrainConfig(
        model=ModelConfig(arch="vit_giant2", patch_size=14, drop_path_rate=0.4),
        heads=HeadsConfig(
            dino_prototypes=131072,
            dino_bottleneck_dim=384,
            ibot_separate_head=True,
            ibot_prototypes=131072,
            ibot_bottleneck_dim=384,
        ),
        loss=LossConfig(centering="sinkhorn_knopp"),
        optim=OptimConfig(
            batch_size_per_process=12,
            epochs=500,
            warmup_epochs=80,
            base_lr=2e-4,
            layer_decay=1.0,
            weight_decay_end=0.2,
            momentum_teacher=0.994,
        ),
        run=RunConfig(dtype="bf16", parallel="fsdp", output_dir="runs/vitg14_lvd142m"),
    )
    return _replace(config, crops=dict(global_size=224, local_size=98))


def _smaller_lvd(arch: str, batch_per_process: int, drop_path: float) -> TrainConfig:
    return _replace(
        vitg14_lvd142m(),
        model=dict(arch=arch, drop_path_rate=drop_path),
        optim=dict(batch_size_per_process=batch_per_process),
        run=dict(parallel="ddp" if arch != "vit_large" else "fsdp", output_dir=f"runs/{arch}14_lvd142m"),
    )


def vitl14_lvd142m() -> TrainConfig:
    """``torchrun ... -m dinolab train --recipe vitl14_lvd142m --data LVD142M.txt``

    The ViT-g recipe for a ViT-L/14 trained from scratch (the released ViT-L was distilled from ViT-g)."""
    return _smaller_lvd("vit_large", 32, 0.4)


def vitb14_lvd142m() -> TrainConfig:
    """``torchrun ... -m dinolab train --recipe vitb14_lvd142m --data LVD142M.txt``

    The ViT-g recipe for a ViT-B/14 trained from scratch."""
    return _smaller_lvd("vit_base", 64, 0.1)


def vits14_lvd142m() -> TrainConfig:
    """``torchrun ... -m dinolab train --recipe vits14_lvd142m --data LVD142M.txt``

    The ViT-g recipe for a ViT-S/14 trained from scratch."""
    return _smaller_lvd("vit_small", 64, 0.1)


def highres(base: TrainConfig | None = None, from_checkpoint: str = "") -> TrainConfig:
    """``dinolab train --recipe highres --data DIR model.init_from=RUN/teacher_backbone.pth``

    The short high-resolution phase at the end of pretraining: ~10k iterations with 518 px global crops (local
    crops unchanged) and compressed schedules at half the base lr, starting from a run's teacher; it teaches the
    position embedding and the dense features high resolution cheaply.
    """
    config = base or vitg14_lvd142m()
    patch = config.model.patch_size
    high = round(518 / patch) * patch  # 518 for patch 14
    config = _replace(
        config,
        crops=dict(global_size=high),
        model=dict(img_size=high, init_from=from_checkpoint or config.model.init_from),
        optim=dict(
            epochs=8,  # 8 x 1250 = 10k iterations
            warmup_epochs=1,
            base_lr=config.optim.base_lr / 2,
            momentum_teacher=config.optim.final_momentum_teacher - (1 - config.optim.momentum_teacher) / 10,
            freeze_last_layer_epochs=0,
        ),
        loss=dict(warmup_teacher_temp_epochs=0, warmup_teacher_temp=config.loss.teacher_temp),
        run=dict(output_dir=config.run.output_dir + "_highres"),
    )
    return config


def cpu_small() -> TrainConfig:
    """``dinolab train --recipe cpu_small --data DIR``

    A ViT-Ti/14 for 2 CPU cores: 56 px crops, 1024 prototypes, 300 iterations of batch 32."""
    config = TrainConfig(
        model=ModelConfig(arch="vit_tiny", patch_size=14, drop_path_rate=0.1, layerscale_init=1e-5),
        heads=HeadsConfig(dino_prototypes=1024, dino_hidden_dim=512, dino_bottleneck_dim=128, ibot_prototypes=1024),
        loss=LossConfig(warmup_teacher_temp_epochs=1),
        optim=OptimConfig(
            batch_size_per_process=32,
            epochs=6,
            iters_per_epoch=50,
            base_lr=0.002,
            lr_scaling="none",
            warmup_epochs=1,
            momentum_teacher=0.99,
            layer_decay=1.0,
            freeze_last_layer_epochs=0.2,
        ),
        run=RunConfig(output_dir="runs/cpu_small", num_workers=2, log_every=10, checkpoint_every=100),
    )
    return _replace(config, crops=dict(global_size=56, local_size=28, local_crops_number=4))


def quickstart() -> TrainConfig:
    """``dinolab quickstart`` (or ``make quickstart``)

    What the quickstart pretrains on scikit-learn's digits in minutes on 2 CPU cores: a 4-block ViT-Ti with 8 px
    patches on 32 px images, no horizontal flips (digits are not symmetric), a small blur kernel, few prototypes."""
    config = _replace(
        cpu_small(),
        model=dict(patch_size=8, depth=4, drop_path_rate=0.1, layerscale_init=1.0),
        heads=dict(dino_prototypes=64, ibot_prototypes=64),
        # a short run on a small batch: EMA centering and a sharp teacher from the start, a faster teacher, and
        # constant weight decay learn faster here than the long-run settings
        loss=dict(centering="ema", teacher_temp=0.04, warmup_teacher_temp=0.02),
        optim=dict(epochs=6, iters_per_epoch=50, base_lr=0.001, momentum_teacher=0.98, weight_decay_end=0.04),
        run=dict(output_dir="quickstart_report/run", log_every=25, checkpoint_every=100),
        # digits are small, grey and not symmetric: no flips, no solarisation, milder crops and colour changes
        crops=dict(
            global_size=32,
            local_size=16,
            global_scale=(0.5, 1.0),
            local_scale=(0.2, 0.5),
            hflip_p=0.0,
            color_jitter_p=0.3,
            grayscale_p=0.0,
            global2_solarize_p=0.0,
            blur_kernel_size=3,
        ),
    )
    return config


def test_tiny() -> TrainConfig:
    """A seconds-long run for tests: 2-block ViT-Ti, 28 px crops, 64 prototypes."""
    config = _replace(
        cpu_small(),
        model=dict(drop_path_rate=0.1, depth=2),
        heads=dict(dino_prototypes=64, dino_hidden_dim=32, dino_bottleneck_dim=16, ibot_prototypes=64),
        optim=dict(
            batch_size_per_process=4, epochs=2, iters_per_epoch=3, warmup_epochs=1, freeze_last_layer_epochs=0.5
        ),
        run=dict(num_workers=0, log_every=1, checkpoint_every=2, tensorboard=False, progress=False),
    )
    return _replace(config, crops=dict(global_size=28, local_size=14, local_crops_number=2))


RECIPES: dict[str, Callable[[], TrainConfig]] = {
    "default": default,
    "vitl16_imagenet1k_short": vitl16_imagenet1k_short,
    "vitg14_lvd142m": vitg14_lvd142m,
    "vitl14_lvd142m": vitl14_lvd142m,
    "vitb14_lvd142m": vitb14_lvd142m,
    "vits14_lvd142m": vits14_lvd142m,
    "highres": highres,
    "cpu_small": cpu_small,
    "quickstart": quickstart,
    "test_tiny": test_tiny,
}


def get_recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]()
