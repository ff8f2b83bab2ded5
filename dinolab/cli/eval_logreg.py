"""``dinolab eval logreg``: L-BFGS logistic regression on frozen CLS features, C chosen on 10% of train."""

from __future__ import annotations

import argparse

from dinolab.cli.eval_classification import add_common_arguments, run_tasks
from dinolab.config import from_namespace
from dinolab.eval.logreg import LogRegConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    logreg = parser.add_argument_group("logistic regression")
    logreg.add_argument("--c-grid-size", type=int, default=45, help="C values in 10^[-6, 5] (official 45)")
    logreg.add_argument(
        "--search",
        choices=["full", "coarse-to-fine"],
        default="full",
        help="fit every C, or every 4th C then the neighbours of the best",
    )
    logreg.add_argument("--holdout-fraction", type=float, default=0.1, help="part of train for choosing C")
    logreg.add_argument("--select-on-val", action="store_true", help="choose C on --val instead")
    logreg.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations (default 1000)")
    logreg.add_argument("--tol", type=float, default=1e-12, help="L-BFGS tolerance (official 1e-12)")
    logreg.add_argument(
        "--backend",
        choices=["sklearn", "torch"],
        default="sklearn",
        help="scikit-learn on CPU, or torch.optim.LBFGS on --device",
    )
    logreg.add_argument("--n-jobs", type=int, default=1, help="parallel fits of the C sweep (sklearn)")


def run(args: argparse.Namespace) -> int:
    config = from_namespace(LogRegConfig, args)
    return run_tasks(args, "logreg", logreg=config)
