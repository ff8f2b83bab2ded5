"""End-to-end ``dinolab embed`` throughput (decode + transform + forward) beside timm on the same images.

    python benchmarks/embed_throughput.py --model vit_small --images 64 --dtypes fp32 bf16

Writes ``--images`` generated JPEGs (640x480) to a temporary folder, runs ``dinolab embed`` on them (random
weights, official 256 -> 224 eval transform) and reads its ``summary.json``; then runs timm's DINOv2 ViT of the
same size through the very same data pipeline (``extract_features`` over ``ImageFileDataset``), so only the
model differs. Both first run untimed on a few images (CUDA context, kernel selection, worker start-up would
otherwise be charged to whichever goes first), then alternate which goes first over ``--repeats``. Prints one
JSON line per dtype with the median images/s of each and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dinolab.cli import embed as embed_command
from dinolab.data.images import ImageFileDataset, list_images
from dinolab.data.transforms import make_eval_transform
from dinolab.features.extract import extract_features

TIMM_NAMES = {"vit_small": "vit_small_patch14_dinov2", "vit_base": "vit_base_patch14_dinov2"}


def write_images(folder: Path, count: int, seed: int = 0) -> None:
    """Photo-sized JPEGs: smooth colour gradients plus noise, so decoding costs what it does for photos."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:480, 0:640]
    for index in range(count):
        base = np.stack([rows * rng.random(), cols * rng.random(), (rows + cols) * rng.random() / 2], -1) / 2.5
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:04d}.jpg", quality=90)


def time_dinolab(model: str, folder: Path, out: Path, args: argparse.Namespace, dtype: str) -> float:
    argv = ["embed", model, str(folder), "--output", str(out), "--dtype", dtype, "--no-progress"]
    argv += ["--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers), "--device", args.device]
    # the `dinolab embed` command itself, parsed on its own so no other subcommand's imports are needed
    parser = argparse.ArgumentParser(prog="dinolab embed")
    embed_command.add_arguments(parser)
    if embed_command.run(parser.parse_args(argv[1:])) != 0:
        raise RuntimeError("dinolab embed failed")
    return json.loads((out / "summary.json").read_text())["images_per_s"]


def time_timm(model: torch.nn.Module, folder: Path, args: argparse.Namespace, dtype: str) -> float:
    dataset = ImageFileDataset(list_images(folder), make_eval_transform(256, 224))
    start = time.perf_counter()
    extracted = extract_features(
        model,
        dataset,
        feature_fn=lambda m, x: {"cls": m(x)},  # timm's token pooling after the final norm = the CLS feature
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        dtype=dtype,
        device=args.device,
        progress=False,
    )
    return len(extracted.indices) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small", choices=list(TIMM_NAMES))
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each pipeline per dtype")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup-images", type=int, default=8, help="images of the untimed first run")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    import timm

    timm_model = timm.create_model(TIMM_NAMES[args.model], pretrained=False, img_size=224, num_classes=0).eval()
    with tempfile.TemporaryDirectory() as tmp:
        folder, warm = Path(tmp) / "images", Path(tmp) / "warm"
        folder.mkdir()
        warm.mkdir()
        write_images(folder, args.images)
        write_images(warm, args.warmup_images, seed=1)
        for dtype in args.dtypes:
            time_dinolab(args.model, warm, Path(tmp) / "warm_out", args, dtype)
            time_timm(timm_model, warm, args, dtype)
            times: dict[str, list[float]] = {"dinolab": [], "timm": []}
            for repeat in range(args.repeats):
                for name in ("dinolab", "timm") if repeat % 2 == 0 else ("timm", "dinolab"):
                    if name == "dinolab":
                        speed = time_dinolab(args.model, folder, Path(tmp) / f"out_{dtype}", args, dtype)
                    else:
                        speed = time_timm(timm_model, folder, args, dtype)
                    times[name].append(speed)
            ours, theirs = statistics.median(times["dinolab"]), statistics.median(times["timm"])
            record = {
                "model": args.model,
                "images": args.images,
                "dtype": dtype,
                "device": args.device,
                "batch_size": args.batch_size,
                "num_workers": args.num_workers,
                "threads": torch.get_num_threads(),
                "repeats": args.repeats,
                "dinolab_embed_images_per_s": round(ours, 2),
                "timm_images_per_s": round(theirs, 2),
                "ratio_vs_timm": round(ours / theirs, 3),
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
