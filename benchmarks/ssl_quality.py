"""Does a recipe learn? Pretrain it on built-in real data for several seeds; compare the frozen teacher with the same
architecture at random initialisation and with raw pixels (k-NN, linear, logistic regression; mean ± std), and
show the target-health curves and the wall time.

    python benchmarks/ssl_quality.py --recipe quickstart --datasets digits textures --seeds 0 1 2
    python benchmarks/ssl_quality.py --recipe quickstart --split train-val optim.base_lr=0.002   # for tuning

Datasets (both shipped inside installed packages, nothing is downloaded): ``digits`` (scikit-learn's handwritten
digits, 1257 train / 540 val) and ``textures`` (patches of nine scikit-image photographs, 1260 / 540; val patches
come from parts of the photographs never seen in training). ``--split val`` evaluates on the held-out val set (for
reporting); ``--split train-val`` on a stratified 20 % of train, with the other 80 % as the labelled training set
(for choosing settings without ever looking at val). Runs are resumed when their directory exists, so an
interrupted benchmark continues. Writes ``OUT/results.json``, ``OUT/results.md`` and ``OUT/health_curves.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dinolab.config import apply_overrides
from dinolab.eval import load_image_folder, stratified_split
from dinolab.quickstart.data import write_digits, write_textures
from dinolab.quickstart.run import evaluate_all
from dinolab.train.logger import read_metrics
from dinolab.train.loop import train
from dinolab.train.recipes import get_recipe

DATASETS = {"digits": (write_digits, 8), "textures": (write_textures, 32)}
"""name -> (writer, side of the raw-pixel baseline: the digits' native 8 x 8, the textures' full 32 x 32)."""
HEALTH_KEYS = (
    "health/dino_row_entropy",
    "health/dino_prototypes_used",
    "health/dino_agreement",
    "health/teacher_cls_std",
)


def run_one(args: argparse.Namespace, dataset: str, seed: int) -> dict:
    writer, pixel_side = DATASETS[dataset]
    data = writer(args.out / "data" / dataset)
    run_dir = args.out / "runs" / f"{dataset}_seed{seed}"
    config = apply_overrides(
        get_recipe(args.recipe),
        [f"run.data={data.train}", f"run.output_dir={run_dir}", f"run.seed={seed}", "run.progress=false",
         "run.tensorboard=false", *args.overrides],
    )  # fmt: skip
    start = time.perf_counter()
    result = train(config)
    train_seconds = time.perf_counter() - start
    train_set, val_set = load_image_folder(data.train), load_image_folder(data.val)
    if args.split == "train-val":
        kept, held = stratified_split(train_set.labels, 0.2, seed=0)
        train_set, val_set = train_set.subset(kept, "train-80"), train_set.subset(held, "train-20")
    rows, _, _ = evaluate_all(
        config, result.backbone, train_set, val_set, run_dir / "eval", progress=False, pixel_side=pixel_side
    )
    rows[0].name = "distilled student (its EMA)" if config.distill.enabled else f"pretrained teacher ({args.recipe})"
    metrics = read_metrics(run_dir)
    return {
        "dataset": dataset,
        "seed": seed,
        "train_seconds": train_seconds,
        "iterations": result.steps_done,
        "scores": [asdict(row) for row in rows],
        "curves": {key: [(m["step"], m[key]) for m in metrics if key in m] for key in ("loss/dino", *HEALTH_KEYS)},
    }


def summarise(results: list[dict]) -> str:
    lines = [
        "| dataset | features | k-NN top-1 | linear top-1 | logreg top-1 |",
        "|---|---|---:|---:|---:|",
    ]
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        runs = [r for r in results if r["dataset"] == dataset]
        for index, name in enumerate(row["name"] for row in runs[0]["scores"]):
            cells = []
            for metric in ("knn", "linear", "logreg"):
                values = np.array([r["scores"][index][metric] for r in runs])
                cells.append(f"{values.mean():.1f} ± {values.std():.1f}")
            lines.append(f"| {dataset} | {name} | " + " | ".join(cells) + " |")
    for dataset in dict.fromkeys(r["dataset"] for r in results):
        runs = [r for r in results if r["dataset"] == dataset]
        final = {key: np.mean([r["curves"][key][-1][1] for r in runs]) for key in HEALTH_KEYS}
        minutes = np.mean([r["train_seconds"] for r in runs]) / 60
        lines.append(
            f"\n{dataset}: {len(runs)} seeds, {runs[0]['iterations']} iterations, {minutes:.1f} min of pretraining "
            f"each; final DINO targets: row entropy {final['health/dino_row_entropy']:.2f} log K, "
            f"{final['health/dino_prototypes_used']:.0f} prototypes used, student-teacher agreement "
            f"{final['health/dino_agreement']:.2f}, teacher CLS spread {final['health/teacher_cls_std']:.2f}"
        )
    return "\n".join(lines)


def plot_curves(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    keys = ("loss/dino", *HEALTH_KEYS)
    figure = Figure(figsize=(4 * len(keys), 3.2))
    axes = figure.subplots(1, len(keys))
    for ax, key in zip(axes, keys):
        for r in results:
            steps, values = zip(*r["curves"][key]) if r["curves"][key] else ((), ())
            ax.plot(steps, values, label=f"{r['dataset']} seed {r['seed']}", alpha=0.8)
        ax.set_title(key.split("/")[-1])
        ax.set_xlabel("iteration")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--datasets", nargs="+", default=["digits", "textures"], choices=sorted(DATASETS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--split", choices=("val", "train-val"), default="val")
    parser.add_argument("--out", type=Path, default=Path("ssl_quality"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = [run_one(args, dataset, seed) for dataset in args.datasets for seed in args.seeds]
    table = summarise(results)
    header = f"recipe {args.recipe} {' '.join(args.overrides)}, evaluated on {args.split}"
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(f"{header}\n\n{table}\n")
    plot_curves(results, args.out / "health_curves.png")
    print(header)
    print(table)


if __name__ == "__main__":
    main()
