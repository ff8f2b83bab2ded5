"""``dinolab pca MODEL IMAGES... --output DIR``: the DINOv2 PCA picture of patch features (and CLS attention)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from dinolab.cli.embed import USER_ERRORS, add_model_arguments, load_model, report_failures
from dinolab.features.embed import Resolution, parse_image_size
from dinolab.features.extract import default_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.set_defaults(batch_size=8, num_workers=0)
    parser.add_argument(
        "images", nargs="+", metavar="IMAGES", help="image files, folders (recursive) and .txt lists of paths"
    )
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="output folder for the PNGs")
    parser.add_argument(
        "--image-size",
        default="448",
        metavar="H[xW]",
        help="resize every image to H x W, multiples of the patch size (default 448)",
    )
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
        model = load_model(args.model, args.weights)
        Resolution(mode="resize", height=height, width=width).check_patch_size(model.patch_size)
        device = torch.device(args.device) if args.device else default_device()
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
    if report.failed:
        failed_file = Path(args.output) / "failed.txt"
        failed_file.parent.mkdir(parents=True, exist_ok=True)
        failed_file.write_text("".join(f"{p}\t{' '.join(err.split())}\n" for p, err in report.failed))
        report_failures(report.failed, total, failed_file)
    return 0 if report.pictures else 1
