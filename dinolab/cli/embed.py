"""``dinolab embed --model MODEL INPUTS... --output DIR``: features of image files, row-aligned with their paths."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from dinolab.cli.options import add_backbone_arguments, add_runtime_arguments, backbone_from_args, take_positional_model
from dinolab.data.images import ImageScan, scan_images
from dinolab.data.shards import only_files, open_images
from dinolab.data.transforms import Resolution, parse_image_size
from dinolab.features.embed import embed_images, estimate_bytes
from dinolab.features.writers import FORMATS, check_formats, embedding_output, summarize, write_embeddings
from dinolab.hub import CheckpointMismatchError, WeightsUnavailableError
from dinolab.runtime import OutputDir, resolve_device

# errors that come from what the user typed or pointed at: reported in one line, exit code 2
USER_ERRORS = (ValueError, FileNotFoundError, ImportError, WeightsUnavailableError, CheckpointMismatchError)
MAX_FAILURES_SHOWN = 20


def add_model_arguments(parser: argparse.ArgumentParser, num_workers: int = min(4, os.cpu_count() or 1)) -> None:
    """The shared backbone and runtime options, and --batch-size (shared with ``pca`` and ``attention``)."""
    add_backbone_arguments(parser)
    add_runtime_arguments(parser, num_workers=num_workers)
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default %(default)s)")


def add_picture_arguments(parser: argparse.ArgumentParser) -> None:
    """What ``pca`` and ``attention`` share: the model and runtime options, IMAGES, --output and --image-size."""
    add_model_arguments(parser, num_workers=0)
    parser.set_defaults(batch_size=8)
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUTS",
        help="image files, folders (recursive), .txt lists of paths, tar shards (DIR, a/{000..009}.tar), hf-disk:PATH",
    )
    parser.add_argument("--output", "-o", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--patch-pooled", action="store_true", help="also the mean of the patch tokens [N, D]")
    parser.add_argument(
        "--patch-tokens", action="store_true", help="also every patch token [N, h*w, D] (large: see the warning)"
    )
    parser.add_argument("--registers", action="store_true", help="also the register tokens [N, R, D]")
    parser.add_argument(
        "--format",
        dest="formats",
        action="append",
        choices=FORMATS,
        help="feature file format; repeat for several (default npy: one NAME.npy per output)",
    )
    size = parser.add_argument_group("resolution (default: --resize 256 --crop 224, the official eval transform)")
    size.add_argument("--resize", type=int, help="short side before the center crop (default crop * 8/7)")
    size.add_argument("--crop", type=int, help="center crop side; a multiple of the patch size (default 224)")
    size.add_argument(
        "--image-size", metavar="H[xW]", help="resize the whole image to H x W instead (multiples of the patch size)"
    )


def resolution_from_args(args: argparse.Namespace) -> Resolution:
    if args.image_size is not None:
        if args.resize is not None or args.crop is not None:
            raise ValueError("--image-size resizes the whole image; it cannot be combined with --resize / --crop")
        height, width = parse_image_size(args.image_size)
        return Resolution(mode="resize", height=height, width=width)
    crop = args.crop if args.crop is not None else 224
    resize = args.resize if args.resize is not None else round(crop * 8 / 7)
    return Resolution(mode="crop", resize=resize, crop=crop)


def write_failures(failed: list[tuple[Path, str]], total: int, out_dir: Path) -> None:
    """List the unreadable images in ``out_dir/failed.txt`` (path, tab, error) and name them on stderr."""
    if not failed:
        return
    failed_file = out_dir / "failed.txt"
    failed_file.parent.mkdir(parents=True, exist_ok=True)
    failed_file.write_text("".join(f"{p}\t{' '.join(err.split())}\n" for p, err in failed))
    report_failures(failed, total, failed_file)


def report_failures(failed: list[tuple[Path, str]], total: int, failed_file: Path) -> None:
    if not failed:
        return
    print(f"{len(failed)} of {total} images could not be read (all listed in {failed_file}):", file=sys.stderr)
    for path, error in failed[:MAX_FAILURES_SHOWN]:
        print(f"  {path}: {error}", file=sys.stderr)
    if len(failed) > MAX_FAILURES_SHOWN:
        print(f"  … and {len(failed) - MAX_FAILURES_SHOWN} more", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except USER_ERRORS as error:
        print(f"dinolab embed: error: {error}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    take_positional_model(args, "inputs")

    formats = check_formats(args.formats or ["npy"])
    resolution = resolution_from_args(args)
    outputs = ["cls"] + [
        name
        for name, wanted in (
            ("patch_pooled", args.patch_pooled),
            ("patch_tokens", args.patch_tokens),
            ("registers", args.registers),
        )
        if wanted
    ]
    if only_files(args.inputs):
        scan = scan_images(args.inputs)
    else:  # tar shards / hf-disk: datasets: images are named SHARD#OFFSET / hf-disk:PATH#ROW
        scan = ImageScan([Path(name) for name in open_images(args.inputs).names()])
    paths = scan.paths
    if not paths:
        raise ValueError(f"no images found in {args.inputs} (extensions searched in folders: jpg, png, …)")
    out_dir = Path(args.output)
    staging = embedding_output(out_dir)  # a bad --output fails now, not after the embedding
    try:
        return _embed(args, scan, staging, formats, resolution, outputs)
    finally:
        staging.discard()  # a no-op once the outputs are in place


def _embed(
    args: argparse.Namespace,
    scan: ImageScan,
    staging: OutputDir,
    formats: list[str],
    resolution: Resolution,
    outputs: list[str],
) -> int:
    paths, out_dir = scan.paths, staging.target
    start = time.perf_counter()
    model = backbone_from_args(args)
    load_seconds = time.perf_counter() - start
    resolution.check_patch_size(model.patch_size)
    if args.patch_tokens:
        size = estimate_bytes(len(paths), resolution.input_size, model.patch_size, model.embed_dim, ["patch_tokens"], 0)
        print(
            f"warning: --patch-tokens keeps {len(paths)} x {resolution.input_size[0] // model.patch_size}"
            f"x{resolution.input_size[1] // model.patch_size} patches x {model.embed_dim} floats = "
            f"{size / 2**20:,.0f} MiB in memory and on disk",
            file=sys.stderr,
        )
    device = resolve_device(args.device)
    sharded = not only_files(args.inputs)
    result = embed_images(
        model,
        list(args.inputs) if sharded else paths,
        outputs=outputs,
        resolution=resolution,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        dtype=args.dtype,
        device=device,
        progress=not args.no_progress,
        expand=sharded,
    )
    result.failed.extend((path, f"not searched: {reason}") for path, reason in scan.problems)
    summary = summarize(
        result,
        model_name=args.model,
        model=model,
        dtype=args.dtype,
        device=str(device),
        resolution=resolution.describe(),
        weights=args.weights,
        batch_size=args.batch_size,
        torch_version=torch.__version__,
        inputs=[str(source) for source in args.inputs],
        command="dinolab embed",
    )
    summary["timing"] = {"load_model_s": round(load_seconds, 4), **summary["timing"]}
    write_embeddings(result, out_dir, formats, summary, staging=staging)
    print(
        f"embedded {len(result.paths)} images ({', '.join(f'{k} {list(v.shape[1:])}' for k, v in result.features.items())}) "
        f"in {result.seconds:.1f} s ({result.images_per_s:.1f} images/s) -> {out_dir}"
    )
    report_failures(result.failed, result.num_requested, out_dir / "failed.txt")
    return 0 if result.paths else 1
