"""What keeps every command from leaving a silently wrong, half-written or lost result.

- :func:`atomic_write_bytes` / :func:`atomic_write_text`: a file is replaced whole or not at all.
- :class:`OutputDir`: a folder of outputs is written as a set (a temporary sibling folder renamed into place),
  after checking, before any work, that the destination can be written and holds nothing dinolab did not write.
- :class:`RunLock`: one writer per run directory (an advisory ``flock`` that the kernel releases when the holder
  dies, even by SIGKILL).
- :class:`StopRequest`: SIGTERM / SIGINT ask a loop to finish its current step, save, and return.
- :func:`is_disk_full` / :class:`DiskFullError`: a full disk is named as such, whatever layer noticed it.

And what every command needs to run at all, written once: compute precision (:data:`DTYPES`,
:func:`autocast_context`), the device (:func:`resolve_device`), the process group under torchrun
(:func:`init_distributed`, :func:`join_process_group`, :func:`world`), JSON values (:func:`to_jsonable`,
:func:`json_default`), the CPU allocator setting for training (:func:`reuse_freed_memory`) and the profiler's labels for the phases of a step (:func:`phase`).

See docs/guarantees.md for what the commands guarantee on top of these.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import math
import os
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any

import torch
import torch.distributed as dist

log = logging.getLogger("dinolab")

_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT} | ({errno.EFBIG} if hasattr(errno, "EFBIG") else set())
# what torch's zip writer and DCP say when a write came up short, having lost the errno on the way
_SHORT_WRITE_MESSAGES = ("unexpected pos", "file write failed", "No space left on device")


class DiskFullError(OSError):
    """A write failed because the disk (or the quota) is full; the previous state was kept."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return str(self.args[1])


def is_disk_full(error: BaseException, directory: str | os.PathLike | None = None) -> bool:
    """Whether ``error`` (or an error it was raised from) is a full disk / exhausted quota.

    torch's writers report a full disk as ``unexpected pos 704 vs 598``: that message counts as a full disk when
    ``directory`` has less than 64 MiB free.
    """
    for current in inner_errors(error):
        if isinstance(current, OSError) and current.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(current) for text in _SHORT_WRITE_MESSAGES):
            return "No space left" in str(current) or _free_bytes(directory) < 64 * 2**20
    return False


def inner_errors(error: BaseException) -> list[BaseException]:
    """``error``, the errors it was raised from, and those torch.distributed.checkpoint collected from its ranks
    (``CheckpointException.failures``), depth first."""
    found: list[BaseException] = []
    pending = [error]
    while pending:
        current = pending.pop(0)
        if current is None or any(current is seen for seen in found):
            continue
        found.append(current)
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):  # rank -> exception, or (exception, stack)
            pending.extend(f[0] if isinstance(f, tuple) else f for f in failures.values())
        pending.extend([current.__cause__, current.__context__])
    return [e for e in found if isinstance(e, BaseException)]


def _free_bytes(directory: str | os.PathLike | None) -> int:
    if directory is None:
        return 2**62
    path = Path(directory)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 2**62


def disk_full_error(what: str, directory: str | os.PathLike, kept: str) -> DiskFullError:
    """The one-line message of a full disk: what failed, where, what was kept, and what to do."""
    free = _free_bytes(directory) / 2**20
    return DiskFullError(
        f"the disk is full: writing {what} failed ({free:,.0f} MiB free on {directory}); {kept}; "
        "temporary files were removed. Free some space (or choose another location) and rerun"
    )


