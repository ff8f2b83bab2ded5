"""Options and helpers shared by ``dinolab eval segmentation | depth | retrieval | video``."""

from __future__ import annotations

import argparse
import ast
import json
import os
from pathlib import Path

import torch

from dinolab.features.extract import DTYPES, default_device


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Backbone, device, output folder and loader options."""
    parser.add_argument(
        "--backbone",
        default="dinov2_vits14",
        help="released name (dinov2_vits14 ...), architecture for random init (vit_small ...) or checkpoint path",
    )
    parser.add_argument(
        "--backbone-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra keyword for the backbone constructor, e.g. depth=2 (repeatable; values are Python literals)",
    )
    parser.add_argument("--output", required=True, type=Path, help="folder for results.json, the head and pictures")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="autocast dtype of the backbone")
    parser.add_argument("--num-workers", type=int, default=4, help="data loading processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def parse_backbone_args(items: list[str]) -> dict[str, object]:
    """``["depth=2", "img_size=56"]`` -> ``{"depth": 2, "img_size": 56}`` (strings stay strings)."""
    kwargs: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--backbone-arg expects KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def build_backbone(args: argparse.Namespace) -> torch.nn.Module:
    from dinolab.hub import load_backbone

    torch.manual_seed(args.seed)  # random-init backbones are reproducible
    return load_backbone(args.backbone, **parse_backbone_args(args.backbone_arg))


def device_of(args: argparse.Namespace) -> torch.device:
    return torch.device(args.device) if args.device else default_device()


def write_json(path: str | os.PathLike, payload: dict[str, object]) -> Path:
    """Write ``payload`` as indented JSON atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(value: object) -> object:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()  # numpy arrays and scalars
    return repr(value)


def resolved_arguments(args: argparse.Namespace) -> dict[str, object]:
    """The parsed options (for the run record), without argparse's dispatch entries."""
    return {k: v for k, v in vars(args).items() if not k.startswith("_")}


def save_head(path: Path, head: torch.nn.Module, meta: dict[str, object]) -> Path:
    """Save a trained head in the released (mmseg) layout so that ``--head`` can load it back."""
    from dinolab.eval.heads import head_checkpoint

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(head_checkpoint(head, {"config": json.dumps(meta, default=_jsonable)}), tmp)
    tmp.replace(path)
    return path


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
