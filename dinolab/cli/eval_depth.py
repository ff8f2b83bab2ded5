"""``dinolab eval depth``: linear depth head (256 bins) on frozen patch tokens + CLS, trained (or loaded) then
scored with RMSE, AbsRel, delta1-3 ..."""

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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, choices=["nyu", "kitti", "folder"])
    data.add_argument("--train-root", help="nyu: folder of rgb_*.jpg / sync_depth_*.png (e.g. sync/)")
    data.add_argument("--val-root", help="nyu: e.g. official_splits/test/")
    data.add_argument("--train-split-file", help="nyu: optional list 'rgb depth [focal]'; kitti: Eigen train list")
    data.add_argument("--val-split-file", help="nyu: optional; kitti: Eigen test list")
    data.add_argument("--image-root", help="kitti: raw KITTI root ({date}/{drive}/image_02/data)")
    data.add_argument("--depth-root", help="kitti: annotated depth root ({drive}/proj_depth/groundtruth)")
    data.add_argument("--train-images", help="folder dataset: training images")
    data.add_argument("--train-depths", help="folder dataset: training depth maps (16-bit PNG or .npy)")
    data.add_argument("--val-images", help="folder dataset: validation images")
    data.add_argument("--val-depths", help="folder dataset: validation depth maps")
    data.add_argument("--depth-scale", type=float, default=1000.0, help="folder dataset: PNG value / scale = metres")
    data.add_argument("--min-depth", type=float, help="depth range of bins and scoring (default: dataset's)")
    data.add_argument("--max-depth", type=float, help="(nyu 10, kitti 80, folder 10)")
    data.add_argument("--eval-crop", choices=["none", "nyu_eigen", "kitti_eigen", "kitti_garg"], help="scored region")
    head = parser.add_argument_group("head")
    head.add_argument("--layers", type=int, choices=[1, 4], default=1, help="1 = last block, 4 = 4 spread blocks")
    head.add_argument("--no-cls", action="store_true", help="patch tokens only (default: with the CLS token)")
    head.add_argument("--bins", type=int, default=256)
    head.add_argument("--bin-spacing", choices=["linear", "log"], default="linear")
    head.add_argument("--normalization", choices=["linear", "softmax", "sigmoid"], default="linear")
    head.add_argument("--upsample", type=int, default=4, help="feature upsampling before the 1x1 conv")
    head.add_argument("--head", help="load this head (released .pth or one saved by this command); no training")
    train = parser.add_argument_group("training")
    train.add_argument("--iters", type=int, default=38400)
    train.add_argument("--batch-size", type=int, default=16)
    train.add_argument("--lr", type=float, default=1e-4, help="peak of the one-cycle schedule")
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--sig-lambda", type=float, default=0.85)
    train.add_argument("--sig-warmup-iters", type=int, default=100, help="iterations of the log loss's warm-up")
    train.add_argument("--gradient-weight", type=float, default=0.5, help="0 = scale-invariant log loss only")
    train.add_argument("--crop-size", type=int, nargs=2, metavar=("H", "W"), help="default nyu 416 544, kitti 352 704")
    train.add_argument("--rotate", type=float, help="max rotation in degrees (default nyu 2.5, kitti 1)")
    test = parser.add_argument_group("inference")
    test.add_argument("--window", type=int, help="sliding-window side (default: whole image)")
    test.add_argument("--stride", type=int, default=320)
    test.add_argument("--no-flip", action="store_true", help="no flip averaging")
    test.add_argument("--max-val-images", type=int)
    test.add_argument("--num-pictures", type=int, default=4)


def load_sets(args: argparse.Namespace):
    from dataclasses import replace

    from dinolab.eval.readers import depth as readers

    need_train = not args.head
    if args.dataset == "nyu":
        if not args.val_root or (need_train and not args.train_root):
            raise SystemExit("--dataset nyu needs --val-root (and --train-root to train a head)")
        train = readers.nyu(args.train_root, args.train_split_file) if need_train else None
        val = readers.nyu(args.val_root, args.val_split_file)
    elif args.dataset == "kitti":
        if not (args.image_root and args.depth_root and args.val_split_file) or (
            need_train and not args.train_split_file
        ):
            raise SystemExit(
                "--dataset kitti needs --image-root, --depth-root, --val-split-file (+ --train-split-file)"
            )
        train = readers.kitti(args.image_root, args.depth_root, args.train_split_file) if need_train else None
        val = readers.kitti(args.image_root, args.depth_root, args.val_split_file)
    else:
        if not (args.val_images and args.val_depths) or (need_train and not (args.train_images and args.train_depths)):
            raise SystemExit("--dataset folder needs --val-images, --val-depths (+ --train-images, --train-depths)")
        train = readers.folder_pair(args.train_images, args.train_depths, args.depth_scale) if need_train else None
        val = readers.folder_pair(args.val_images, args.val_depths, args.depth_scale)
    overrides = {
        k: v
        for k, v in (("min_depth", args.min_depth), ("max_depth", args.max_depth), ("eval_crop", args.eval_crop))
        if v is not None
    }
    if overrides:
        train = replace(train, **overrides) if train is not None else None
        val = replace(val, **overrides)
    return train, val


def run(args: argparse.Namespace) -> int:
    from dinolab.eval import depth as dep
    from dinolab.eval.heads import Depther, depth_head_from_checkpoint, make_depth_head, official_depth_blocks

    train_set, val_set = load_sets(args)
    device = resolve_device(args.device)
    backbone = backbone_from_args(args)
    blocks = 1 if args.layers == 1 else official_depth_blocks(backbone.n_blocks)
    head_kwargs = dict(
        min_depth=val_set.min_depth,
        max_depth=val_set.max_depth,
        bin_spacing=args.bin_spacing,
        normalization=args.normalization,
        upsample=args.upsample,
    )
    if args.head:
        head = depth_head_from_checkpoint(args.head, **head_kwargs)
    else:
        head = make_depth_head(backbone, blocks, with_cls=not args.no_cls, n_bins=args.bins, **head_kwargs)
    expected = (1 if isinstance(blocks, int) else len(blocks)) * backbone.embed_dim * (1 if args.no_cls else 2)
    if head.conv_depth.in_channels != expected:
        raise SystemExit(
            f"{args.head}: head reads {head.conv_depth.in_channels} channels but {args.model} with --layers "
            f"{args.layers}{' --no-cls' if args.no_cls else ''} gives {expected}"
        )
    model = Depther(backbone, head, blocks, with_cls=not args.no_cls)
    model.feature_dtype = args.dtype
    output = args.output
    record: dict[str, object] = {"task": "depth", "dataset": val_set.name, "args": resolved_arguments(args)}
    if not args.head:
        assert train_set is not None
        kitti = args.dataset == "kitti"
        augmentation = dep.DepthAugmentation(
            crop_size=tuple(args.crop_size) if args.crop_size else ((352, 704) if kitti else (416, 544)),
            rotate_degrees=args.rotate if args.rotate is not None else (1.0 if kitti else 2.5),
        )
        config = from_namespace(dep.DepthTrainConfig, args)
        losses = dep.train_depth(
            model, dep.DepthTrainDataset(train_set, augmentation), config, device, not args.no_progress
        )
        record["train_loss"] = loss_summary(losses)
        record["head"] = str(save_head(output / "head.pth", model.head, resolved_arguments(args)))
    inference = dep.DepthInference(window=args.window, stride=args.stride, flip=not args.no_flip)
    results = dep.evaluate_depth(model, val_set, inference, evaluation_options(args))
    return finish(output, record, results, val_set.name)
