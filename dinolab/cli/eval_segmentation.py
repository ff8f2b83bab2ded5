"""``dinolab eval segmentation``: linear head on frozen patch tokens, trained (or loaded) then scored by mIoU."""

from __future__ import annotations

import argparse

from dinolab.cli.eval_dense import (
    add_common_arguments,
    evaluation_options,
    finish,
    loss_summary,
    resolved_arguments,
    save_head,
)
from dinolab.cli.options import backbone_from_args
from dinolab.config import from_namespace
from dinolab.runtime import resolve_device

DEFAULT_SPLITS = {"ade20k": ("training", "validation"), "voc2012": ("train", "val"), "cityscapes": ("train", "val")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, choices=["ade20k", "voc2012", "cityscapes", "folder"])
    data.add_argument("--root", help="dataset root (ade20k, voc2012, cityscapes)")
    data.add_argument("--train-split", help="default: training (ade20k) / train")
    data.add_argument("--val-split", help="default: validation (ade20k) / val")
    data.add_argument("--train-images", help="folder dataset: training images")
    data.add_argument("--train-masks", help="folder dataset: training masks (PNG, class ids, 255 = ignore)")
    data.add_argument("--val-images", help="folder dataset: validation images")
    data.add_argument("--val-masks", help="folder dataset: validation masks")
    data.add_argument("--num-classes", type=int, help="folder dataset: number of classes")
    data.add_argument("--reduce-zero-label", action="store_true", help="folder dataset: mask 0 = ignore, ids from 1")
    head = parser.add_argument_group("head")
    head.add_argument("--layers", type=int, choices=[1, 4], default=1, help="1 = linear (last block), 4 = last 4")
    head.add_argument("--head", help="load this head (released mmseg .pth or one saved by this command); no training")
    train = parser.add_argument_group("training (the released recipe by default)")
    train.add_argument("--iters", type=int, default=40000)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--weight-decay", type=float, default=1e-4)
    train.add_argument("--warmup-iters", type=int, default=1500)
    train.add_argument("--crop-size", type=int, default=512)
    train.add_argument("--scale", type=int, nargs=2, default=(2048, 512), metavar=("LONG", "SHORT"))
    train.add_argument("--ratio-range", type=float, nargs=2, default=(0.5, 2.0), metavar=("LOW", "HIGH"))
    train.add_argument("--no-photometric", action="store_true", help="no colour jitter")
    test = parser.add_argument_group("inference")
    test.add_argument("--window", type=int, default=512, help="sliding-window side")
    test.add_argument("--stride", type=int, default=341)
    test.add_argument("--test-short-side", type=int, default=512, help="test resize of the short side (0 = none)")
    test.add_argument("--ms", action="store_true", help='"+ms": scales 1.0, 1.32, 1.73, 2.28, 3.0 with flips')
    test.add_argument("--scales", type=float, nargs="+", help="test scales (overrides --ms)")
    test.add_argument("--flip", action="store_true", help="average with horizontally flipped predictions")
    test.add_argument("--max-val-images", type=int, help="score only the first N validation images")
    test.add_argument("--num-pictures", type=int, default=4, help="prediction pictures written to OUTPUT/pictures")


def load_sets(args: argparse.Namespace):
    from dinolab.eval.readers import segmentation as readers

    if args.dataset == "folder":
        needed = ("train_images", "train_masks", "val_images", "val_masks", "num_classes")
        missing = [f"--{n.replace('_', '-')}" for n in needed if getattr(args, n) is None]
        if args.head:  # evaluation only: the training pair is not needed
            missing = [m for m in missing if not m.startswith("--train")]
        if missing:
            raise SystemExit(f"--dataset folder needs {', '.join(missing)}")
        train = None
        if args.train_images:
            train = readers.folder_pair(
                args.train_images, args.train_masks, args.num_classes, reduce_zero_label=args.reduce_zero_label
            )
        val = readers.folder_pair(
            args.val_images, args.val_masks, args.num_classes, reduce_zero_label=args.reduce_zero_label
        )
        return train, val
    if not args.root:
        raise SystemExit(f"--dataset {args.dataset} needs --root")
    reader = getattr(readers, args.dataset)
    train_split, val_split = DEFAULT_SPLITS[args.dataset]
    train = None if args.head else reader(args.root, args.train_split or train_split)
    return train, reader(args.root, args.val_split or val_split)


def run(args: argparse.Namespace) -> int:
    from dinolab.eval import segmentation as seg
    from dinolab.eval.heads import Segmenter, seg_head_from_checkpoint

    train_set, val_set = load_sets(args)
    device = resolve_device(args.device)
    model = Segmenter(backbone_from_args(args), val_set.num_classes, seg.segmentation_blocks(args.layers))
    model.feature_dtype = args.dtype
    output = args.output
    record: dict[str, object] = {"task": "segmentation", "dataset": val_set.name, "args": resolved_arguments(args)}
    if args.head:
        head = seg_head_from_checkpoint(args.head)
        expected = (model.head.conv_seg.in_channels, val_set.num_classes)
        if (head.conv_seg.in_channels, head.conv_seg.out_channels) != expected:
            raise SystemExit(
                f"{args.head}: head reads {head.conv_seg.in_channels} channels into {head.conv_seg.out_channels} "
                f"classes, but {args.model} with --layers {args.layers} gives {expected[0]} channels and "
                f"{val_set.name} has {expected[1]} classes"
            )
        model.head = head
    else:
        assert train_set is not None
        augmentation = from_namespace(seg.SegAugmentation, args, photometric=not args.no_photometric)
        config = from_namespace(seg.SegTrainConfig, args, warmup_iters=min(args.warmup_iters, args.iters))
        losses = seg.train_segmentation(
            model, seg.SegTrainDataset(train_set, augmentation), config, device, not args.no_progress
        )
        record["train_loss"] = loss_summary(losses)
        record["head"] = str(save_head(output / "head.pth", model.head, resolved_arguments(args)))
    scales = tuple(args.scales) if args.scales else (seg.MS_SCALES if args.ms else (1.0,))
    inference = seg.SegInference(
        window=args.window,
        stride=args.stride,
        scales=scales,
        flip=args.flip or (args.ms and not args.scales),
        short_side=args.test_short_side or None,
    )
    results = seg.evaluate_segmentation(model, val_set, inference, evaluation_options(args))
    return finish(output, record, results, val_set.name)
