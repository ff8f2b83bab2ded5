"""``dinolab eval TASK``: frozen-feature evaluations. Each task lives in its own module under dinolab.cli."""

from __future__ import annotations

import argparse
import importlib

# (task, module under dinolab.cli, one-line help). Each module defines ``add_arguments(parser)`` and
# ``run(args) -> int``.
EVAL_TASKS: list[tuple[str, str, str]] = [
    ("knn", "eval_knn", "weighted k-NN on frozen features (top-1/top-5 for k = 10, 20, 100, 200)"),
    ("linear", "eval_linear", "linear-probe grid (4 feature variants x 13 learning rates) on frozen features"),
    ("logreg", "eval_logreg", "L-BFGS logistic regression on frozen features, C chosen on 10% of train"),
    ("segmentation", "eval_segmentation", "linear head on frozen patch tokens; sliding-window mIoU"),
    ("depth", "eval_depth", "linear 256-bin depth head on frozen patch tokens + CLS; RMSE, AbsRel, delta1-3"),
    ("retrieval", "eval_retrieval", "global descriptors, cosine ranking, revisited Oxford/Paris mAP and mP@k"),
    ("video", "eval_video", "frame CLS features pooled over time + linear classifier; top-1 accuracy"),
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, module_name, help_text in EVAL_TASKS:
        module = importlib.import_module(f"dinolab.cli.{module_name}")
        task = tasks.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(task)
        task.set_defaults(_run=module.run)


def run(args: argparse.Namespace) -> int:  # replaced by the chosen task's run via set_defaults
    raise AssertionError("unreachable: argparse dispatches to the task's run")
