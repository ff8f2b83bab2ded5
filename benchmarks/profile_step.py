"""Where one training step's time goes: the PyTorch profiler over one step, grouped by phase and by operator.

    python benchmarks/profile_step.py --arch vit_small --batch-size 8 --device cpu --out profile_cpu

Same flags as benchmarks/train_step.py (the step it builds is the same). Prints, and writes to ``OUT/``:

- ``phases.md``: the step's wall time split by the phases the trainer labels (``dinolab.runtime.phase``: teacher,
  student backbone, heads and losses, KoLeo, backward, clipping, optimizer, EMA) and what is outside them;
- ``operators.md``: the operators by self time, and the share of the step spent in matrix products;
- ``matmuls.md``: every matrix product's shape, calls, seconds and GFLOP/s (which products run below the rate);
- ``roofline.md``: the step's FLOPs (``torch.utils.flop_counter``, recomputation included), this device's measured
  fp32/bf16 matmul rate on a large square product, and the fraction of it the step reaches;
- ``trace.json``: the Chrome trace of the profiled step (open in https://ui.perfetto.dev).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from step_timer import time_steps
from torch.profiler import ProfilerActivity, profile
from train_step import count_flops, parse_args, prepare  # benchmarks/: the script's own folder

from dinolab.matmul import onednn_available
from dinolab.train.loop import train_step

MATMUL_OPS = (
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "aten::mkldnn_matmul",
    "mkldnn::_linear_pointwise",  # the oneDNN CPU linear layers (dinolab.matmul)
)  # fmt: skip
ATTENTION_OPS = ("aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
                 "aten::_scaled_dot_product_cudnn_attention", "aten::_flash_attention_forward",
                 "aten::_efficient_attention_forward", "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                 "aten::_scaled_dot_product_flash_attention_backward",
                 "aten::_scaled_dot_product_efficient_attention_backward")  # fmt: skip


def matmul_rate(
    device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 10, trials: int = 3
) -> float:
    """FLOP/s of a large square matrix product on ``device`` (the best of ``trials``, and on CPUs of torch's matmul
    and oneDNN's, whichever library is faster here): the practical peak the step is compared with."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    products = [lambda: a @ b]
    if device.type == "cpu" and onednn_available():
        b_t = b.t().contiguous()
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], ""))
    best = 0.0
    for product in products:
        for _ in range(2):
            product()
        for _ in range(trials):
            _synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                product()
            _synchronize(device)
            best = max(best, 2 * size**3 * repeats / (time.perf_counter() - start))
    return best


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def phase_table(prof: profile, step_seconds: float) -> list[tuple[str, float]]:
    """(phase, seconds) of the profiled step, in order of first appearance, with the unlabelled rest last."""
    totals: dict[str, float] = {}
    for event in prof.events():
        if event.name.startswith("phase:"):
            name = event.name.removeprefix("phase:")
            totals[name] = totals.get(name, 0.0) + event.cpu_time_total / 1e6
    rest = step_seconds - sum(totals.values())
    return [*totals.items(), ("outside the labelled phases", rest)]


def operator_rows(prof: profile, limit: int) -> tuple[list[tuple[str, float, int]], float, float]:
    """The ``limit`` operators with the most self time (name, seconds, calls), the total self time of matrix
    products and of fused attention kernels."""
    averages = prof.key_averages()
    device_time = "self_device_time_total" if any(getattr(a, "self_device_time_total", 0) for a in averages) else None
    key = device_time or "self_cpu_time_total"
    rows = sorted(((a.key, getattr(a, key) / 1e6, a.count) for a in averages), key=lambda r: -r[1])
    matmul = sum(seconds for name, seconds, _ in rows if name in MATMUL_OPS)
    attention = sum(seconds for name, seconds, _ in rows if name in ATTENTION_OPS)
    return rows[:limit], matmul, attention


def _product_flop(name: str, shapes: list) -> int:
    """FLOPs of one matrix product from its recorded input shapes (0 when not a 2-D/batched product)."""
    if name == "mkldnn::_linear_pointwise":  # x [N, in], weight [out, in]
        (rows, fan_in), (fan_out, _) = shapes[0], shapes[1]
        return 2 * rows * fan_in * fan_out
    if name == "aten::mm":
        return 2 * shapes[0][0] * shapes[0][1] * shapes[1][1]
    if name == "aten::addmm":  # bias, a, b
        return 2 * shapes[1][0] * shapes[1][1] * shapes[2][1]
    if name in ("aten::bmm", "aten::baddbmm"):
        a, b = shapes[-2], shapes[-1]
        return 2 * a[0] * a[1] * a[2] * b[2]
    return 0


