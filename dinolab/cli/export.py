"""``dinolab export``: a run's teacher backbone as a released-format ``.pth`` or ``.safetensors`` file."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run directory of dinolab train")
    parser.add_argument("--output", required=True, help="target file (.pth or .safetensors)")
    parser.add_argument("--checkpoint", help="a specific checkpoint folder (default: the latest)")


def run(args: argparse.Namespace) -> int:
    from dinolab.train.loop import export_run

    path = export_run(args.run_dir, args.output, args.checkpoint)
    print(f"wrote {path}; load it with dinolab.hub.load_backbone({str(path)!r}) or `dinolab embed {path} ...`")
    return 0
