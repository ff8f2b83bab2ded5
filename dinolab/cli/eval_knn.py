"""``dinolab eval knn``: weighted k-NN on frozen CLS features (top-1/top-5 for several k, optional few-shot)."""

from __future__ import annotations

import argparse

from dinolab.cli.eval_classification import add_common_arguments, run_tasks
from dinolab.config import from_namespace
from dinolab.eval.knn import DEFAULT_KS, KnnConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    knn = parser.add_argument_group("k-NN")
    knn.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="numbers of neighbours")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T) (default 0.07)")
    knn.add_argument("--uniform", action="store_true", help="plain majority vote instead of exp(sim / T) weights")
    knn.add_argument(
        "--few-shot",
        type=int,
        nargs="+",
        default=[],
        metavar="N",
        help="also evaluate with N training images per class (several N allowed)",
    )
    knn.add_argument("--tries", type=int, default=5, help="random draws per few-shot setting (default 5)")


def run(args: argparse.Namespace) -> int:
    config = from_namespace(KnnConfig, args, weighting="uniform" if args.uniform else "exp")
    return run_tasks(args, "knn", knn=config)