# ------------------------------------------------------------------------------------------------ atomic files
def _temporary_sibling(path: Path, kind: str) -> Path:
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{threading.get_ident() % 100_000}")


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(handle)`` on a temporary file beside ``path``, fsync, then rename it over ``path``.

    Readers see the old file or the new one, never a part; on any failure the temporary file is removed and the old
    file is untouched (a full disk raises :class:`DiskFullError`).
    """
    path = Path(path)
    tmp = _temporary_sibling(path, "tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, Exception) and is_disk_full(error, path.parent):
            kept = f"{path} is unchanged" if path.exists() else f"{path} was not created"
            raise disk_full_error(str(path), path.parent, kept) from error
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


# ---------------------------------------------------------------------------------------------- output folders
class OutputDir:
    """A folder of outputs written as one set: files go to a temporary sibling folder, renamed into place at the end.

    ``OutputDir(target, owned=is_ours)`` checks at once (before any work) that ``target`` is not a file, that its
    parent can be written, and that an existing ``target`` holds only files ``owned(name)`` accepts (an earlier
    output of the same command): other files would be deleted by the replacement, so they are refused instead.
    Use as a context manager; the temporary folder is ``.path``. On success the old folder is replaced whole; on
    failure (including a full disk) the temporary folder is removed and the old folder is untouched.
    """

    def __init__(self, target: str | os.PathLike, owned: Callable[[str], bool], what: str = "--output") -> None:
        self.target = Path(target).expanduser()
        self.what = what
        _remove_stale_siblings(self.target)
        self._check(owned)
        self.path = _temporary_sibling(self.target, "partial")
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.path.mkdir()
        except OSError as error:
            raise PermissionError(
                f"{what} {self.target}: cannot create files in {self.target.parent} ({error.strerror or error}); "
                "choose a folder you can write to"
            ) from error

    def _check(self, owned: Callable[[str], bool]) -> None:
        target = self.target
        if target.exists() and not target.is_dir():
            raise FileExistsError(f"{self.what} {target} is a file; give a folder (new or from an earlier run)")
        if target.is_dir():
            foreign = sorted(p.name for p in target.iterdir() if not owned(p.name))
            if foreign:
                shown = ", ".join(foreign[:5]) + (f" … ({len(foreign)} in all)" if len(foreign) > 5 else "")
                raise FileExistsError(
                    f"{self.what} {target} holds files this command did not write ({shown}); they would be "
                    "replaced with the folder: choose a new or empty folder, or move them away"
                )
            if not os.access(target, os.W_OK | os.X_OK) or not os.access(target.parent, os.W_OK | os.X_OK):
                raise PermissionError(f"{self.what} {target} cannot be replaced (read-only); choose another folder")

    def __enter__(self) -> OutputDir:
        return self

    def __exit__(self, kind: type | None, error: BaseException | None, _traceback: Any) -> None:
        if error is None:
            try:
                self.commit()
                return
            except BaseException:
                shutil.rmtree(self.path, ignore_errors=True)
                raise
        shutil.rmtree(self.path, ignore_errors=True)
        if isinstance(error, Exception) and is_disk_full(error, self.target.parent):
            kept = f"{self.target} is unchanged" if self.target.exists() else f"{self.target} was not created"
            raise disk_full_error(f"the outputs in {self.target}", self.target.parent, kept) from error

    def discard(self) -> None:
        """Remove the temporary folder (nothing to do once committed)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> None:
        """Rename the temporary folder into place (the old folder, if any, is moved aside first, then deleted)."""
        old = _temporary_sibling(self.target, "old")
        if self.target.exists():
            os.rename(self.target, old)
        try:
            os.rename(self.path, self.target)
        except BaseException:
            if old.exists():
                os.rename(old, self.target)
            raise
        shutil.rmtree(old, ignore_errors=True)


def _remove_stale_siblings(target: Path) -> None:
    """Temporary folders of ``target`` left by a process that was killed (its pid no longer runs)."""
    if not target.parent.is_dir():
        return
    for kind in ("partial", "old"):
        for leftover in target.parent.glob(f".{_glob_escape(target.name)}.{kind}-*"):
            pid = leftover.name.rsplit(f".{kind}-", 1)[1].split("-")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
                if kind == "old" and not target.exists():
                    os.rename(leftover, target)  # killed between the two renames of a commit: the old set is whole
                else:
                    shutil.rmtree(leftover, ignore_errors=True)


