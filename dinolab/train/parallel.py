"""Apply parallelism and compilation to the single-device meta-architecture, from outside.

Order (as in torchtitan): activation checkpointing -> torch.compile per block -> sharding (FSDP2 ``fully_shard``
per transformer block, then each backbone and head, then the root) or DDP.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from dinolab.train.config import RunConfig
from dinolab.train.distributed import DistEnv
from dinolab.train.meta_arch import SSLMetaArch


def _backbones(model: SSLMetaArch) -> list[nn.Module]:
    """Every backbone that runs forward passes (the student's EMA in distillation only averages weights)."""
    return [model.student["backbone"], model.teacher["backbone"]]


def apply_activation_checkpointing(model: SSLMetaArch) -> None:
    """Recompute each student block's activations in backward (less memory, ~30% more compute)."""
    for block in model.student["backbone"].blocks:
        block.activation_checkpointing = True


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

    ``may_skip_parameters``: some steps leave trainable parameters without gradient (a heads-only warm-up, a
    separate iBOT head on a process without masked patches); DDP must then look for them (a small cost).
    """
    if run.activation_checkpointing:
        apply_activation_checkpointing(model)
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
