"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): sharded, atomic, resumable anywhere.

Layout of a run directory::

    RUN/checkpoints/step_00001000/   one checkpoint: DCP shards + .metadata + meta.json
    RUN/checkpoints/.tmp_step_…/     being written; renamed to step_… only when complete

A checkpoint holds the whole training state (student, teacher, heads, centering buffers, optimizer, grad scaler,
iteration). Data order and randomness are functions of (seed, iteration), so nothing else is needed to resume
exactly. DCP reshards on load, so a checkpoint written by N processes resumes on M.

Nothing in a checkpoint runs code when read: DCP pickles its ``.metadata`` and the non-tensor values (optimizer
hyper-parameters), so :func:`load_checkpoint` first unpickles ``.metadata`` with an unpickler that accepts only the
classes DCP metadata is made of (:func:`check_metadata`), and reads the values with ``torch.load(weights_only=True)``
(:class:`SafeLoadPlanner`). ``meta.json`` is JSON.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from dinolab.runtime import atomic_write, atomic_write_text, disk_full_error, inner_errors, is_disk_full

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
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp))
        _barrier()
        if _is_main():
            world = dist.get_world_size() if dist.is_initialized() else 1
            atomic_write_text(tmp / "meta.json", json.dumps({**meta, "step": step, "world_size": world}, indent=2))
    except BaseException as error:  # DCP raises CheckpointException, a BaseException
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(error, root):
            previous = latest_checkpoint(run_dir)
            kept = f"the previous checkpoint {previous} is kept" if previous else "no earlier checkpoint exists"
            raise disk_full_error(f"checkpoint {final.name}", root, kept) from error
        raise _first_cause(error) from None
    if _is_main():
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic on POSIX: a checkpoint is either complete or absent
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_meta(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / "meta.json").read_text())


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint file holds something other than what dinolab writes (e.g. a pickle that would run code)."""


# What DCP's .metadata is made of (torch 2.4 .. 2.14): its own dataclasses, torch dtypes / layouts / sizes, paths.
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata",)
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    *(("pathlib", name) for name in ("Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if module in _METADATA_MODULES:
            found = getattr(__import__(module, fromlist=[name]), name, None)
            if isinstance(found, type) and found.__module__ == module:  # a class of DCP's metadata, nothing else
                return found
        elif (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), torch.dtype | torch.layout):
            return getattr(torch, name)
        raise UnsafeCheckpointError(f"{module}.{name}")


def check_metadata(checkpoint: str | Path) -> None:
    """Unpickle ``checkpoint/.metadata`` allowing only DCP's metadata classes; raise :class:`UnsafeCheckpointError`
    naming the file when anything else (a function, a class that could run code) is referenced."""
    path = Path(checkpoint) / ".metadata"
    try:
        _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except UnsafeCheckpointError as error:
        raise UnsafeCheckpointError(
            f"{path} refers to {error}, which a checkpoint's metadata never holds; it was not loaded (it could run "
            "code). Use a checkpoint you wrote yourself, or delete this one"
        ) from None
    except Exception as error:
        raise UnsafeCheckpointError(f"{path} is not a readable checkpoint index ({error}); it was not loaded") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, reading the non-tensor values (optimizer hyper-parameters) without running code."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            torch.load(value, weights_only=True)
        except pickle.UnpicklingError as error:
            lines = [line.strip() for line in str(error).splitlines() if "Unsupported global" in line]
            reason = lines[0] if lines else "not a weights-only pickle"
            raise UnsafeCheckpointError(
                f"checkpoint value {read_item.dest_index.fqn!r} is not plain data ({reason}); it was not loaded "
                "(it could run code). Use a checkpoint you wrote yourself"
            ) from None
        # it unpickles with the weights-only allowlist, so DCP's own unpickling of it references nothing else
        value.seek(0)
        super().load_bytes(read_item, value)


def load_checkpoint(checkpoint: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load a checkpoint written by any number of processes into ``model`` (and ``optimizer``); returns its meta.

    The checkpoint is checked first: nothing in it can run code (see the module docstring)."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / ".metadata").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete dinolab checkpoint (no .metadata)")
    check_metadata(checkpoint)
    try:
        _load(checkpoint, model, optimizer)
    except BaseException as error:  # DCP wraps what a rank raised in a CheckpointException (a BaseException)
        refused = [e for e in inner_errors(error) if isinstance(e, UnsafeCheckpointError)]
        raise (refused[0] if refused else _first_cause(error)) from None
    return read_meta(checkpoint)


def _first_cause(error: BaseException) -> BaseException:
    """What a rank raised inside DCP (its ``CheckpointException`` is a ``BaseException`` that would escape
    ``except Exception``), or ``error`` itself."""
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        return first[0] if isinstance(first, tuple) else first
    return error


def _load(checkpoint: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(checkpoint), planner=SafeLoadPlanner())
        set_model_state_dict(model, state["model"])
    else:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(checkpoint), planner=SafeLoadPlanner())
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


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
    state = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    return atomic_write(path, lambda handle: torch.save(state, handle))


def load_module_tensors(checkpoint: str | Path, module: nn.Module, prefix: str) -> None:
    """Read one sub-module's tensors (``model.<prefix>…`` of the checkpoint) in place into ``module``, e.g. a
    run's teacher backbone (``prefix="teacher.backbone."``) without building the whole training model."""
    check_metadata(checkpoint)
    state = {f"{prefix}{name}": tensor for name, tensor in module.state_dict().items()}
    dcp.load({"model": state}, checkpoint_id=str(checkpoint), planner=SafeLoadPlanner())
