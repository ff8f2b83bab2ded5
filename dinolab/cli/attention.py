"""``dinolab attention --model MODEL IMAGES... --output DIR``: per-head self-attention maps of the CLS (and register) tokens."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dinolab.cli.embed import USER_ERRORS, add_picture_arguments, write_failures
from dinolab.cli.options import backbone_from_args, take_positional_model
from dinolab.data.transforms import parse_image_size
from dinolab.runtime import resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_picture_arguments(parser)
    parser.add_argument(
        "--block",
        type=int,
        default=-1,
        help="block whose attention is shown; negative counts from the end (default -1)",
    )
    parser.add_argument(
        "--registers", action="store_true", help="also one picture per register token (models with registers)"
    )


def run(args: argparse.Namespace) -> int:
    from dinolab.features.attention import attention_pictures

    try:
        height, width = parse_image_size(args.image_size)
        take_positional_model(args, "images")
        model = backbone_from_args(args)
        device = resolve_device(args.device)
        report = attention_pictures(
            model,
            args.images,
            args.output,
            image_size=(height, width),
            block=args.block,
            registers=args.registers,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            dtype=args.dtype,
            device=device,
        )
    except USER_ERRORS as error:
        print(f"dinolab attention: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {len(report.pictures)} pictures and {report.maps} for {len(report.paths)} images -> {args.output}")
    write_failures(report.failed, len(report.paths) + len(report.failed), Path(args.output))
    return 0 if report.paths else 1
