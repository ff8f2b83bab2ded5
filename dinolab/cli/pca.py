"""``dinolab pca --model MODEL IMAGES... --output DIR``: the DINOv2 PCA picture of patch features (and CLS attention)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dinolab.cli.embed import USER_ERRORS, add_picture_arguments, write_failures
from dinolab.cli.options import backbone_from_args, take_positional_model
from dinolab.data.transforms import Resolution, parse_image_size
from dinolab.runtime import resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_picture_arguments(parser)
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.0,
        help="foreground = first principal component above this many standard deviations (default 0, as in the paper)",
    )
    parser.add_argument(
        "--no-background-removal", action="store_true", help="colour every patch (skip the foreground threshold)"
    )
    parser.add_argument(
        "--attention", action="store_true", help="also save the last block's CLS attention maps, one per head"
    )


def run(args: argparse.Namespace) -> int:
    from dinolab.features.pca import pca_pictures

    try:
        height, width = parse_image_size(args.image_size)
        take_positional_model(args, "images")
        model = backbone_from_args(args)
        Resolution(mode="resize", height=height, width=width).check_patch_size(model.patch_size)
        device = resolve_device(args.device)
        report = pca_pictures(
            model,
            args.images,
            args.output,
            image_size=(height, width),
            threshold=None if args.no_background_removal else args.threshold,
            attention=args.attention,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            dtype=args.dtype,
            device=device,
            progress=not args.no_progress,
        )
    except USER_ERRORS as error:
        print(f"dinolab pca: error: {error}", file=sys.stderr)
        return 2
    total = len(report.pictures) + len(report.failed)
    written = len(report.pictures) + len(report.attention)
    print(f"wrote {written} pictures for {len(report.pictures)} images -> {args.output}")
    write_failures(report.failed, total, Path(args.output))
    return 0 if report.pictures else 1
