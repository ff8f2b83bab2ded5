"""``dinolab distill``: ``dinolab train`` in distillation mode, with the teacher and the student named up front.

``dinolab distill --teacher T --student ARCH --data DIR --output RUN [key=value ...]`` (``--student`` and
``--model`` are the same option) is ``dinolab train`` with
``distill.teacher=T model.arch=ARCH`` and the method's two requirements (``model.drop_path_rate=0``,
``masking.sample_probability=0``) applied before the user's overrides: same recipes, config, resume, checkpoints
and logging; the run exports the student's EMA (``RUN/student_backbone.pth``, or ``dinolab export RUN``).
"""

from __future__ import annotations

import argparse

from dinolab.cli import train as train_cli

METHOD_OVERRIDES = ("model.drop_path_rate=0", "masking.sample_probability=0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    train_cli.add_arguments(parser, default_recipe="distill_cpu_small")
    parser.add_argument(
        "--teacher",
        help="the frozen teacher: a dinolab run directory or checkpoint (its heads are used), a released name "
        "(dinov2_vitl14 ...) or any backbone checkpoint file (its heads are then warmed up first)",
    )
    parser.add_argument("--teacher-weights", help="weights of a released teacher name: a local file or URL")
    parser.add_argument(
        "--student",
        dest="model",
        help="the student's architecture (vit_tiny, vit_small, vit_base, vit_large …); the same as --model here",
    )


def run(args: argparse.Namespace) -> int:
    chosen = [*METHOD_OVERRIDES]
    if args.teacher:
        chosen.append(f"distill.teacher={args.teacher}")
    if args.teacher_weights:
        chosen.append(f"distill.teacher_weights={args.teacher_weights}")
    args.overrides = chosen + list(args.overrides)
    return train_cli.run(args, command="distill")
