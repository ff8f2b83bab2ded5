"""Time one full DINOv2 training step (teacher forward, student forward, losses, backward, clip, AdamW, EMA).

One configuration, one JSON line (median step time after warm-up, peak memory):

    python benchmarks/train_step.py --arch vit_small --batch-size 8 --dtype fp32 --device cpu

The naive way the iBOT code does it with ``--baseline``: a pass per crop size, the heads on every token of every
crop (local crops included) and the iBOT loss dense over all global-crop patches, masked after (as iBOT's
``main_ibot.py`` and ``models/head.py`` do), stochastic depth by zeroing, fp32. Then every technique added one at
a time, each configuration in its own process (so peak resident memory is measured cleanly), printed as a table of
ratios against the baseline:

    python benchmarks/train_step.py --compare --arch vit_small --batch-size 8 --device cpu

With ``lightly`` installed (``pip install lightly``; dev-only), ``--compare`` adds the same step assembled from
lightly's DINOv2 components and timm's ViT (benchmarks/peer_lightly.py) and prints dinolab's default step (no
flags: what the trainer runs) against it and against the baseline; ``--ibot-repo PATH`` (a checkout of
github.com/bytedance/ibot) adds the official iBOT code's step (benchmarks/peer_ibot.py). ``--rows 0,10,lightly,ibot``
runs only those rows.

Random data and weights; nothing is downloaded. CPU memory is the peak resident set size of the process;
CUDA memory is ``torch.cuda.max_memory_allocated`` over the timed steps.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from naive_meta_arch import IBOTStyleMetaArch  # benchmarks/: the script's own folder is on sys.path
from step_timer import time_steps

from dinolab.data.augmentation import AugmentationConfig, MultiCropViews
from dinolab.data.collate import Batch, collate_views
from dinolab.data.masking import MaskingGenerator
from dinolab.matmul import cpu_matmul, set_cpu_matmul
from dinolab.runtime import reuse_freed_memory
from dinolab.train.config import HeadsConfig, LossConfig, ModelConfig, OptimConfig, RunConfig, TrainConfig
from dinolab.train.loop import StepContext, train_step
from dinolab.train.meta_arch import SSLMetaArch
from dinolab.train.parallel import (
    apply_activation_checkpointing,
    choose_activation_checkpointing,
    choose_cpu_linear,
)
from dinolab.train.param_groups import apply_schedules, get_param_groups

H100_BF16_DENSE_TFLOPS = 989.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--depth", type=int, default=0, help="0 = the variant's depth")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step")
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-size", type=int, default=98)
    parser.add_argument("--local-crops", type=int, default=8)
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--drop-path", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--baseline", action="store_true", help="the naive step: all techniques off, fp32")
    parser.add_argument("--no-packing", action="store_true", help="one student pass per crop size")
    parser.add_argument("--drop-path-by-zeroing", action="store_true", help="compute every sample, then zero")
    parser.add_argument(
        "--heads-on-all-patches", action="store_true", help="heads on every token, dense iBOT loss (the iBOT code)"
    )
    parser.add_argument("--no-chunked-loss", action="store_true", help="hold the full [rows, K] student logits")
    parser.add_argument(
        "--foreach-adamw", action="store_true", help="torch's foreach AdamW (the trainer uses the fused kernel)"
    )
    parser.add_argument(
        "--cpu-matmul",
        choices=["auto", "blas", "onednn"],
        default="auto",
        help="as run.cpu_matmul (auto: what the trainer chooses on this CPU, by timing both)",
    )
    parser.add_argument(
        "--unfused-branches",
        action="store_true",
        help="autograd through the blocks' modules (CPU fp32 training runs dinolab.models.fused's branches)",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile every block")
    parser.add_argument(
        "--activation-checkpointing",
        choices=["auto", "none", "selective", "full"],
        default="auto",
        help="as run.activation_checkpointing (auto: what the trainer chooses for this step and device)",
    )
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="CPU: leave glibc's allocator as it is (the trainer sets dinolab.runtime.reuse_freed_memory)",
    )
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_DENSE_TFLOPS, help="for the MFU (CUDA)")
    parser.add_argument("--compare", action="store_true", help="baseline and each technique, as a table")
    parser.add_argument("--fp32-only", action="store_true", help="with --compare: leave out the bf16 row")
    parser.add_argument(
        "--ibot-repo", default="", help="with --compare: a checkout of the iBOT code, for its row (peer_ibot.py)"
    )
    parser.add_argument(
        "--rows",
        default="",
        help="with --compare: only these rows (ladder indices from 0, 'default', 'lightly', 'ibot'), e.g. 0,default,lightly",
    )
    args = parser.parse_args(argv)
    if args.baseline:
        args.no_packing = args.drop_path_by_zeroing = args.heads_on_all_patches = args.no_chunked_loss = True
        args.foreach_adamw, args.compile, args.cpu_matmul, args.unfused_branches = True, False, "blas", True
        args.dtype, args.system_malloc, args.activation_checkpointing = "fp32", True, "none"
    return args


def random_batch(args: argparse.Namespace, seed: int) -> Batch:
    """A collated batch of random crops with iBOT masks drawn as in training (half the global crops masked)."""
    g = torch.Generator().manual_seed(seed)
    views = [
        MultiCropViews(
            global_crops=[torch.randn(3, args.global_size, args.global_size, generator=g) for _ in range(2)],
            local_crops=[
                torch.randn(3, args.local_size, args.local_size, generator=g) for _ in range(args.local_crops)
            ],
            local_size=args.local_size,
        )
        for _ in range(args.batch_size)
    ]
    grid = args.global_size // args.patch_size
    return collate_views(views, MaskingGenerator(grid), rng=np.random.default_rng(seed))


def build(args: argparse.Namespace) -> StepContext:
    device = torch.device(args.device)
    if device.type == "cpu" and not args.system_malloc:
        reuse_freed_memory()  # as dinolab.train.loop does
    model_cfg = ModelConfig(
        arch=args.arch,
        patch_size=args.patch_size,
        depth=args.depth,
        drop_path_rate=args.drop_path,
        efficient_drop_path=not args.drop_path_by_zeroing,
        packed_sequences=not args.no_packing,
    )
    heads = HeadsConfig(dino_prototypes=args.prototypes, ibot_prototypes=args.prototypes)
    loss = LossConfig(chunked_cross_entropy=not args.no_chunked_loss)
    arch = IBOTStyleMetaArch if args.heads_on_all_patches else SSLMetaArch
    model = arch(model_cfg, heads, loss, img_size=args.global_size).to(device)
    config = TrainConfig(
        model=model_cfg,
        heads=heads,
        loss=loss,
        crops=AugmentationConfig(
            global_size=args.global_size, local_size=args.local_size, local_crops_number=args.local_crops
        ),
        optim=OptimConfig(batch_size_per_process=args.batch_size),
        run=RunConfig(
            activation_checkpointing=args.activation_checkpointing, dtype=args.dtype, cpu_matmul=args.cpu_matmul
        ),
    )
    # the trainer's choices (dinolab.train.loop), recorded in the result
    args.activation_checkpointing = choose_activation_checkpointing(config, model, device)
    apply_activation_checkpointing(model, args.activation_checkpointing)
    for block in model.student["backbone"].blocks:
        block.fused_branches = not args.unfused_branches
    args.cpu_matmul = choose_cpu_linear(config, model, device) if device.type == "cpu" else "n/a"
    if args.compile:
        for net in (model.student, model.teacher):
            for block in net["backbone"].blocks:
                block.compile_body()
    groups = get_param_groups(model.student, num_blocks=model.student["backbone"].n_blocks)
    optimizer = torch.optim.AdamW(groups, foreach=True) if args.foreach_adamw else torch.optim.AdamW(groups, fused=True)
    apply_schedules(optimizer, lr=1e-4, wd=0.04, last_layer_lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=False)
    return StepContext(model, model, optimizer, scaler, args.dtype, device, OptimConfig())


def count_flops(ctx: StepContext, batch: Batch, values: dict[str, float]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    backend = cpu_matmul()
    set_cpu_matmul("blas")  # the counter knows aten's products, not oneDNN's kernel: the same products either way
    try:
        with FlopCounterMode(display=False) as counter:
            train_step(ctx, [batch], values)
    finally:
        set_cpu_matmul(backend)
    return counter.get_total_flops()


def prepare(args: argparse.Namespace) -> tuple[StepContext, list[Batch], dict[str, float]]:
    """The step, two random batches on its device and the schedule values it reads."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ctx = build(args)
    batches = [random_batch(args, seed).to(ctx.device) for seed in range(2)]
    return ctx, batches, {"teacher_temp": 0.07, "momentum": 0.994}


