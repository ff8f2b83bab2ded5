"""Inference speed of a dinolab backbone (feature extraction), beside timm's ViT of the same size.

    python benchmarks/inference.py --model vit_small --batch-size 32 --image-size 224 --dtype bf16 --steps 10

Random weights, random input, ``torch.inference_mode``, the same autocast as ``dinolab embed``. Prints one JSON
line: median step time after warm-up, images/s, peak memory (CUDA: ``torch.cuda.max_memory_allocated`` per model;
CPU: the process's peak resident set size, read with ``resource``), and, when timm is installed, the same for
``timm``'s DINOv2 ViT (``vit_small_patch14_dinov2`` …) timed interleaved with ours in the same process, with the
ratio ``dinolab_images_per_s / timm_images_per_s``. Before timing, timm's random weights are loaded into our model
and both outputs are compared, so the two time the same computation.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch
from torch import Tensor, nn

from dinolab.hub import load_strict, to_dinov2_state_dict
from dinolab.models.vit import ARCHS, build_vit
from dinolab.runtime import autocast_context

TIMM_NAMES = {
    "vit_small": "vit_small_patch14_dinov2",
    "vit_base": "vit_base_patch14_dinov2",
    "vit_large": "vit_large_patch14_dinov2",
    "vit_giant2": "vit_giant_patch14_dinov2",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_small", choices=list(ARCHS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--pos-embed-size",
        type=int,
        help="image size the position embedding is stored for (default: --image-size, like timm's model; "
        "518 = the released checkpoints, which then interpolate it on every forward)",
    )
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per model first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-timm", action="store_true", help="time dinolab only")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler op tables (one step each)")
    return parser.parse_args(argv)


def peak_rss_mb() -> float:
    # Linux reports ru_maxrss in KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def forward_step(model: nn.Module, images: Tensor, device: torch.device, dtype: str) -> float:
    """One forward pass; seconds of wall time (the device synchronised on both ends)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode(), autocast_context(device, dtype):
        model(images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def build_timm(name: str, image_size: int, device: torch.device) -> nn.Module | None:
    try:
        import timm
    except ImportError:
        return None
    return timm.create_model(name, pretrained=False, img_size=image_size, num_classes=0).to(device).eval()


@torch.inference_mode()
def max_output_difference(ours: nn.Module, timm_model: nn.Module, images: Tensor) -> float:
    """Load timm's random weights into our model and compare the CLS outputs (fp32): the two must compute the same."""
    load_strict(ours, to_dinov2_state_dict(timm_model.state_dict()), source="timm model")
    return (ours(images[:2].float()) - timm_model(images[:2].float())).abs().max().item()


def time_models(
    models: dict[str, nn.Module], images: Tensor, device: torch.device, args: argparse.Namespace
) -> dict[str, dict[str, float]]:
    """Warm up, then time the models interleaved (alternating which goes first) so both see the same load."""
    for model in models.values():
        for _ in range(args.warmup):
            forward_step(model, images, device, args.dtype)
    times: dict[str, list[float]] = {name: [] for name in models}
    peaks: dict[str, float] = dict.fromkeys(models, 0.0)
    names = list(models)
    for step in range(args.steps):
        for name in names if step % 2 == 0 else reversed(names):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times[name].append(forward_step(models[name], images, device, args.dtype))
            if device.type == "cuda":
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) / 2**20)
    results = {}
    for name in names:
        step_time = statistics.median(times[name])
        results[name] = {
            "step_time_s": round(step_time, 5),
            "images_per_s": round(images.shape[0] / step_time, 2),
            "peak_memory_mb": round(peaks[name], 1) if device.type == "cuda" else None,
        }
    return results


def profile(models: dict[str, nn.Module], images: Tensor, device: torch.device, dtype: str) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_key = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    for name, model in models.items():
        with torch_profile(activities=activities) as prof:
            forward_step(model, images, device, dtype)
        print(f"===== {name}", file=sys.stderr)
        print(prof.key_averages().table(sort_by=sort_key, row_limit=18), file=sys.stderr)


def main(argv: list[str] | None = None) -> dict[str, object]:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    ours = build_vit(args.model, img_size=args.pos_embed_size or args.image_size, init_values=1.0).to(device).eval()
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    for _ in range(args.warmup):  # alone first, so the CPU peak RSS below is ours without timm's model
        forward_step(ours, images, device, args.dtype)
    rss_ours = peak_rss_mb()
    models = {"dinolab": ours}
    record: dict[str, object] = {
        "model": args.model,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "pos_embed_size": args.pos_embed_size or args.image_size,
        "dtype": args.dtype,
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "warmup": args.warmup,
    }
    timm_name = TIMM_NAMES.get(args.model)
    timm_model = None if args.no_timm or timm_name is None else build_timm(timm_name, args.image_size, device)
    if timm_model is not None:
        if record["pos_embed_size"] == args.image_size:
            record["max_abs_diff_vs_timm_fp32"] = max_output_difference(ours, timm_model, images)
        models["timm"] = timm_model
    if args.profile:
        profile(models, images, device, args.dtype)
    results = time_models(models, images, device, args)
    record.update(results["dinolab"])
    if device.type == "cpu":
        record["peak_memory_mb"] = round(rss_ours, 1)
        record["peak_memory_kind"] = "peak RSS of the process after dinolab's warm-up, before timm was built"
    else:
        record["peak_memory_kind"] = "torch.cuda.max_memory_allocated during one step"
    if "timm" in results:
        timm_result = {"model": timm_name, **results["timm"]}
        if device.type == "cpu":
            timm_result["peak_memory_mb"] = round(peak_rss_mb(), 1)
            timm_result["peak_memory_kind"] = "peak RSS of the process with both models (not timm's alone)"
        record["timm"] = timm_result
        record["ratio_vs_timm"] = round(results["dinolab"]["images_per_s"] / results["timm"]["images_per_s"], 3)
    elif not args.no_timm:
        record["timm"] = None if timm_name else f"no timm model for {args.model}"
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
