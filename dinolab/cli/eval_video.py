"""``dinolab eval video``: frame CLS features pooled over time + a linear classifier; top-1 accuracy."""

from __future__ import annotations

import argparse

from dinolab.cli.eval_dense import add_common_arguments, resolved_arguments, write_json
from dinolab.cli.options import backbone_from_args
from dinolab.config import from_namespace
from dinolab.runtime import resolve_device


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    data = parser.add_argument_group("data (class/video.mp4 files or class/video_id/frame_0001.jpg folders)")
    data.add_argument("--train", help="training videos folder (class sub-folders)")
    data.add_argument("--val", help="validation videos folder")
    data.add_argument("--root", help="with --train-list/--val-list: the folder the lists are relative to")
    data.add_argument("--train-list", help="UCF101-style list (trainlist01.txt)")
    data.add_argument("--val-list", help="UCF101-style list (testlist01.txt)")
    model = parser.add_argument_group("features and classifier")
    model.add_argument("--frames", type=int, default=8, help="frames sampled uniformly per video")
    model.add_argument("--temporal", choices=["mean", "concat"], default="mean")
    model.add_argument("--resize-size", type=int, default=256)
    model.add_argument("--crop-size", type=int, default=224)
    model.add_argument("--classifier", choices=["logreg", "sgd"], default="logreg")
    model.add_argument("--C", type=float, default=1.0, help="inverse L2 regularisation strength")


def run(args: argparse.Namespace) -> int:
    from dinolab.eval.readers.video import video_folders
    from dinolab.eval.video import VideoConfig, evaluate_video

    if args.train_list and args.val_list and args.root:
        train = video_folders(args.root, args.train_list)
        val = video_folders(args.root, args.val_list, classes=train.classes)
    elif args.train and args.val:
        train = video_folders(args.train)
        val = video_folders(args.val, classes=train.classes)
    else:
        raise SystemExit("give --train and --val folders, or --root with --train-list and --val-list")
    config = from_namespace(VideoConfig, args, num_frames=args.frames)
    model = backbone_from_args(args)
    results = evaluate_video(
        model, train, val, config, resolve_device(args.device), args.num_workers, not args.no_progress
    )
    record = {"task": "video", "dataset": val.name, "args": resolved_arguments(args), **results.to_dict()}
    path = write_json(args.output / "results.json", record)
    print(f"{val.name}: {results.summary_line()} -> {path}")
    return 0
