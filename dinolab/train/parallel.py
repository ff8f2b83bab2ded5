"""Apply parallelism and compilation to the single-device meta-architecture, from outside.

Order (as in torchtitan): activation checkpointing -> torch.compile per block -> sharding (FSDP2 ``fully_shard``
per transformer block, then each backbone and head, then the root) or DDP.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

from dinolab.matmul import choose_cpu_matmul, set_cpu_matmul
from dinolab.runtime import world_size
from dinolab.train.config import RunConfig, TrainConfig
from dinolab.train.distributed import DistEnv
from dinolab.train.meta_arch import SSLMetaArch


def _backbones(model: SSLMetaArch) -> list[nn.Module]:
    """Every backbone that runs forward passes (the student's EMA in distillation only averages weights)."""
    return [model.student["backbone"], model.teacher["backbone"]]


ACTIVATIONS_PER_TOKEN = {"none": 16, "fused": 10, "selective": 9}
"""Activation elements a student block keeps for backward per token, in units of its width: autograd through the
modules, dinolab.models.fused's branches (CPU fp32 without selective checkpointing), selective checkpointing
(measured with the profiler's allocation count, output included: ~17, ~10 and ~9 in tests/models/test_fused.py;
1 with full checkpointing)."""


CPU_SELECTIVE_ABOVE = 2**29
"""On CPUs in bf16, checkpoint selectively once the student's activations would exceed 512 MB (below that the
memory is small and the recomputation's per-operator bookkeeping is not worth it)."""


def choose_activation_checkpointing(config: TrainConfig, model: SSLMetaArch, device: torch.device) -> str:
    """``run.activation_checkpointing``, with 'auto' resolved for this run on ``device``.

    From the student's estimated activations (:data:`ACTIVATIONS_PER_TOKEN` x tokens per step x width x depth).
    CPUs in fp32: 'none', whose fused branches keep about as little as selective checkpointing without its
    per-operator bookkeeping (~4 % faster for ~5 % more peak memory on a ViT-S/14 step; docs/efficiency.md), unless the
    activations would pass half of the machine's memory: then 'full'. CPUs in bf16 (plain autograd):
    'selective' above :data:`CPU_SELECTIVE_ABOVE`, else 'none'. GPUs: 'none' when the activations fit in half of
    the free memory left after AdamW's moments, else 'selective' when they fit then, else 'full'.
    """
    mode = config.run.activation_checkpointing
    if mode != "auto":
        return mode
    backbone = model.student["backbone"]
    tokens = student_tokens_per_step(config, backbone.patch_size, backbone.num_register_tokens)
    element_bytes = 2 if config.run.dtype in ("bf16", "fp16") else 4

    def activation_bytes(candidate: str) -> int:
        per_block = tokens * backbone.embed_dim * ACTIVATIONS_PER_TOKEN[candidate] * element_bytes
        return per_block * len(backbone.blocks)

    if device.type != "cuda":
        if config.run.dtype == "fp32":
            return "none" if activation_bytes("fused") <= physical_memory_bytes() / 2 else "full"
        return "selective" if activation_bytes("none") > CPU_SELECTIVE_ABOVE else "none"
    free_bytes, _ = torch.cuda.mem_get_info(device)
    moments_bytes = 2 * 4 * sum(p.numel() for p in model.student.parameters())
    budget = free_bytes / 2 - moments_bytes
    for candidate in ("none", "selective"):
        if activation_bytes(candidate) <= budget:
            return candidate
    return "full"


def physical_memory_bytes() -> int:
    """This machine's memory (``os.sysconf``; where that is unknown, taken as unlimited)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**62


CPU_MATMUL_PROBE_TOKENS = 4096
"""Tokens per layer in the CPU linear probe (dinolab.matmul.choose_cpu_matmul), at most: enough for the matmuls to
run as in the step (~2 s in all for a ViT-S/14 on 2 cores), few enough that a ViT-g probe stays short."""


def choose_cpu_linear(config: TrainConfig, model: SSLMetaArch, device: torch.device) -> str:
    """``run.cpu_matmul`` resolved and selected for this process; on GPUs the setting is moot ('blas'). Under
    torchrun every rank takes rank 0's choice, so that the ranks of one run compute alike."""
    if device.type != "cpu" or config.run.dtype != "fp32":
        set_cpu_matmul("blas")
        return "blas"
    backbone = model.student["backbone"]
    block = backbone.blocks[0]
    layers = [m for m in block.modules() if isinstance(m, nn.Linear)]
    tokens = student_tokens_per_step(config, backbone.patch_size, backbone.num_register_tokens)
    tokens = min(tokens, CPU_MATMUL_PROBE_TOKENS)
    choice = [choose_cpu_matmul(config.run.cpu_matmul, [(tokens, m.in_features, m.out_features) for m in layers])]
    if world_size() > 1:
        dist.broadcast_object_list(choice, src=0)
        set_cpu_matmul(choice[0])
    return choice[0]


def student_tokens_per_step(config: TrainConfig, patch_size: int, registers: int) -> int:
    """Tokens the student processes per step and process: every global and local crop of the micro-batch."""
    crops = config.crops
    per_image = 2 * ((crops.global_size // patch_size) ** 2 + 1 + registers)
    per_image += crops.local_crops_number * ((crops.local_size // patch_size) ** 2 + 1 + registers)
    return config.optim.batch_size_per_process * per_image


def apply_activation_checkpointing(model: SSLMetaArch, mode: str) -> None:
    """Set the student blocks' activation checkpointing (``none``, ``selective`` or ``full``; see Block)."""
    for block in model.student["backbone"].blocks:
        block.activation_checkpointing = mode


def apply_compile(model: SSLMetaArch) -> None:
    """``torch.compile`` every block in place (state-dict keys unchanged)."""
    for backbone in _backbones(model):
        for block in backbone.blocks:
            block.compile_body(dynamic=True)


def apply_fsdp(model: SSLMetaArch, dtype: str) -> None:
    """FSDP2: shard each block, each backbone's remaining parameters and each head; teacher sharded like the
    student so the EMA update is local. In distillation the frozen teacher is sharded the same way (it holds no
    gradients), and the student's EMA like the student's backbone (its update stays local). Parameters stay fp32
    (sharded); compute in ``dtype``, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    param_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype, torch.float32)
    # one policy for blocks and heads: the paper reduces the heads' gradients in fp32, and fp32 reduction is
    # cheap enough at these sizes to use everywhere
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for net in (model.student, model.teacher):
        backbone = net["backbone"]
        for block in backbone.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(backbone, mp_policy=policy)
        # the training forward calls these methods, not forward(): FSDP must gather around them too
        register_fsdp_forward_method(backbone, "forward_features")
        register_fsdp_forward_method(backbone, "forward_features_list")
        for name, head in net.items():
            if name != "backbone":
                fully_shard(head, mp_policy=policy)
                register_fsdp_forward_method(head, "cross_entropy")
    if model.distillation:
        for block in model.student_ema.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model.student_ema, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def parallelize(model: SSLMetaArch, env: DistEnv, run: RunConfig, may_skip_parameters: bool = False) -> Callable:
    """Returns the callable the loop runs forward through (the model itself, or its DDP wrapper).

    ``run.activation_checkpointing`` must be resolved (not 'auto': see :func:`choose_activation_checkpointing`).
    ``may_skip_parameters``: some steps leave trainable parameters without gradient (a heads-only warm-up, a
    separate iBOT head on a process without masked patches); DDP must then look for them (a small cost).
    """
    if run.activation_checkpointing == "auto":
        raise ValueError("parallelize needs run.activation_checkpointing resolved; see choose_activation_checkpointing")
    apply_activation_checkpointing(model, run.activation_checkpointing)
    if run.compile:
        apply_compile(model)
    import torch.distributed as dist

    if not dist.is_initialized():
        return model
    mode = "ddp" if run.parallel == "auto" else run.parallel
    if mode == "fsdp":
        apply_fsdp(model, run.dtype)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model,
        device_ids=[env.local_rank] if env.device.type == "cuda" else None,
        broadcast_buffers=False,  # the centering buffers are all-reduced by the targets themselves
        find_unused_parameters=may_skip_parameters,
    )
