"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): sharded, atomic, resumable anywhere.

Layout of a run directory::

    RUN/checkpoints/step_00001000/   one checkpoint: DCP shards + .metadata + meta.json
    RUN/checkpoints/.tmp_step_…/     being written; renamed to step_… only when complete

A checkpoint holds the whole training state (student, teacher, heads, centering buffers, optimizer, grad scaler,
iteration). Data order and randomness are functions of (seed, iteration), so nothing else is needed to resume
exactly. DCP reshards on load, so a checkpoint written by N processes resumes on M.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

# DCP warns on every single-process save/load; one process is a supported, intended case here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

CHECKPOINT_DIR = "checkpoints"
PREFIX = "step_"


def _is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (half-written ``.tmp_*`` folders are ignored)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "meta.json").is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    checkpoints = list_checkpoints(run_dir)
    return checkpoints[-1] if checkpoints else None


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    keep: int = 3,
) -> Path:
    """Write the training state after ``step`` iterations; every process calls this (collective)."""
    root = Path(run_dir) / CHECKPOINT_DIR
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp_{PREFIX}{step:08d}"
    if _is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
    _barrier()
    if _is_main():
        world = dist.get_world_size() if dist.is_initialized() else 1
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "world_size": world}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic on POSIX: a checkpoint is either complete or absent
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / "meta.json").read_text())


def load_checkpoint(checkpoint: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load a checkpoint written by any number of processes into ``model`` (and ``optimizer``); returns its meta."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / ".metadata").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete dinolab checkpoint (no .metadata)")
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(checkpoint))
        set_model_state_dict(model, state["model"])
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(checkpoint))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return read_meta(checkpoint)


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of a (possibly FSDP-sharded) module, on CPU, on every process."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


def save_backbone(state_dict: dict[str, torch.Tensor], path: str | Path) -> Path:
    """Write a backbone in the released format (``.pth`` plain state dict, or ``.safetensors``), atomically."""
    from dinolab.hub.convert import save_safetensors

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        return save_safetensors(state_dict, path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp)
    tmp.replace(path)
    return path
