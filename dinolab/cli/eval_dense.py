"""Options and helpers shared by ``dinolab eval segmentation | depth | retrieval | video``."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from dinolab.cli.options import add_backbone_arguments, add_runtime_arguments
from dinolab.config import from_namespace
from dinolab.eval.dense import DenseEvaluation, DenseResult
from dinolab.runtime import atomic_write, atomic_write_json, json_default, resolve_device


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The shared backbone and runtime options, and the output folder."""
    add_backbone_arguments(parser, default="dinov2_vits14")
    add_runtime_arguments(parser, num_workers=4)
    parser.add_argument("--output", required=True, type=Path, help="folder for results.json, the head and pictures")


def write_json(path: str | os.PathLike, payload: dict[str, object]) -> Path:
    """Write ``payload`` as indented JSON atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_json(path, payload)


def finish(output: Path, record: dict[str, object], results: DenseResult, name: str) -> int:
    """Write ``record`` with ``results`` into ``output/results.json`` and print the summary line."""
    path = write_json(output / "results.json", {**record, "results": results.to_dict()})
    print(f"{name}: {results.summary_line()} -> {path}")
    return 0


def evaluation_options(args: argparse.Namespace) -> DenseEvaluation:
    """How every ``evaluate_*`` of a dense task runs, from the command line."""
    return from_namespace(
        DenseEvaluation,
        args,
        device=resolve_device(args.device),
        max_images=args.max_val_images,
        picture_dir=args.output / "pictures",
    )


def resolved_arguments(args: argparse.Namespace) -> dict[str, object]:
    """The parsed options (for the run record), without argparse's dispatch entries."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def save_head(path: Path, head: torch.nn.Module, meta: dict[str, object]) -> Path:
    """Save a trained head in the released (mmseg) layout so that ``--head`` can load it back."""
    from dinolab.eval.heads import head_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = head_checkpoint(head, {"config": json.dumps(meta, default=json_default)})
    return atomic_write(path, lambda handle: torch.save(checkpoint, handle))


def loss_summary(losses: list[float]) -> dict[str, float | int | None]:
    """First / last loss and the mean loss over the first and the last 10% of the iterations."""
    if not losses:
        return {"iterations": 0, "first": None, "last": None, "start_mean": None, "end_mean": None}
    tenth = max(1, len(losses) // 10)
    return {
        "iterations": len(losses),
        "first": losses[0],
        "last": losses[-1],
        "start_mean": sum(losses[:tenth]) / tenth,
        "end_mean": sum(losses[-tenth:]) / tenth,
    }