def run_one(args: argparse.Namespace) -> dict:
    ctx, batches, values = prepare(args)
    cuda = ctx.device.type == "cuda"
    step_time, peak_mb = time_steps(
        lambda index: train_step(ctx, [batches[index % 2]], values), ctx.device, args.warmup, args.steps
    )
    result = {
        "step_time_s": round(step_time, 4),
        "images_per_s": round(args.batch_size / step_time, 2),
        "peak_memory_mb": round(peak_mb, 1),
        "arch": args.arch,
        "batch_size": args.batch_size,
        "crops": f"2x{args.global_size} + {args.local_crops}x{args.local_size}",
        "prototypes": args.prototypes,
        "drop_path": args.drop_path,
        "dtype": args.dtype,
        "device": str(ctx.device),
        "threads": torch.get_num_threads(),
        "packing": not args.no_packing,
        "efficient_drop_path": not args.drop_path_by_zeroing,
        "heads_on_masked_only": not args.heads_on_all_patches,
        "chunked_loss": not args.no_chunked_loss,
        "fused_adamw": not args.foreach_adamw,
        "cpu_matmul": args.cpu_matmul,
        "compile": args.compile,
        "activation_checkpointing": args.activation_checkpointing,
        "fused_branches": not args.unfused_branches,
        "reuse_freed_memory": ctx.device.type == "cpu" and not args.system_malloc,
        "torch": torch.__version__,
    }
    if cuda:
        flops = count_flops(ctx, batches[0], values)
        result["tflops_per_step"] = round(flops / 1e12, 3)
        result["mfu"] = round(flops / step_time / (args.peak_tflops * 1e12), 4)
        result["gpu"] = torch.cuda.get_device_name()
    return result


