"""``dinolab`` command line: argv -> config -> library call. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import traceback
from pathlib import Path

# (subcommand, module under dinolab.cli, one-line help). Each module defines
# ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS: list[tuple[str, str, str]] = [
    (
        "embed",
        "embed",
        "features of image files (CLS, pooled / all patch tokens, registers) to npy / Parquet / safetensors",
    ),
    ("pca", "pca", "the DINOv2 PCA picture of patch features, and CLS attention maps, as PNGs"),
    ("attention", "attention", "per-head self-attention maps of the CLS and register tokens over images, as PNGs"),
    ("quickstart", "quickstart", "pretrain a small ViT on built-in images, evaluate it, write a report (minutes, CPU)"),
    ("train", "train", "self-supervised pretraining with the DINOv2 method on any folder of images"),
    ("distill", "distill", "distil a large frozen teacher into a smaller student (the released ViT-S/B/L recipe)"),
    (
        "export",
        "export",
        "a run's backbone, a released model or a checkpoint to released .pth/.safetensors, Hugging Face, timm, "
        "ONNX or TorchScript, checked against the source",
    ),
    ("eval", "eval", "frozen-feature evaluations: knn, linear, logreg, segmentation, depth, retrieval, video"),
    ("curate", "curate", "automatic data curation: embed, deduplicate, decontaminate, retrieve, balance"),
    ("shards", "shards", "image folders / path lists to WebDataset tar shards with a manifest (resumable)"),
]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (its dependencies may be heavy or optional,
    e.g. faiss for ``curate``), all of them when ``argv`` is None."""
    parser = argparse.ArgumentParser(
        prog="dinolab", description="The DINOv2 system: features, pretraining, curation, evaluation."
    )
    parser.add_argument(
        "--debug", action="store_true", help="show the Python traceback of an error (also: DINOLAB_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((arg for arg in argv if not arg.startswith("-")), None) if argv is not None else None
    for name, module_name, help_text in COMMANDS:
        command = sub.add_parser(name, help=help_text, description=help_text)
        if argv is None or name == chosen:
            module = importlib.import_module(f"dinolab.cli.{module_name}")
            module.add_arguments(command)
            command.set_defaults(_run=module.run)
    return parser


# errors a user causes and can fix (a path, a setting, a file's content, the disk): exit status 2
USER_ERROR_NAMES = (
    "ConfigError",
    "FileNotFoundError",
    "FileExistsError",
    "IsADirectoryError",
    "NotADirectoryError",
    "PermissionError",
    "DiskFullError",
    "RunLockedError",
    "UnsafeCheckpointError",
    "UnpicklingError",
    "WeightsUnavailableError",
    "CheckpointMismatchError",
    "SafetensorError",
    "ValueError",
    "ImportError",
    "ModuleNotFoundError",
)


def error_line(command: str, error: BaseException) -> str:
    """One line naming the problem: the message (its last line, for errors re-raised from worker processes)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    message = lines[0] if lines else type(error).__name__
    if "Traceback" in str(error) and lines:  # e.g. "Caught ValueError in DataLoader worker …\nOriginal Traceback"
        message = lines[-1]
    user = any(cls.__name__ in USER_ERROR_NAMES for cls in type(error).__mro__[:-2])
    if not user:
        message = f"{type(error).__name__}: {message} (an internal error: --debug shows where; please report it)"
    return f"dinolab {command}: error: {message}"


def _terminate(signum: int, _frame: object) -> None:
    # SIGTERM as an exception: temporary outputs are cleaned up on the way out (training installs its own handler)
    raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv or os.environ.get("DINOLAB_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]  # accepted anywhere on the line
    args = build_parser(argv).parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate) if _in_main_thread() else None
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt as error:
        print(f"dinolab {args.command}: {error or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as error:
        if debug:
            traceback.print_exc()
        if _disk_full(args, error):
            print(f"dinolab {args.command}: error: {_disk_full(args, error)}", file=sys.stderr)
            return 2
        print(error_line(args.command, error), file=sys.stderr)
        return 2 if any(cls.__name__ in USER_ERROR_NAMES for cls in type(error).__mro__[:-2]) else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _disk_full(args: argparse.Namespace, error: Exception) -> str:
    """The message for a full disk that a library reported in its own words (torch: ``unexpected pos …``)."""
    from dinolab.runtime import DiskFullError, disk_full_error, is_disk_full

    if isinstance(error, DiskFullError):
        return str(error)
    target = getattr(args, "output", None) or getattr(args, "store", None)
    directory = Path(target).expanduser().absolute().parent if target else Path.cwd()
    if not is_disk_full(error, directory):
        return ""
    return str(disk_full_error(f"the outputs of dinolab {args.command}", directory, "earlier outputs were kept"))


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
