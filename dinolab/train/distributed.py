"""Training's view of the job: where this process stands (:class:`~dinolab.runtime.DistEnv`, set up by
:func:`dinolab.runtime.init_distributed`) and the mean of a value over processes.

The parallel wrappings (DDP, FSDP2) are applied from outside the model, in :mod:`dinolab.train.parallel`. Nothing
here is cluster-specific: torchrun (or SLURM's srun launching torchrun) provides RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dinolab import runtime
from dinolab.config import ConfigError
from dinolab.runtime import DistEnv

__all__ = ["DistEnv", "all_reduce_mean", "init_distributed"]


def init_distributed(requested_device: str = "auto") -> DistEnv:
    """:func:`dinolab.runtime.init_distributed` for ``run.device``: a device that is not there is a config error."""
    try:
        return runtime.init_distributed(requested_device, option="run.device=")
    except ValueError as error:
        raise ConfigError(str(error)) from None


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean over processes (identity in one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value
