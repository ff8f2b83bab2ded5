"""What the target-health statistics cost: one training step with and without them, interleaved in one process.

    python benchmarks/health_overhead.py --recipe quickstart --steps 10
    python benchmarks/health_overhead.py --recipe default model.depth=2 optim.batch_size_per_process=8 --steps 3

The statistics are computed on logging steps only (every ``run.log_every`` iterations), so a run pays
``extra / log_every`` per iteration on average; both figures are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dinolab.config import apply_overrides
from dinolab.data import MultiCropAugmentation
from dinolab.data.collate import collate_views
from dinolab.data.masking import MaskingGenerator
from dinolab.train.distributed import init_distributed
from dinolab.train.loop import StepContext, build_model, make_schedules, train_step
from dinolab.train.param_groups import apply_schedules, get_param_groups
from dinolab.train.recipes import get_recipe


def synthetic_batch(config, seed: int):
    """Crops of random images through the recipe's own augmentation and masking (no files needed)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    augmentation = MultiCropAugmentation(config.crops)
    side = config.crops.global_size
    views = []
    for _ in range(config.optim.batch_size_per_process):
        pixels = (torch.rand(side, side, 3, generator=generator) * 255).to(torch.uint8).numpy()
        views.append(augmentation(Image.fromarray(pixels)))
    grid = side // config.model.patch_size
    return collate_views(views, MaskingGenerator((grid, grid)), config.masking.ratio_min_max, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    config = apply_overrides(get_recipe(args.recipe), ["run.device=cpu", *args.overrides])
    env = init_distributed("cpu")
    torch.manual_seed(0)
    model = build_model(config, env)
    groups = get_param_groups(model.student, num_blocks=model.student["backbone"].n_blocks)
    optimizer = torch.optim.AdamW(groups)
    ctx = StepContext(
        model, model, optimizer, torch.amp.GradScaler("cpu", enabled=False), "fp32", env.device, config.optim
    )
    batches = [synthetic_batch(config, seed) for seed in range(2)]
    values = make_schedules(config, config.optim.batch_size_per_process).values(config.optim.total_iters // 2)
    apply_schedules(optimizer, lr=values["lr"], wd=values["wd"], last_layer_lr=values["last_layer_lr"])
    times: dict[bool, list[float]] = {False: [], True: []}
    for step in range(args.steps + 1):
        for with_health in (False, True):
            start = time.perf_counter()
            train_step(ctx, [batches[step % 2]], values, with_health=with_health)
            if step:  # the first round warms up
                times[with_health].append(time.perf_counter() - start)
    plain, health = statistics.median(times[False]), statistics.median(times[True])
    extra = health - plain
    print(f"recipe {args.recipe} {' '.join(args.overrides)}: {torch.get_num_threads()} threads")
    print(
        f"step without health {plain:.4f} s, with health {health:.4f} s: +{extra:.4f} s (+{100 * extra / plain:.1f} %)"
    )
    print(f"per iteration at run.log_every={config.run.log_every}: +{100 * extra / plain / config.run.log_every:.2f} %")


if __name__ == "__main__":
    main()
