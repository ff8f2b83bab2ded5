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
    Reported in the official README: 81.6% k-NN / 82.9% linear top-1 on ImageNet-1k.
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
    head, 384-d bottleneck for the DINO head (the iBOT head keeps 256), Sinkhorn-Knopp, teacher momentum 0.994,
    weight decay 0.04 -> 0.2.
    """
    config = TrainConfig(
        model=ModelConfig(arch="vit_giant2", patch_size=14, drop_path_rate=0.4, ffn_layer="swiglu"),
        heads=HeadsConfig(
            dino_prototypes=131072,
            dino_bottleneck_dim=384,
            ibot_separate_head=True,
            ibot_prototypes=131072,
            ibot_bottleneck_dim=256,
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


def _smaller_lvd(arch: str, batch_per_process: int, drop_path: float, ffn_layer: str = "mlp") -> TrainConfig:
    return _replace(
        vitg14_lvd142m(),
        model=dict(arch=arch, drop_path_rate=drop_path, ffn_layer=ffn_layer),
        optim=dict(batch_size_per_process=batch_per_process),
        run=dict(parallel="ddp" if arch != "vit_large" else "fsdp", output_dir=f"runs/{arch}14_lvd142m"),
    )


def vitl14_lvd142m() -> TrainConfig:
    """``torchrun ... -m dinolab train --recipe vitl14_lvd142m --data LVD142M.txt``

    The official ViT-L/14 training config (``vitl14.yaml``): the ViT-g recipe with a ViT-L, SwiGLU feed-forward,
    batch 32 per GPU, drop-path 0.4. (The released ViT-L/14 was distilled from ViT-g and has an MLP feed-forward:
    ``distill_vitg14_to_vitl14`` trains that one.)"""
    return _smaller_lvd("vit_large", 32, 0.4, ffn_layer="swiglu")


def vitb14_lvd142m() -> TrainConfig:
    """``torchrun ... -m dinolab train --recipe vitb14_lvd142m --data LVD142M.txt``

    The ViT-g recipe for a ViT-B/14 trained from scratch (MLP feed-forward, as the released ViT-B)."""
    return _smaller_lvd("vit_base", 64, 0.1)


def vits14_lvd142m() -> TrainConfig:
    """``torchrun ... -m dinolab train --recipe vits14_lvd142m --data LVD142M.txt``

    The ViT-g recipe for a ViT-S/14 trained from scratch (MLP feed-forward, as the released ViT-S)."""
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


def small_data_gpu() -> TrainConfig:
    """``dinolab train --recipe small_data_gpu --data ~/my_20k_images --output runs/domain``

    A few thousand to a few hundred thousand images on one GPU: a ViT-S/16 (fewer tokens than /14 at 224 px) for
    50k iterations of batch 128 in bf16, with the settings that kept the quickstart's targets informative on small
    batches (docs/training.md, "Small datasets"): xavier-initialised blocks, EMA centering with a sharp teacher
    (0.04), a slow teacher (0.996), and 8192 prototypes rather than 65536 for 256 global crops a batch. The CPU runs
    also showed that stacking every "slower" change (Sinkhorn-Knopp, a low learning rate and a slow teacher) left
    the targets uniform: watch the target-health warnings. Not measured on a GPU yet.
    """
    config = TrainConfig(
        model=ModelConfig(arch="vit_small", patch_size=16, drop_path_rate=0.1, weight_init="xavier_uniform"),
        heads=HeadsConfig(dino_prototypes=8192, ibot_prototypes=8192),
        loss=LossConfig(centering="ema", teacher_temp=0.04, warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=5),
        optim=OptimConfig(
            batch_size_per_process=128,
            epochs=100,
            iters_per_epoch=500,
            base_lr=0.002,
            warmup_epochs=5,
            momentum_teacher=0.996,
            weight_decay_end=0.2,
        ),
        run=RunConfig(dtype="bf16", output_dir="runs/small_data_gpu", num_workers=8, checkpoint_every=2000),
        crops=AugmentationConfig(global_size=224, local_size=96),
    )
    return config


def cpu_small() -> TrainConfig:
    """``dinolab train --recipe cpu_small --data DIR``

    A ViT-Ti/14 for 2 CPU cores: 56 px crops, 1024 prototypes, 300 iterations of batch 32, with the settings that
    kept the quickstart's targets from going uniform (xavier-initialised blocks, EMA centering with a sharp
    teacher at 0.04, a slow teacher at 0.996, base lr 0.001); with the previous ones (std-0.02 init, Sinkhorn-Knopp
    at 0.04 -> 0.07, teacher 0.99, lr 0.002) the DINO targets of a 56 px run on the textures set sat at the
    uniform distribution (docs/training.md, "Small datasets")."""
    config = TrainConfig(
        model=ModelConfig(
            arch="vit_tiny", patch_size=14, drop_path_rate=0.1, layerscale_init=1.0, weight_init="xavier_uniform"
        ),
        heads=HeadsConfig(dino_prototypes=1024, dino_hidden_dim=512, dino_bottleneck_dim=128, ibot_prototypes=1024),
        loss=LossConfig(centering="ema", teacher_temp=0.04, warmup_teacher_temp=0.02, warmup_teacher_temp_epochs=1),
        optim=OptimConfig(
            batch_size_per_process=32,
            epochs=6,
            iters_per_epoch=50,
            base_lr=0.001,
            lr_scaling="none",
            warmup_epochs=1,
            momentum_teacher=0.996,
            layer_decay=1.0,
            freeze_last_layer_epochs=0.2,
        ),
        run=RunConfig(output_dir="runs/cpu_small", num_workers=2, log_every=10, checkpoint_every=100),
    )
    return _replace(config, crops=dict(global_size=56, local_size=28, local_crops_number=4))


def quickstart() -> TrainConfig:
    """``dinolab quickstart`` (or ``make quickstart``)

    What the quickstart pretrains on scikit-learn's digits in about 5 minutes on 2 CPU cores: a 4-block ViT-Ti with
    8 px patches on 32 px images, no horizontal flips (digits are not symmetric), a small blur kernel, few
    prototypes. Chosen on a validation split of the training digits (docs/training.md, "Small datasets"):
    xavier-initialised blocks (at std 0.02 the narrow ViT's targets go uniform), a slow teacher (0.996), EMA
    centering with a sharp teacher, and 900 iterations (as many as fit: iterations helped most)."""
    config = _replace(
        cpu_small(),
        model=dict(patch_size=8, depth=4, drop_path_rate=0.1),
        heads=dict(dino_prototypes=64, ibot_prototypes=64),
        # a short run on a small batch: EMA centering and a sharp teacher from the start, and constant weight
        # decay learn faster here than the long-run settings
        loss=dict(centering="ema", teacher_temp=0.04, warmup_teacher_temp=0.02),
        optim=dict(epochs=18, iters_per_epoch=50, base_lr=0.001, momentum_teacher=0.996, weight_decay_end=0.04),
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


def _distillation(config: TrainConfig, teacher: str, output_dir: str) -> TrainConfig:
    """The paper's changes for distillation: a frozen teacher, no masking and no stochastic depth in the student
    (the iBOT loss then covers every patch of both global crops; see dinolab.train.distill)."""
    return _replace(
        config,
        model=dict(drop_path_rate=0.0),
        masking=dict(sample_probability=0.0),
        distill=dict(teacher=teacher),
        run=dict(output_dir=output_dir),
    )


def _distill_from_vitg14(arch: str, batch_per_process: int) -> TrainConfig:
    student = _replace(
        vitg14_lvd142m(), model=dict(arch=arch, ffn_layer="mlp"), optim=dict(batch_size_per_process=batch_per_process)
    )
    return _distillation(student, "dinov2_vitg14", f"runs/distill_vitg14_to_{arch}14")


def distill_vitg14_to_vits14() -> TrainConfig:
    """``torchrun ... -m dinolab distill --recipe distill_vitg14_to_vits14 --data LVD142M.txt``

    How the released ViT-S/14 was made: the ViT-g/14 training loop (schedules, 131072 prototypes, Sinkhorn-Knopp,
    separate iBOT head) with the frozen released ViT-g/14 as teacher, no masking, no stochastic depth, iBOT on
    both global crops, and the student's EMA exported. With a released teacher (no heads) its heads are warmed
    up first (distill.heads_warmup_iters); a dinolab ViT-g run as --teacher brings its own."""
    return _distill_from_vitg14("vit_small", 64)


def distill_vitg14_to_vitb14() -> TrainConfig:
    """``torchrun ... -m dinolab distill --recipe distill_vitg14_to_vitb14 --data LVD142M.txt``

    The released ViT-B/14's recipe: ``distill_vitg14_to_vits14`` with a ViT-B student."""
    return _distill_from_vitg14("vit_base", 32)


def distill_vitg14_to_vitl14() -> TrainConfig:
    """``torchrun ... -m dinolab distill --recipe distill_vitg14_to_vitl14 --data LVD142M.txt``

    The released ViT-L/14's recipe: ``distill_vitg14_to_vits14`` with a ViT-L student (MLP feed-forward)."""
    return _distill_from_vitg14("vit_large", 32)


def distill_cpu_small() -> TrainConfig:
    """``dinolab distill --teacher RUN --student vit_tiny --data DIR --output runs/distilled``

    ``cpu_small`` as a distillation: a small student learns from any teacher in minutes on 2 CPU cores."""
    return _distillation(cpu_small(), "", "runs/distill_cpu_small")


def distill_quickstart() -> TrainConfig:
    """``dinolab distill --recipe distill_quickstart --teacher RUN --data DIGITS --output RUN2``

    The quickstart's student distilled from a teacher pretrained longer (benchmarks/ssl_quality.py measures it
    against the same student pretrained from scratch for the same iterations; docs/distillation.md measures both
    at ``optim.epochs=10``, 500 iterations, with the 900-iteration quickstart as the teacher)."""
    return _distillation(quickstart(), "", "runs/distill_quickstart")


def test_tiny() -> TrainConfig:
    """A seconds-long run for tests: 2-block ViT-Ti, 28 px crops, 64 prototypes, the official initialisation and
    Sinkhorn-Knopp targets (deterministic: tests compare runs and recompute targets)."""
    config = _replace(
        cpu_small(),
        model=dict(drop_path_rate=0.1, depth=2, layerscale_init=1e-5, weight_init="trunc_normal"),
        heads=dict(dino_prototypes=64, dino_hidden_dim=32, dino_bottleneck_dim=16, ibot_prototypes=64),
        loss=dict(centering="sinkhorn_knopp", teacher_temp=0.07, warmup_teacher_temp=0.04),
        optim=dict(
            batch_size_per_process=4,
            epochs=2,
            iters_per_epoch=3,
            warmup_epochs=1,
            freeze_last_layer_epochs=0.5,
            base_lr=0.002,
            momentum_teacher=0.99,
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
    "small_data_gpu": small_data_gpu,
    "cpu_small": cpu_small,
    "distill_vitg14_to_vits14": distill_vitg14_to_vits14,
    "distill_vitg14_to_vitb14": distill_vitg14_to_vitb14,
    "distill_vitg14_to_vitl14": distill_vitg14_to_vitl14,
    "distill_cpu_small": distill_cpu_small,
    "distill_quickstart": distill_quickstart,
    "quickstart": quickstart,
    "test_tiny": test_tiny,
}


def get_recipe(name: str) -> TrainConfig:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return RECIPES[name]()
