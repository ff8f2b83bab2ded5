"""``dinolab`` command line: argv -> config -> library call. Each subcommand lives in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

# (subcommand, module under dinolab.cli, one-line help). Each module defines
# ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS: list[tuple[str, str, str]] = [
    (
        "embed",
        "embed",
        "features of image files (CLS, pooled / all patch tokens, registers) to npy / Parquet / safetensors",
    ),
    ("pca", "pca", "the DINOv2 PCA picture of patch features, and CLS attention maps, as PNGs"),
    ("quickstart", "quickstart", "pretrain a small ViT on built-in images, evaluate it, write a report (minutes, CPU)"),
    ("train", "train", "self-supervised pretraining with the DINOv2 method on any folder of images"),
    ("export", "export", "export a run's teacher backbone in the released checkpoint format"),
    ("eval", "eval", "frozen-feature evaluations: knn, linear, logreg, segmentation, depth, retrieval, video"),
    ("curate", "curate", "automatic data curation: embed, deduplicate, decontaminate, retrieve, balance"),
]


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (its dependencies may be heavy or optional,
    e.g. faiss for ``curate``), all of them when ``argv`` is None."""
    parser = argparse.ArgumentParser(
        prog="dinolab", description="The DINOv2 system: features, pretraining, curation, evaluation."
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
