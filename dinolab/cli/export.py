"""``dinolab export --model SOURCE --output OUT``: a backbone in the released layout, as a Hugging Face directory, a timm
checkpoint, ONNX or TorchScript, each checked against the source before it is written."""

from __future__ import annotations

import argparse
import sys

from dinolab.cli.embed import USER_ERRORS
from dinolab.cli.options import add_backbone_arguments, backbone_from_args, model_from_positional
from dinolab.hub import RELEASED


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dinolab.hub.export import DEFAULT_TOLERANCE, FORMATS, ONNX_OPSET

    add_backbone_arguments(
        parser,
        model_help="what to export: a run directory of dinolab train (its teacher, or a distillation run's student "
        f"EMA), a released backbone ({', '.join(RELEASED)}; with --weights FILE to use a local file), an "
        "architecture, or any checkpoint file dinolab reads (released .pth, timm, Hugging Face, safetensors, "
        "training checkpoints)",
    )
    parser.add_argument("source", nargs="?", metavar="SOURCE", help=argparse.SUPPRESS)  # old spelling of --model
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        help="target: .pth / .safetensors (released layout), a directory (Hugging Face), .onnx, .ts (TorchScript)",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        help="export format (default: from the --output suffix; timm files need --format timm)",
    )
    parser.add_argument("--checkpoint", help="a run's checkpoint folder to export (default: the latest)")
    parser.add_argument(
        "--check-size",
        action="append",
        metavar="H[xW]",
        help="input size of the parity check; repeat (default: the stored grid's size and a smaller non-square one)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=DEFAULT_TOLERANCE,
        help="largest accepted difference to the source, relative to max(1, max |features|) (default %(default)s)",
    )
    parser.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset (default %(default)s)")


def run(args: argparse.Namespace) -> int:
    from dinolab.data.transforms import parse_image_size
    from dinolab.hub.export import ExportError, export_backbone

    try:
        model_from_positional(args, args.source)
        model = backbone_from_args(args)
        sizes = [parse_image_size(text) for text in args.check_size] if args.check_size else None
        result = export_backbone(
            model, args.output, args.format, check_sizes=sizes, tolerance=args.tolerance, opset=args.opset
        )
    except (*USER_ERRORS, ExportError) as error:
        print(f"dinolab export: error: {error}", file=sys.stderr)
        return 2
    checks = ", ".join(f"{c.batch}x{c.height}x{c.width}: {c.max_abs_diff:.2g}" for c in result.checks)
    print(f"wrote {result.path} ({result.format}); max |export - source| {checks}")
    for note in result.notes:
        print(f"  {note}")
    return 0