def _glob_escape(name: str) -> str:
    return "".join(f"[{ch}]" if ch in "*?[" else ch for ch in name)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------------------ locks
class RunLockedError(RuntimeError):
    """Another process holds the run directory."""


class RunLock:
    """An exclusive advisory lock on ``directory/.lock`` (``flock``: released by the kernel if the holder dies).

    The file records who holds it (pid, host, start time) for the message a second writer gets.
    """

    FILE = ".lock"

    def __init__(self, directory: str | os.PathLike, what: str = "run directory") -> None:
        self.directory = Path(directory)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # not POSIX: no advisory locks; say so once rather than pretend
            log.warning("no file locking on this platform: do not run two commands on %s at once", self.directory)
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / self.FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunLockedError(
                f"{self.what} {self.directory} is in use by another dinolab process ({holder}); wait for it to "
                "finish or stop it, or use another output directory"
            ) from None
        os.ftruncate(fd, 0)
        info = f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.write(fd, info.encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *_: object) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------------- signals
class StopRequest:
    """While active, SIGTERM and SIGINT set :attr:`signal_name` instead of killing the process.

    The loop polls :attr:`requested` after each step, saves and returns. A second signal of the same kind stops at
    once (``KeyboardInterrupt``), for a user who does not want to wait. Handlers can only be installed from the
    main thread; elsewhere this is inert (and signals behave as usual).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_name is not None:
            raise KeyboardInterrupt(f"second {name}: stopping at once")
        self.signal_name = name
        log.warning("%s received: finishing the current step, then saving and stopping (again to stop now)", name)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


# ------------------------------------------------------------------------------------------------- line files
def dedup_lines(path: str | os.PathLike, lines: Iterable[str]) -> list[str]:
    """The ``lines`` not yet in the text file ``path`` (appending them keeps the file free of repeats)."""
    path = Path(path)
    existing = set(path.read_text(errors="surrogateescape").splitlines()) if path.is_file() else set()
    fresh, seen = [], set()
    for line in lines:
        if line not in existing and line not in seen:
            fresh.append(line)
            seen.add(line)
    return fresh


# -------------------------------------------------------------------------------------------------- precision
# the compute precisions every command accepts (--dtype, run.dtype): autocast to the named type, or none for fp32
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_dtype(name: str, what: str = "dtype") -> str:
    """``name`` if it is one of :data:`DTYPES`, else a ``ValueError`` naming the choices."""
    if name not in DTYPES:
        raise ValueError(f"unknown {what} {name!r}: {what} must be one of {sorted(DTYPES)}")
    return name


def autocast_context(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 on ``device``, or nothing for fp32."""
    if check_dtype(dtype) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[dtype])


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory() -> bool:
    """Let large CPU tensors reuse memory the process freed instead of fresh pages from the kernel (glibc only).

    By default glibc serves every allocation above its mmap threshold (at most 32 MB) with a new ``mmap`` and
    gives it back on free, so a training step that allocates and frees the same large activations and logits each
    iteration page-faults all of them in again: ~20 % of a ViT-S/14 step on the 2-core CPU machine while another
    job shared it, nothing measurable when it was idle (benchmarks/train_step.py; docs/efficiency.md). Here large blocks come from the heap, and the heap keeps up to
    2 GB of freed memory at its top. The peak resident set is unchanged (measured); memory freed after the loop
    is reused by the process rather than returned to the system. Process-wide and irreversible; returns whether it
    applied (False on other C libraries)."""
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def phase(name: str) -> contextlib.AbstractContextManager:
    """A labelled span of a training step in the PyTorch profiler's trace (``phase:<name>``;
    benchmarks/profile_step.py groups a step's time by these). About a microsecond when no profiler runs."""
    return torch.profiler.record_function(f"phase:{name}")


