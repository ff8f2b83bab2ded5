"""The options every command shares, written once: which backbone, and how to run.

- :func:`add_backbone_arguments` / :func:`backbone_from_args`: ``--model MODEL`` (a released name, an
  architecture for random init, a checkpoint file, a run directory or a Hugging Face export folder),
  ``--weights FILE`` and ``--model-arg KEY=VALUE``. Every command that reads a backbone takes it this way.
- :func:`add_runtime_arguments`: ``--device``, ``--dtype``, ``--num-workers``, ``--seed``, ``--no-progress``.

Old spellings (``--backbone``, ``--backbone-arg``, a positional MODEL) are accepted for one release, with a
message on stderr naming the new one; they are hidden from ``--help``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dinolab.runtime import DTYPES

MODEL_HELP = (
    "the backbone: a released name (dinov2_vits14 …), an architecture for random init (vit_small …), a "
    "checkpoint file (released .pth, timm, Hugging Face, safetensors, dinolab training checkpoints), a dinolab run "
    "directory or a Hugging Face export folder"
)
WEIGHTS_HELP = (
    "weights for a released MODEL name (a local file instead of the download) or for an architecture name "
    "(loaded into it; any supported format)"
)
MODEL_ARG_HELP = "extra keyword for building the backbone, e.g. depth=2 (repeatable; values are Python literals)"
RUNTIME_OPTIONS = ("device", "dtype", "num_workers", "seed", "progress")


def deprecated(old: str, new: str) -> None:
    """Say on stderr that ``old`` is an old spelling of ``new`` (it still works, for one release)."""
    print(f"dinolab: {old} is deprecated, write {new} (the old form goes in the next release)", file=sys.stderr)


class DeprecatedAlias(argparse.Action):
    """An old option spelling: stores into the new option's destination, after saying so."""

    def __init__(self, option_strings: Sequence[str], dest: str, replacement: str, append: bool = False, **kw):
        super().__init__(option_strings, dest, **kw)
        self.replacement, self.append = replacement, append

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option=None):
        deprecated(str(option), self.replacement)
        if self.append:
            setattr(namespace, self.dest, [*(getattr(namespace, self.dest) or []), values])
        else:
            setattr(namespace, self.dest, values)


# ----------------------------------------------------------------------------------------------- the backbone
def add_backbone_arguments(
    parser: argparse.ArgumentParser,
    default: str | None = None,
    model_help: str = MODEL_HELP,
    weights_help: str = WEIGHTS_HELP,
) -> None:
    """``--model``, ``--weights``, ``--model-arg`` (and the hidden old spellings ``--backbone[-arg]``)."""
    group = parser.add_argument_group("backbone")
    shown_default = f" (default {default})" if default else ""
    group.add_argument("--model", default=default, metavar="MODEL", help=model_help + shown_default)
    group.add_argument("--weights", metavar="FILE", help=weights_help)
    group.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE", help=MODEL_ARG_HELP)
    group.add_argument(
        "--backbone", dest="model", action=DeprecatedAlias, replacement="--model", help=argparse.SUPPRESS
    )
    group.add_argument(
        "--backbone-arg",
        dest="model_arg",
        action=DeprecatedAlias,
        replacement="--model-arg",
        append=True,
        help=argparse.SUPPRESS,
    )


def model_kwargs(items: Sequence[str]) -> dict[str, object]:
    """``["depth=2", "ffn_layer=mlp"]`` -> ``{"depth": 2, "ffn_layer": "mlp"}`` (a bare word stays a string)."""
    kwargs: dict[str, object] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--model-arg expects KEY=VALUE, got {item!r}")
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def model_description(args: argparse.Namespace) -> str:
    """``--model`` with its ``--weights`` and ``--model-arg`` (what a store or a report records as the model)."""
    parts = [args.model] + ([f"--weights {args.weights}"] if args.weights else [])
    return " ".join(parts + [f"--model-arg {item}" for item in args.model_arg])


def take_positional_model(args: argparse.Namespace, items: str) -> None:
    """The old ``dinolab CMD MODEL ITEMS...``: without ``--model``, the first of ``args.<items>`` is the model."""
    rest = list(getattr(args, items) or [])
    if args.model is None and len(rest) > 1:
        model_from_positional(args, rest[0])
        setattr(args, items, rest[1:])


