"""``dinolab eval TASK``: frozen-feature evaluations. Each task lives in its own module under dinolab.cli."""

from __future__ import annotations

import argparse
import importlib

# (task, module under dinolab.cli, one-line help). Each module defines ``add_arguments(parser)`` and
# ``run(args) -> int``.
EVAL_TASKS: list[tuple[str, str, str]] = []


def add_arguments(parser: argparse.ArgumentParser) -> None:
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, module_name, help_text in EVAL_TASKS:
        module = importlib.import_module(f"dinolab.cli.{module_name}")
        task = tasks.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(task)
        task.set_defaults(_run=module.run)


def run(args: argparse.Namespace) -> int:  # replaced by the chosen task's run via set_defaults
    raise AssertionError("unreachable: argparse dispatches to the task's run")
