"""Typed configuration of a pretraining run: one dataclass per concern, each field documented and validated.

A config is built by a recipe (``dinolab.train.recipes``), changed by ``key.sub=value`` overrides, validated at
start-up (unknown keys and bad values fail with a message naming the key), and saved with the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dinolab.config import check as _check
from dinolab.config import from_dict, read_config_file, to_dict
from dinolab.data.augmentation import AugmentationConfig
from dinolab.matmul import CPU_MATMUL_BACKENDS
from dinolab.models.vit import ARCHS


@dataclass(kw_only=True)
class ModelConfig:
    """The student/teacher backbone."""

    arch: str = "vit_small"
    """Backbone variant: vit_tiny, vit_small, vit_base, vit_large or vit_giant2."""
    patch_size: int = 14
    """Patch size in pixels (14 for the released models, 16 for the ImageNet-1k ViT-L/16 run)."""
    depth: int = 0
    """Number of blocks; 0 = the variant's (12/12/24/40). Smaller values are for tests and experiments."""
    num_register_tokens: int = 0
    """Register tokens (0 or 4 in the released models)."""
    ffn_layer: str = ""
    """Feed-forward of the blocks: 'mlp', 'swiglu' (SwiGLU with the released models' hidden width, 2/3 of the
    MLP's rounded up to a multiple of 8), or '' for the variant's own (SwiGLU for vit_giant2, MLP otherwise)."""
    weight_init: str = "trunc_normal"
    """Initialisation of the linear layers: 'trunc_normal' (std 0.02, the official code and timm) or
    'xavier_uniform' (better-conditioned for small models trained briefly; see docs/training.md)."""
    img_size: int = 0
    """Size the position embedding is stored for; 0 = the global crop size (518 when continuing from released
    weights, which store 518)."""
    drop_path_rate: float = 0.3
    """Stochastic depth rate, uniform over blocks (student only)."""
    layerscale_init: float = 1e-5
    """Initial LayerScale gamma."""
    efficient_drop_path: bool = True
    """Compute residual branches only for kept samples (DINOv2) instead of computing and zeroing."""
    packed_sequences: bool = True
    """Run global and local crops through the student in one packed pass (else one pass per crop size)."""
    init_from: str = ""
    """Continue pretraining: a released backbone name (dinov2_vits14 …) or a checkpoint file; '' = random."""

    def __post_init__(self) -> None:
        _check(self.arch in ARCHS, f"model.arch must be one of {sorted(ARCHS)}, got {self.arch!r}")
        _check(self.patch_size > 0, f"model.patch_size must be positive, got {self.patch_size}")
        _check(self.num_register_tokens >= 0, "model.num_register_tokens must be >= 0")
        _check(0.0 <= self.drop_path_rate < 1.0, f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        _check(self.img_size >= 0, "model.img_size must be >= 0 (0 = global crop size)")
        _check(self.depth >= 0, "model.depth must be >= 0 (0 = the variant's depth)")
        _check(
            self.ffn_layer in ("", "mlp", "swiglu"),
            f"model.ffn_layer must be '', mlp or swiglu, got {self.ffn_layer!r}",
        )
        _check(
            self.weight_init in ("trunc_normal", "xavier_uniform"),
            f"model.weight_init must be trunc_normal or xavier_uniform, got {self.weight_init!r}",
        )


@dataclass(kw_only=True)
class HeadsConfig:
    """DINO (image-level) and iBOT (patch-level) projection heads."""

    dino_prototypes: int = 65536
    """K, the number of prototypes of the DINO head (131072 for the large runs)."""
    dino_hidden_dim: int = 2048
    dino_bottleneck_dim: int = 256
    dino_nlayers: int = 3
    ibot_separate_head: bool = False
    """Use a separate iBOT head (the large runs) instead of sharing the DINO head."""
    ibot_prototypes: int = 65536
    ibot_hidden_dim: int = 2048
    ibot_bottleneck_dim: int = 256
    ibot_nlayers: int = 3

    def __post_init__(self) -> None:
        for name in ("dino_prototypes", "dino_hidden_dim", "dino_bottleneck_dim", "ibot_prototypes"):
            _check(getattr(self, name) > 0, f"heads.{name} must be positive, got {getattr(self, name)}")
        _check(self.dino_nlayers >= 1 and self.ibot_nlayers >= 1, "heads.*_nlayers must be >= 1")


@dataclass(kw_only=True)
class LossConfig:
    """Loss weights, temperatures and the teacher-target method."""

    dino_weight: float = 1.0
    """Weight of the DINO cross-entropy (0 switches it off)."""
    ibot_weight: float = 1.0
    """Weight of the iBOT masked-patch loss (0 switches it off, and masking with it)."""
    koleo_weight: float = 0.1
    """Weight of the KoLeo regulariser on the student's CLS tokens (0 switches it off)."""
    centering: str = "sinkhorn_knopp"
    """Teacher targets: 'sinkhorn_knopp' (3 iterations) or 'ema' (softmax of EMA-centered logits)."""
    center_momentum: float = 0.9
    """EMA momentum of the center (centering='ema')."""
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    """Teacher temperature after the warm-up."""
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    """Epochs of linear teacher-temperature warm-up."""
    chunked_cross_entropy: bool = True
    """Compute the student's prototype logits and cross-entropies chunk by chunk, recomputed in backward, instead
    of holding the ``[rows, K]`` logits (same losses; much less memory at K = 65536, one extra matmul)."""

    def __post_init__(self) -> None:
        _check(
            self.centering in ("sinkhorn_knopp", "ema"),
            f"loss.centering must be 'sinkhorn_knopp' or 'ema', got {self.centering!r}",
        )
        for name in ("dino_weight", "ibot_weight", "koleo_weight"):
            _check(getattr(self, name) >= 0, f"loss.{name} must be >= 0, got {getattr(self, name)}")
        _check(
            self.dino_weight > 0 or self.ibot_weight > 0, "loss: at least one of dino_weight, ibot_weight must be > 0"
        )
        for name in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            _check(getattr(self, name) > 0, f"loss.{name} must be > 0, got {getattr(self, name)}")
        _check(0.0 <= self.center_momentum < 1.0, "loss.center_momentum must be in [0, 1)")


@dataclass(kw_only=True)
class MaskingConfig:
    """iBOT masking of the global crops' patch tokens."""

    sample_probability: float = 0.5
    """Fraction of the global-crop images in a batch that get a mask."""
    ratio_min_max: tuple[float, float] = (0.1, 0.5)
    """Range of the per-image mask ratio, stratified across the masked images."""
    min_num_patches: int = 4
    """Smallest block of a BEiT-style block mask."""

    def __post_init__(self) -> None:
        lo, hi = self.ratio_min_max
        _check(
            0.0 <= lo <= hi < 1.0, f"masking.ratio_min_max must satisfy 0 <= min <= max < 1, got {self.ratio_min_max}"
        )
        _check(0.0 <= self.sample_probability <= 1.0, "masking.sample_probability must be in [0, 1]")
        _check(self.min_num_patches >= 1, "masking.min_num_patches must be >= 1")


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW, schedules (in epochs of ``iters_per_epoch`` iterations) and batch sizes."""

    batch_size_per_process: int = 64
    """Images per micro-batch per process."""
    accumulation_steps: int = 1
    """Micro-batches per optimizer step (effective batch = this x batch_size_per_process x processes)."""
    epochs: float = 100
    iters_per_epoch: int = 1250
    """An 'epoch' is a fixed number of iterations (1250 in the official code), not a pass over the data."""
    base_lr: float = 0.004
    lr_scaling: str = "sqrt"
    """How the lr scales with the global batch: 'sqrt' (base_lr * sqrt(B/1024)), 'linear' (B/1024) or 'none'."""
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    clip_grad: float = 3.0
    """Gradient-norm clipping (0 = off)."""
    clip_grad_mode: str = "per_module"
    """'per_module' clips the backbone and each head to ``clip_grad`` separately, as the official trainer does;
    'global' clips one norm over all student parameters (a large head gradient then also shrinks the backbone's
    update)."""
    layer_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    freeze_last_layer_epochs: float = 1
    """Epochs during which the heads' prototype layers are not updated."""
    freeze_backbone_iters: int = 0
    """Continued pretraining: iterations during which only the fresh heads train (backbone frozen)."""
    adamw_betas: tuple[float, float] = (0.9, 0.999)

    def __post_init__(self) -> None:
        _check(self.batch_size_per_process >= 2, "optim.batch_size_per_process must be >= 2 (KoLeo needs neighbours)")
        _check(self.accumulation_steps >= 1, "optim.accumulation_steps must be >= 1")
        _check(self.epochs > 0 and self.iters_per_epoch > 0, "optim.epochs and optim.iters_per_epoch must be > 0")
        _check(
            self.lr_scaling in ("sqrt", "linear", "none"),
            f"optim.lr_scaling must be sqrt/linear/none, got {self.lr_scaling!r}",
        )
        _check(self.base_lr > 0 and self.min_lr >= 0, "optim.base_lr must be > 0 and optim.min_lr >= 0")
        _check(0 <= self.warmup_epochs <= self.epochs, "optim.warmup_epochs must be in [0, epochs]")
        _check(0 < self.layer_decay <= 1, f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")
        _check(
            0 <= self.momentum_teacher <= self.final_momentum_teacher <= 1,
            "optim: need 0 <= momentum_teacher <= final_momentum_teacher <= 1",
        )
        _check(self.clip_grad >= 0, "optim.clip_grad must be >= 0")
        _check(
            self.clip_grad_mode in ("per_module", "global"),
            f"optim.clip_grad_mode must be per_module or global, got {self.clip_grad_mode!r}",
        )
        _check(self.freeze_backbone_iters >= 0, "optim.freeze_backbone_iters must be >= 0")

    @property
    def total_iters(self) -> int:
        return round(self.epochs * self.iters_per_epoch)


@dataclass(kw_only=True)
class RunConfig:
    """Where the data comes from, where the run goes, and how it executes."""

    data: list[str] = field(default_factory=list)
    """Image folders, ImageFolder trees or .txt path lists (labels are ignored); tar shards (``DIR``,
    ``shards/{000000..000099}.tar``, URLs) and Hugging Face datasets (``hf-disk:PATH``, ``hf://ID``): see
    docs/scale.md."""
    data_mode: str = "auto"
    """How shards are read: 'indexed' (random access, same order as the equivalent folder), 'stream' (shard by shard,
    the position saved in checkpoints) or 'auto' (indexed unless a source can only be streamed: URLs, hf://)."""
    output_dir: str = "runs/dinolab"
    seed: int = 0
    num_workers: int = 2
    """DataLoader worker processes per training process."""
    device: str = "auto"
    """'auto' (cuda when available), 'cpu' or 'cuda'."""
    dtype: str = "fp32"
    """Compute precision: 'fp32', 'bf16' (autocast) or 'fp16' (autocast + gradient scaler)."""
    parallel: str = "auto"
    """Multi-process mode under torchrun: 'ddp', 'fsdp' (FSDP2) or 'auto' (ddp); ignored in one process."""
    log_every: int = 10
    checkpoint_every: int = 500
    """Iterations between checkpoints (one is always written at the end)."""
    keep_checkpoints: int = 3
    """How many recent checkpoints to keep."""
    tensorboard: bool = True
    compile: bool = False
    """torch.compile each transformer block."""
    cpu_matmul: str = "auto"
    """CPU linear layers in fp32: 'blas' (torch's own path, MKL), 'onednn', or 'auto': time both on the model's
    layer shapes at start-up (2.2 s for a ViT-S/14 at batch 8) and keep the faster (dinolab.matmul; oneDNN ran the
    ViT-S/14 step about 1.1x faster on the 2-core AMD CPU). Ignored on GPUs."""
    activation_checkpointing: str = "auto"
    """Which activations of the student's blocks are recomputed in backward instead of kept: 'none' (in fp32 on
    CPUs the block's branches then run as dinolab.models.fused's functions, which keep ~40 % less than autograd
    through the modules and recompute only the layer norms and the GELU), 'selective' (keep the matmul and
    attention outputs, recompute the cheap rest: ~45 % less activation memory than plain autograd, no extra
    matmuls), 'full' (keep only each block's input: least memory, ~1/3 more student compute) or 'auto': from the
    step's estimated activations, on CPUs none in fp32 unless the activations would pass half of the machine's
    memory (then full), in bf16 selective above 512 MB (else none); on GPUs none when they fit in half of the free
    memory, else selective when it fits, else full (dinolab.train.parallel.choose_activation_checkpointing).
    true/false mean full/none."""
    progress: bool = True
    health_warnings: bool = True
    """Warn when the teacher's targets go uniform or collapse (the health statistics are logged regardless)."""
    stop_after_iters: int = 0
    """Stop (with a checkpoint) after this many iterations of this invocation; 0 = run to the end. For jobs
    cut into time slices, and for tests of resuming."""

    def __post_init__(self) -> None:
        _check(self.dtype in ("fp32", "bf16", "fp16"), f"run.dtype must be fp32, bf16 or fp16, got {self.dtype!r}")
        _check(self.device in ("auto", "cpu", "cuda"), f"run.device must be auto, cpu or cuda, got {self.device!r}")
        _check(
            self.parallel in ("auto", "ddp", "fsdp"), f"run.parallel must be auto, ddp or fsdp, got {self.parallel!r}"
        )
        _check(self.num_workers >= 0, "run.num_workers must be >= 0")
        legacy = {"true": "full", "1": "full", "yes": "full", "false": "none", "0": "none", "no": "none"}
        mode = legacy.get(str(self.activation_checkpointing).strip().lower(), self.activation_checkpointing)
        self.activation_checkpointing = mode
        _check(
            mode in ("auto", "none", "selective", "full"),
            f"run.activation_checkpointing must be auto, none, selective or full, got {mode!r}",
        )
        _check(
            self.cpu_matmul in CPU_MATMUL_BACKENDS,
            f"run.cpu_matmul must be one of {', '.join(CPU_MATMUL_BACKENDS)}, got {self.cpu_matmul!r}",
        )
        _check(
            self.data_mode in ("auto", "indexed", "stream"),
            f"run.data_mode must be auto, indexed or stream, got {self.data_mode!r}",
        )
        _check(
            self.log_every >= 1 and self.checkpoint_every >= 1, "run.log_every and run.checkpoint_every must be >= 1"
        )
        _check(self.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")
        _check(self.stop_after_iters >= 0, "run.stop_after_iters must be >= 0")


@dataclass(kw_only=True)
class DistillConfig:
    """Distillation from a frozen teacher (``dinolab distill``); an empty ``teacher`` is plain pretraining."""

    teacher: str = ""
    """The frozen teacher: a dinolab run directory or checkpoint folder (its teacher backbone and heads are used),
    or only a backbone (a released name such as dinov2_vitl14, or any checkpoint file dinolab.hub reads), whose
    heads are then trained first by a heads-only warm-up (``heads_warmup_iters``) in RUN/teacher_heads."""
    teacher_weights: str = ""
    """With a released name as ``teacher``: a local file or URL of its weights ('' = the official download)."""
    heads_warmup_iters: int = 1000
    """Iterations of the heads-only warm-up of a backbone-only teacher (the backbone frozen, as in continued
    pretraining with optim.freeze_backbone_iters)."""

    def __post_init__(self) -> None:
        _check(self.heads_warmup_iters >= 1, "distill.heads_warmup_iters must be >= 1")
        _check(not self.teacher_weights or self.teacher, "distill.teacher_weights needs distill.teacher")

    @property
    def enabled(self) -> bool:
        return bool(self.teacher)


@dataclass(kw_only=True)
class TrainConfig:
    """A whole pretraining (or distillation) run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    crops: AugmentationConfig = field(default_factory=AugmentationConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def __post_init__(self) -> None:
        p = self.model.patch_size
        for name in ("global_size", "local_size"):
            size = getattr(self.crops, name)
            _check(size % p == 0, f"crops.{name}={size} must be a multiple of model.patch_size={p}")
        if self.distill.enabled:
            # the method, not a default: say so instead of silently training something else
            _check(
                self.model.drop_path_rate == 0.0,
                "distillation trains the student without stochastic depth: set model.drop_path_rate=0",
            )
            _check(
                self.masking.sample_probability == 0.0,
                "distillation shows the student unmasked crops: set masking.sample_probability=0",
            )
            _check(self.optim.freeze_backbone_iters == 0, "distillation does not freeze the student's backbone")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """A saved config (``config.json`` of a run) or a hand-written one, JSON or TOML."""
        return from_dict(cls, read_config_file(path))