# Each row adds one technique to the previous row; the last is the step as the trainer runs it with no flags. The
# rows before it run torch's own CPU linear path (--cpu-matmul blas); the last takes the trainer's choices on this
# device (CPU linear backend, activation checkpointing), which its JSON record names.
_OFF = ["--activation-checkpointing", "none", "--system-malloc", "--cpu-matmul", "blas", "--unfused-branches"]
_BLAS = ["--cpu-matmul", "blas"]
LADDER: list[tuple[str, list[str]]] = [
    ("baseline (iBOT-style, fp32)", ["--baseline"]),
    (
        "+ heads on CLS and masked tokens only",
        ["--no-packing", "--drop-path-by-zeroing", "--no-chunked-loss", "--foreach-adamw", *_OFF],
    ),
    ("+ efficient stochastic depth", ["--no-packing", "--no-chunked-loss", "--foreach-adamw", *_OFF]),
    ("+ sequence packing", ["--no-chunked-loss", "--foreach-adamw", *_OFF]),
    ("+ fused AdamW", ["--no-chunked-loss", *_OFF]),
    ("+ tiled prototype cross-entropy", [*_OFF]),
    ("+ freed memory reused (CPU allocator)", [*_BLAS, "--activation-checkpointing", "none", "--unfused-branches"]),
    ("+ fused block branches (CPU fp32)", [*_BLAS, "--activation-checkpointing", "none"]),
    ("+ selective activation checkpointing", [*_BLAS, "--activation-checkpointing", "selective"]),
    ("+ full activation checkpointing", [*_BLAS, "--activation-checkpointing", "full"]),
    ("+ bf16 autocast", [*_BLAS, "--activation-checkpointing", "full", "--dtype", "bf16"]),
    ("dinolab's default step (no flags)", []),
]


def compare(argv: list[str], rows_wanted: str, ibot_repo: str = "") -> None:
    """Run the ladder (or the rows ``rows_wanted`` names: ladder indices, ``default`` for the last, ``lightly``,
    ``ibot``), each row in its
    own process, then the peer steps (lightly's when it is installed, the iBOT code's with ``ibot_repo``); print a
    table of ratios against the baseline and dinolab's default step against each reference."""
    shared = [a for a in argv if a not in ("--compare", "--fp32-only")]
    if "--rows" in shared:
        del shared[shared.index("--rows") : shared.index("--rows") + 2]
    wanted = set(rows_wanted.split(",")) if rows_wanted else None
    ladder = [
        (name, [sys.executable, __file__, *shared, *flags])
        for index, (name, flags) in enumerate(LADDER)
        if not ("--fp32-only" in argv and "bf16" in flags)
        and (wanted is None or str(index) in wanted or ("default" in wanted and index == len(LADDER) - 1))
    ]
    if importlib.util.find_spec("lightly") and (wanted is None or "lightly" in wanted):
        peer = Path(__file__).with_name("peer_lightly.py")
        ladder.append((PEER_ROW, [sys.executable, str(peer), *shared]))
    if ibot_repo and (wanted is None or "ibot" in wanted):
        ladder.append((IBOT_ROW, [sys.executable, str(Path(__file__).with_name("peer_ibot.py")), *shared]))
    rows = []
    for name, command in ladder:
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        rows.append((name, result))
        print(json.dumps({"config": name, **result}), flush=True)
    base = rows[0][1]
    print("\n| configuration | step time (s) | images/s | peak memory (MB) | speed-up | memory ratio |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        speedup = base["step_time_s"] / r["step_time_s"]
        memory = r["peak_memory_mb"] / base["peak_memory_mb"]
        print(
            f"| {name} | {r['step_time_s']:.3f} | {r['images_per_s']:.2f} | {r['peak_memory_mb']:.0f} "
            f"| {speedup:.2f}x | {memory:.2f} |"
        )
    named = dict(rows)
    default = named.get(LADDER[-1][0])
    for reference in (LADDER[0][0], PEER_ROW, IBOT_ROW):
        if default and reference in named:
            other = named[reference]
            print(
                f"\ndinolab's default step vs {reference}: {other['step_time_s'] / default['step_time_s']:.2f}x "
                f"its speed, {default['peak_memory_mb'] / other['peak_memory_mb']:.2f} of its peak memory"
            )


PEER_ROW = "peer: lightly's DINOv2 components + timm ViT (benchmarks/peer_lightly.py)"
IBOT_ROW = "peer: the iBOT code's step (benchmarks/peer_ibot.py)"


def main() -> None:
    argv = sys.argv[1:]
    args = parse_args(argv)
    if args.compare:
        compare(argv, args.rows, args.ibot_repo)
    else:
        print(json.dumps(run_one(args)), flush=True)


if __name__ == "__main__":
    main()
