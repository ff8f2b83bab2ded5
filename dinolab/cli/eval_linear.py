"""``dinolab eval linear``: the official linear-probe grid (4 feature variants x 13 learning rates) on frozen
features, the best head chosen on the validation set."""

from __future__ import annotations

import argparse

from dinolab.cli.eval_classification import add_common_arguments, run_tasks
from dinolab.config import from_namespace
from dinolab.eval.linear import LEARNING_RATES, LinearConfig


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    linear = parser.add_argument_group("linear probe")
    linear.add_argument("--epochs", type=int, default=10, help="passes over the training features (default 10)")
    linear.add_argument("--iterations", type=int, help="total iterations (overrides --epochs)")
    linear.add_argument("--train-batch-size", type=int, default=128, help="SGD batch size (default 128)")
    linear.add_argument(
        "--learning-rates",
        type=float,
        nargs="+",
        default=list(LEARNING_RATES),
        help="base learning rates, scaled by batch/256 (default: the official 13)",
    )
    linear.add_argument("--n-last-blocks", type=int, nargs="+", default=[1, 4], help="CLS of the last n blocks")
    linear.add_argument(
        "--augment",
        action="store_true",
        help="re-extract augmented training features every epoch (official augmentation; slow)",
    )


def run(args: argparse.Namespace) -> int:
    config = from_namespace(LinearConfig, args, batch_size=args.train_batch_size)
    return run_tasks(args, "linear", linear=config, augment_linear=args.augment)
