"""Process-group set-up under torchrun, and the two parallel wrappings (DDP, FSDP2) applied from outside.

The model code stays single-device; ``parallelize`` wraps it. Nothing here is cluster-specific: torchrun (or
SLURM's srun launching torchrun) provides RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but no CUDA device is available; use run.device=cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(requested_device: str = "auto") -> DistEnv:
    """Join the torchrun job if there is one (NCCL on GPUs, gloo on CPU); a plain process is rank 0 of 1."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    # under torchrun (which sets WORLD_SIZE) join the job even with one process, so FSDP can be used there too
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        store = _attempt_store(world_size, timeout)
        if store is None:
            dist.init_process_group(backend=backend, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _attempt_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun with ``--max-restarts``, the agent's key-value store outlives a failed attempt. Workers of
    the next attempt would read the previous attempt's (dead) peer addresses from it and fail to connect, so
    each attempt gets its own key prefix. ``None`` outside torchrun's agent store (the default env:// set-up)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"dinolab/attempt_{attempt}", client)


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over processes (identity in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value
