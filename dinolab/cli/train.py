"""``dinolab train``: a recipe + overrides -> a validated config -> :func:`dinolab.train.loop.train`."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import sys

from dinolab.cli.options import add_backbone_arguments, add_runtime_arguments


def add_arguments(parser: argparse.ArgumentParser, default_recipe: str = "cpu_small") -> None:
    parser.add_argument(
        "--recipe", default=default_recipe, help=f"recipe name (see --list-recipes); default {default_recipe}"
    )
    parser.add_argument(
        "--data",
        nargs="+",
        action="extend",
        help="image folders, ImageFolder trees or .txt path lists (several, or --data repeated; commas are part "
        "of a path here, unlike in run.data=a,b)",
    )
    parser.add_argument("--output", help="run directory (an existing run resumes from its latest checkpoint)")
    parser.add_argument("--config", help="a config.json of an earlier run to start from instead of a recipe")
    parser.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.base_lr=1e-3")
    add_backbone_arguments(
        parser,
        model_help="the architecture to train (vit_small …): model.arch; --model-arg KEY=VALUE sets model.KEY",
        weights_help="continue pretraining from a released name (dinov2_vits14 …) or a checkpoint file: "
        "model.init_from",
    )
    add_runtime_arguments(parser, num_workers=None, dtype=None, seed=None)


def front_door_overrides(args: argparse.Namespace) -> list[str]:
    """The shared backbone and runtime options as config overrides (before the KEY=VALUE ones, which win)."""
    chosen = [f"model.arch={args.model}"] if args.model else []
    chosen += [f"model.init_from={args.weights}"] if args.weights else []
    chosen += [f"model.{item}" for item in args.model_arg]
    for key in ("device", "dtype", "num_workers", "seed"):
        if getattr(args, key) is not None:
            chosen.append(f"run.{key}={getattr(args, key)}")
    return chosen + (["run.progress=false"] if args.no_progress else [])


def resolve_config(args: argparse.Namespace):
    from dinolab.config import apply_overrides
    from dinolab.train.config import TrainConfig
    from dinolab.train.recipes import get_recipe

    config = TrainConfig.load(args.config) if args.config else get_recipe(args.recipe)
    overrides = front_door_overrides(args) + list(args.overrides)
    if args.output:
        overrides.append(f"run.output_dir={args.output}")
    config = apply_overrides(config, overrides)
    if args.data:  # set as a list, not through the comma-separated override: paths may hold commas
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, data=list(args.data)))
    return config


def _summary(recipe) -> str:
    """A recipe's description: its docstring's first paragraph that is not the command that runs it."""
    paragraphs = [p for p in inspect.getdoc(recipe).split("\n\n") if p.strip()]
    text = paragraphs[1] if len(paragraphs) > 1 and paragraphs[0].startswith("``") else paragraphs[0]
    return " ".join(text.split()).split(". ")[0][:110]


def run(args: argparse.Namespace, command: str = "train") -> int:
    from dinolab.config import ConfigError
    from dinolab.train.recipes import RECIPES

    if args.list_recipes:
        for name, recipe in RECIPES.items():
            print(f"{name:26s} {_summary(recipe)}")
        return 0
    try:
        config = resolve_config(args)
    except ConfigError as error:
        print(f"dinolab {command}: invalid configuration: {error}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    if command == "distill" and not config.distill.enabled:
        print("dinolab distill: no teacher; pass --teacher RUN_OR_MODEL (or distill.teacher=...)", file=sys.stderr)
        return 2
    if not config.run.data:
        print(f"dinolab {command}: no training data; pass --data DIR (or run.data=...)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from dinolab.train.loop import NonFiniteLossError, train

    try:
        result = train(config)
    except (NonFiniteLossError, ConfigError) as error:
        print(f"dinolab {command}: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    state = "finished" if result.finished else "stopped (resume by running the same command)"
    print(f"{state} after {result.steps_done} iterations; run directory: {result.run_dir}")
    if result.backbone:
        print(f"exported backbone (released format): {result.backbone}")
    return 0