def matmul_rows(prof: profile) -> list[tuple[str, str, int, float, float]]:
    """(operator, input shapes, calls, seconds, GFLOP/s) of every matrix product shape, slowest in total first."""
    totals: dict[tuple[str, str], list[float]] = {}
    for average in prof.key_averages(group_by_input_shape=True):
        if average.key not in MATMUL_OPS or not average.input_shapes:
            continue
        shapes = [s for s in average.input_shapes if s]
        seconds = average.self_cpu_time_total / 1e6
        row = totals.setdefault((average.key, str(shapes)), [0, 0.0, 0.0])
        row[0] += average.count
        row[1] += seconds
        row[2] += average.count * _product_flop(average.key, shapes)
    rows = [(name, shapes, int(c), s, f / s / 1e9 if s else 0.0) for (name, shapes), (c, s, f) in totals.items()]
    return sorted(rows, key=lambda r: -r[3])


def main() -> None:
    argv = sys.argv[1:]
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument("--out", type=Path, default=Path("profile_step"))
    extra.add_argument("--operators", type=int, default=30, help="rows of the operator table")
    own, rest = extra.parse_known_args(argv)
    args = parse_args(rest)
    ctx, batches, values = prepare(args)
    for step in range(max(args.warmup, 1)):
        train_step(ctx, [batches[step % 2]], values)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    _synchronize(ctx.device)
    with profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        train_step(ctx, [batches[0]], values)
        _synchronize(ctx.device)
        step_seconds = time.perf_counter() - start
    own.out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(own.out / "trace.json"))

    title = (
        f"{args.arch}/{args.patch_size}, batch {args.batch_size}, 2 x {args.global_size} + {args.local_crops} x "
        f"{args.local_size}, {args.prototypes} prototypes, drop-path {args.drop_path}, {args.dtype}, "
        f"{ctx.device}, {torch.get_num_threads()} threads, activation checkpointing "
        f"{args.activation_checkpointing}; profiled step {step_seconds:.2f} s (the profiler "
        "adds its own overhead)"
    )
    phases = phase_table(prof, step_seconds)
    lines = [title, "", "| phase | seconds | share |", "|---|---:|---:|"]
    lines += [f"| {name} | {seconds:.3f} | {seconds / step_seconds:.1%} |" for name, seconds in phases]
    (own.out / "phases.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), "", sep="\n")

    rows, matmul, attention = operator_rows(prof, own.operators)
    total_self = sum(a.self_cpu_time_total for a in prof.key_averages()) / 1e6
    lines = [
        f"matrix products: {matmul:.2f} s self time ({matmul / total_self:.1%}); fused attention kernels: "
        f"{attention:.2f} s ({attention / total_self:.1%}); all operators: {total_self:.2f} s",
        "",
        "| operator | self seconds | calls |",
        "|---|---:|---:|",
        *(f"| `{name}` | {seconds:.3f} | {calls} |" for name, seconds, calls in rows),
    ]
    (own.out / "operators.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), "", sep="\n")

    lines = ["| product | input shapes | calls | seconds | GFLOP/s |", "|---|---|---:|---:|---:|"]
    lines += [f"| `{n}` | {shapes} | {c} | {s:.3f} | {rate:.0f} |" for n, shapes, c, s, rate in matmul_rows(prof)]
    (own.out / "matmuls.md").write_text("\n".join(lines) + "\n")

    flops = count_flops(ctx, batches[1], values)
    # the step's own precision: fp32 matmuls, or bf16 ones under autocast
    peak = matmul_rate(ctx.device, torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    median, _ = time_steps(
        lambda index: train_step(ctx, [batches[index % 2]], values), ctx.device, warmup=0, steps=args.steps
    )
    roofline = {
        "gflop_per_step": round(flops / 1e9, 1),
        "gflop_per_image": round(flops / 1e9 / args.batch_size, 1),
        "step_seconds_unprofiled": round(median, 3),
        "matmul_gflops_measured": round(peak / 1e9, 1),
        "step_at_matmul_rate_seconds": round(flops / peak, 3),
        "fraction_of_matmul_rate": round(flops / peak / median, 3),
    }
    (own.out / "roofline.md").write_text(title + "\n\n" + json.dumps(roofline, indent=1) + "\n")
    print(json.dumps(roofline))


if __name__ == "__main__":
    main()