def model_from_positional(args: argparse.Namespace, value: str | None) -> None:
    """The old positional MODEL / SOURCE ``value`` (if given) as ``--model``, with a deprecation message."""
    if value is None:
        return
    if args.model is not None:
        raise ValueError(f"the model is named twice ({value} and --model {args.model}); keep --model")
    deprecated(f"the positional MODEL ({value})", f"--model {value}")
    args.model = value


def backbone_from_args(args: argparse.Namespace) -> nn.Module:
    """The backbone ``--model`` / ``--weights`` / ``--model-arg`` name (random-init ones seeded by ``--seed``)."""
    if not args.model:
        raise ValueError("name the backbone with --model MODEL (e.g. --model dinov2_vits14)")
    torch.manual_seed(getattr(args, "seed", 0) or 0)  # random-init backbones are reproducible
    return load_model(args.model, args.weights, model_kwargs(args.model_arg), getattr(args, "checkpoint", None))


def load_model(
    spec: str, weights: str | None = None, kwargs: dict[str, object] | None = None, checkpoint: str | None = None
) -> nn.Module:
    """MODEL (+ ``--weights``, keywords) -> backbone in eval mode; the one rule every command follows.

    A directory is a dinolab run (its teacher, or a distillation run's student EMA; ``checkpoint`` picks one of
    its checkpoints) or a Hugging Face export. ``weights`` goes with a released name (instead of downloading) or
    an architecture name (loaded into the random init), never with a checkpoint file: that file is the weights.
    """
    from dinolab.hub import RELEASED, WeightsUnavailableError, load_backbone, load_checkpoint_into
    from dinolab.models.vit import ARCHS

    kwargs = kwargs or {}
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "checkpoints").is_dir() or checkpoint:
            from dinolab.train.loop import load_run_backbone

            return load_run_backbone(path, checkpoint)
        if (path / "model.safetensors").is_file():
            return load_backbone(str(path / "model.safetensors"), **kwargs).eval()
        raise FileNotFoundError(f"{path} is a directory but neither a run (no checkpoints/) nor a Hugging Face export")
    if checkpoint:
        raise ValueError(f"--checkpoint picks a checkpoint of a run directory; {spec} is not one")
    if not path.exists() and spec not in RELEASED and spec not in ARCHS:
        raise FileNotFoundError(
            f"{spec} is neither a run directory, a checkpoint file, a released backbone ({', '.join(RELEASED)}) "
            "nor an architecture"
        )
    if weights and spec not in RELEASED and spec not in ARCHS:
        raise ValueError(
            f"--weights applies to released model names ({', '.join(RELEASED)}) and architectures, not {spec!r}; "
            "to use a checkpoint file, pass it as --model"
        )
    if weights and spec not in RELEASED:
        return load_checkpoint_into(load_backbone(spec, **kwargs), weights).eval()
    try:
        model = load_backbone(spec, weights=weights, **kwargs) if weights else load_backbone(spec, **kwargs)
    except WeightsUnavailableError as error:
        raise WeightsUnavailableError(f"{error}. On the command line: --weights PATH") from error
    return model.eval()


# ------------------------------------------------------------------------------------------------ the runtime
def add_runtime_arguments(
    parser: argparse.ArgumentParser,
    num_workers: int | None = 2,
    dtype: str | None = "fp32",
    seed: int | None = 0,
    options: Sequence[str] = RUNTIME_OPTIONS,
) -> None:
    """``--device``, ``--dtype``, ``--num-workers``, ``--seed``, ``--no-progress`` (those of ``options`` the
    command can honour). A ``None`` default leaves the value to the command's own config."""
    unknown = set(options) - set(RUNTIME_OPTIONS)
    if unknown:
        raise ValueError(f"unknown runtime options {sorted(unknown)}; choose from {RUNTIME_OPTIONS}")
    group = parser.add_argument_group("runtime")

    def default(value: object) -> str:
        return f" (default {value})" if value is not None else ""

    if "device" in options:
        group.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when available)")
    if "dtype" in options:
        group.add_argument(
            "--dtype", default=dtype, choices=list(DTYPES), help="compute precision (autocast)" + default(dtype)
        )
    if "num_workers" in options:
        group.add_argument(
            "--num-workers", type=int, default=num_workers, help="data-loading processes" + default(num_workers)
        )
    if "seed" in options:
        group.add_argument(
            "--seed", type=int, default=seed, help="seed of random initialisation, splits and training" + default(seed)
        )
    if "progress" in options:
        group.add_argument("--no-progress", action="store_true", help="no progress bars")