# ---------------------------------------------------------------------------------------------------- devices
def default_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(
    requested: str | torch.device | None = None, local_rank: int | None = None, option: str = "--device "
) -> torch.device:
    """The device a command runs on.

    ``None`` or ``"auto"``: a GPU when there is one (under torchrun, this process's ``local_rank``-th one), else
    the CPU. ``"cuda"`` without a GPU is an error rather than a silent fall-back to the CPU. Anything else
    (``"cpu"``, ``"cuda:1"``, a ``torch.device``) is taken as given. With ``local_rank``, a CUDA device becomes
    the process's current one. ``option`` names the setting in the error (``"run.device="`` for training).
    """
    name = str(requested) if requested is not None else "auto"
    if name not in ("auto", "cuda"):
        return torch.device(requested)
    if not torch.cuda.is_available():
        if name == "cuda":
            raise ValueError(f"{option}cuda but no CUDA device is available here; use {option}cpu (or auto)")
        return torch.device("cpu")
    if local_rank is None:
        return torch.device("cuda")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


# ------------------------------------------------------------------------------------------------ processes
def world() -> tuple[int, int]:
    """(rank, world size) in the process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def world_size() -> int:
    """Processes in the process group (1 without one)."""
    return world()[1]


def is_main_process() -> bool:
    """Rank 0 (or a plain process): the one that writes shared files and prints summaries."""
    return world()[0] == 0


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job (from torchrun's RANK / WORLD_SIZE / LOCAL_RANK)."""

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


def launch_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun set them; (0, 1, 0) in a plain process."""
    return (
        int(os.environ.get("RANK", "0")),
        int(os.environ.get("WORLD_SIZE", "1")),
        int(os.environ.get("LOCAL_RANK", "0")),
    )


def join_process_group(backend: str, min_world_size: int = 1) -> bool:
    """Join torchrun's job once (nothing to do when already joined); ``True`` when this process is in a group.

    Only under torchrun (``WORLD_SIZE`` and ``MASTER_ADDR`` set) with at least ``min_world_size`` processes:
    training joins even with one process (so FSDP can run there too), curation only with several.
    """
    if dist.is_available() and dist.is_initialized():
        return True
    _, size, _ = launch_env()
    if "WORLD_SIZE" not in os.environ or "MASTER_ADDR" not in os.environ or size < min_world_size:
        return False
    timeout = datetime.timedelta(minutes=30)
    store = _attempt_store(size, timeout)
    if store is None:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        rank = launch_env()[0]
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=size, timeout=timeout)
    return True


def init_distributed(requested_device: str | None = "auto", option: str = "--device ") -> DistEnv:
    """Join the torchrun job if there is one (NCCL on GPUs, gloo on CPU); a plain process is rank 0 of 1."""
    rank, size, local_rank = launch_env()
    device = resolve_device(requested_device, local_rank, option)
    joined = join_process_group("nccl" if device.type == "cuda" else "gloo")
    if size > 1 and not joined:  # a DistEnv of several ranks without their group would train each rank alone
        raise ValueError(f"WORLD_SIZE={size} but MASTER_ADDR is not set: launch the processes with torchrun")
    return DistEnv(rank=rank, world_size=size, local_rank=local_rank, device=device)


def _attempt_store(size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under torchrun with ``--max-restarts``, the agent's key-value store outlives a failed attempt. Workers of
    the next attempt would read the previous attempt's (dead) peer addresses from it and fail to connect, so
    each attempt gets its own key prefix. ``None`` outside torchrun's agent store (the default env:// set-up)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"dinolab/attempt_{attempt}", client)


# ------------------------------------------------------------------------------------------------------- JSON
def to_jsonable(value: Any) -> Any:
    """Plain JSON values: dataclasses as dicts, tuples as lists, paths as strings, numpy values as Python ones,
    NaN/inf as None (JSON has no such numbers)."""
    if is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and type(value).__module__ == "numpy":
        return to_jsonable(value.tolist())
    return value


def json_default(value: Any) -> Any:
    """``json.dumps(..., default=json_default)``: paths, numpy values and dataclasses; anything else is an error
    (a value written as its ``repr`` could not be read back)."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist"):
        return value.tolist()  # numpy arrays and scalars, tensors
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
