"""``dinolab train``: a recipe + overrides -> a validated config -> :func:`dinolab.train.loop.train`."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default="cpu_small", help="recipe name (see --list-recipes); default cpu_small")
    parser.add_argument("--data", nargs="+", help="image folders, ImageFolder trees or .txt path lists")
    parser.add_argument("--output", help="run directory (an existing run resumes from its latest checkpoint)")
    parser.add_argument("--config", help="a config.json of an earlier run to start from instead of a recipe")
    parser.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.base_lr=1e-3")


def resolve_config(args: argparse.Namespace):
    from dinolab.train.config import TrainConfig, apply_overrides
    from dinolab.train.recipes import get_recipe

    config = TrainConfig.load(args.config) if args.config else get_recipe(args.recipe)
    overrides = list(args.overrides)
    if args.data:
        overrides.append("run.data=" + ",".join(args.data))
    if args.output:
        overrides.append(f"run.output_dir={args.output}")
    return apply_overrides(config, overrides)


def _summary(recipe) -> str:
    """A recipe's description: its docstring's first paragraph that is not the command that runs it."""
    paragraphs = [p for p in inspect.getdoc(recipe).split("\n\n") if p.strip()]
    text = paragraphs[1] if len(paragraphs) > 1 and paragraphs[0].startswith("``") else paragraphs[0]
    return " ".join(text.split()).split(". ")[0][:110]


def run(args: argparse.Namespace) -> int:
    from dinolab.train.config import ConfigError
    from dinolab.train.recipes import RECIPES

    if args.list_recipes:
        for name, recipe in RECIPES.items():
            print(f"{name:26s} {_summary(recipe)}")
        return 0
    try:
        config = resolve_config(args)
    except ConfigError as error:
        print(f"dinolab train: invalid configuration: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    if not config.run.data:
        print("dinolab train: no training data; pass --data DIR (or run.data=...)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from dinolab.train.loop import NonFiniteLossError, train

    try:
        result = train(config)
    except (NonFiniteLossError, ConfigError) as error:
        print(f"dinolab train: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    state = "finished" if result.finished else "stopped (resume by running the same command)"
    print(f"{state} after {result.steps_done} iterations; run directory: {result.run_dir}")
    if result.teacher_backbone:
        print(f"teacher backbone (released format): {result.teacher_backbone}")
    return 0
