"""``dinolab embed MODEL INPUTS... --output DIR``: features of image files, row-aligned with their paths."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from dinolab.features.embed import Resolution, embed_images, estimate_bytes, parse_image_size
from dinolab.features.extract import DTYPES, default_device
from dinolab.features.writers import FORMATS, check_formats, summarize, write_embeddings
from dinolab.hub import RELEASED, CheckpointMismatchError, WeightsUnavailableError, load_backbone

# errors that come from what the user typed or pointed at: reported in one line, exit code 2
USER_ERRORS = (ValueError, FileNotFoundError, ImportError, WeightsUnavailableError, CheckpointMismatchError)
MAX_FAILURES_SHOWN = 20


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """MODEL, --weights, --device, --dtype, --batch-size, --num-workers, --no-progress (shared with ``pca``)."""
    parser.add_argument(
        "model",
        metavar="MODEL",
        help=f"a released backbone ({', '.join(RELEASED)}), an architecture for random init (vit_small …) "
        "or a checkpoint file (released .pth, timm, Hugging Face, safetensors, dinolab training checkpoints)",
    )
    parser.add_argument(
        "--weights", metavar="PATH", help="local checkpoint file for a released MODEL name (instead of downloading)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default %(default)s)")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="image-decoding processes (default %(default)s)",
    )
    parser.add_argument(
        "--dtype", choices=list(DTYPES), default="fp32", help="compute precision (autocast); stored as float32"
    )
    parser.add_argument("--device", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "inputs", nargs="+", metavar="INPUTS", help="image files, folders (recursive) and .txt lists of paths"
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


def load_model(spec: str, weights: str | None) -> nn.Module:
    """MODEL (+ --weights) -> backbone in eval mode."""
    if weights is None:
        try:
            return load_backbone(spec)
        except WeightsUnavailableError as error:
            raise WeightsUnavailableError(f"{error}. On the command line: --weights PATH") from error
    if spec not in RELEASED:
        raise ValueError(
            f"--weights applies to released model names ({', '.join(RELEASED)}), not {spec!r}; "
            "to use a checkpoint file, pass it as MODEL"
        )
    return load_backbone(spec, weights=weights)


def resolution_from_args(args: argparse.Namespace) -> Resolution:
    if args.image_size is not None:
        if args.resize is not None or args.crop is not None:
            raise ValueError("--image-size resizes the whole image; it cannot be combined with --resize / --crop")
        height, width = parse_image_size(args.image_size)
        return Resolution(mode="resize", height=height, width=width)
    crop = args.crop if args.crop is not None else 224
    resize = args.resize if args.resize is not None else round(crop * 8 / 7)
    return Resolution(mode="crop", resize=resize, crop=crop)


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
    from dinolab.data.images import list_images

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
    paths = list_images(args.inputs)
    if not paths:
        raise ValueError(f"no images found in {args.inputs} (extensions searched in folders: jpg, png, …)")
    start = time.perf_counter()
    model = load_model(args.model, args.weights)
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
    device = torch.device(args.device) if args.device else default_device()
    result = embed_images(
        model,
        paths,
        outputs=outputs,
        resolution=resolution,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        dtype=args.dtype,
        device=device,
        progress=not args.no_progress,
        expand=False,
    )
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
    )
    summary["timing"] = {"load_model_s": round(load_seconds, 4), **summary["timing"]}
    out_dir = Path(args.output)
    write_embeddings(result, out_dir, formats, summary)
    print(
        f"embedded {len(result.paths)} images ({', '.join(f'{k} {list(v.shape[1:])}' for k, v in result.features.items())}) "
        f"in {result.seconds:.1f} s ({result.images_per_s:.1f} images/s) -> {out_dir}"
    )
    report_failures(result.failed, result.num_requested, out_dir / "failed.txt")
    return 0 if result.paths else 1
