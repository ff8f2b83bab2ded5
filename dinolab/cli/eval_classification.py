"""Arguments and plumbing shared by ``dinolab eval knn | linear | logreg``: argv -> backbone, sets, configs."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from dinolab.cli.options import (
    MODEL_HELP,
    add_backbone_arguments,
    add_runtime_arguments,
    backbone_from_args,
    model_kwargs,
)
from dinolab.config import from_namespace
from dinolab.eval.classification import evaluate_classification
from dinolab.eval.features import ExtractionConfig, file_fingerprint
from dinolab.eval.readers.classification import LabelledData, LabelledImages, load_labelled
from dinolab.eval.results import ClassificationReport, write_report

DATA_HELP = (
    "a class-folder tree, a .txt/.csv list of 'path label' lines, torchvision:NAME[:SPLIT] (e.g. torchvision:cifar10), "
    "or precomputed embeddings (.npz, or .npy / folder with labels)"
)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    add_backbone_arguments(parser, model_help=MODEL_HELP + "; not needed when every set is precomputed embeddings")
    add_runtime_arguments(parser, num_workers=2)
    data = parser.add_argument_group("data")
    data.add_argument("--train", required=True, metavar="DATA", help="training set: " + DATA_HELP)
    data.add_argument("--val", metavar="DATA", help="validation set (default: a stratified part of --train)")
    data.add_argument("--test", metavar="DATA", help="optional test set, reported with the choice made on --val")
    data.add_argument("--val-fraction", type=float, default=0.1, help="held-out part of train (default 0.1)")
    data.add_argument(
        "--data-root", help="where torchvision datasets live (default $DINOLAB_DATA or ~/.cache/dinolab/datasets)"
    )
    data.add_argument("--download", action="store_true", help="let torchvision download missing datasets")
    extract = parser.add_argument_group("feature extraction")
    extract.add_argument("--batch-size", type=int, default=64, help="extraction batch size (default 64)")
    extract.add_argument("--resize", type=int, default=256, help="short side before the center crop (default 256)")
    extract.add_argument("--crop", type=int, default=224, help="center-crop size (default 224)")
    extract.add_argument(
        "--cache-dir",
        default="~/.cache/dinolab/features",
        help="extracted features are kept and reused here (default %(default)s)",
    )
    extract.add_argument("--no-cache", action="store_true", help="always extract, never read or write the cache")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for <task>.json and <task>.md")


@dataclass
class Inputs:
    backbone: nn.Module | None
    model_id: str | None
    train: LabelledData
    val: LabelledData | None
    test: LabelledData | None
    extraction: ExtractionConfig


def model_identity(args: argparse.Namespace) -> str | None:
    """A cheap identity of the backbone for the feature cache (files: path + size + mtime); None for a random
    init or a run directory, which are identified by hashing their state dict."""
    identity = f"{args.model}:{sorted(model_kwargs(args.model_arg).items())}"
    if args.weights:
        return f"{identity}:{file_fingerprint(args.weights)}"
    if Path(args.model).expanduser().is_file():
        return f"{identity}:{file_fingerprint(Path(args.model).expanduser())}"
    return None


def prepare(args: argparse.Namespace) -> Inputs:
    """Open the sets and the backbone named on the command line."""

    def open_set(spec: str | None, role: str) -> LabelledData | None:
        if spec is None:
            return None
        return load_labelled(spec, role=role, data_root=args.data_root, download=args.download)

    train, val, test = open_set(args.train, "train"), open_set(args.val, "eval"), open_set(args.test, "eval")
    needs_model = any(isinstance(s, LabelledImages) for s in (train, val, test))
    backbone, model_id = None, None
    if needs_model:
        if not args.model:
            raise SystemExit("--model is needed to extract features from images (e.g. --model dinov2_vits14)")
        backbone, model_id = backbone_from_args(args), model_identity(args)
    return Inputs(backbone, model_id, train, val, test, extraction_config(args))


def extraction_config(args: argparse.Namespace) -> ExtractionConfig:
    """How features are extracted for this command; deep enough for the linear probe's deepest variant
    (``--n-last-blocks 1 8`` keeps the last 8 blocks' CLS tokens, not the default 4)."""
    return from_namespace(
        ExtractionConfig,
        args,
        cache_dir=None if args.no_cache else os.fspath(args.cache_dir),
        n_last_blocks=max([ExtractionConfig.n_last_blocks, *getattr(args, "n_last_blocks", [])]),
    )


def run_tasks(args: argparse.Namespace, task: str, **configs: object) -> int:
    """Run one task end to end, write ``<task>.json`` / ``<task>.md`` in ``--output`` and print the table.

    Under torchrun, every process extracts its share of the features (gathered on all); rank 0 writes."""
    from dinolab.runtime import init_distributed

    env = init_distributed("cpu" if args.device == "cpu" else "auto")
    inputs = prepare(args)
    report: ClassificationReport = evaluate_classification(
        inputs.backbone,
        inputs.train,
        inputs.val,
        inputs.test,
        tasks=(task,),
        extraction=inputs.extraction,
        val_fraction=args.val_fraction,
        seed=args.seed,
        model_id=inputs.model_id,
        **configs,
    )
    report.config["command"] = {key: value for key, value in vars(args).items() if not key.startswith("_")}
    if not env.is_main:
        return 0
    print(write_report(report, args.output, stem=task))
    print(f"results written to {Path(args.output) / (task + '.json')} and {task}.md")
    return 0
