"""The whole loop on built-in data: pretrain a small ViT with the DINOv2 method, evaluate its frozen features
against the same architecture at random initialisation and against raw pixels, and write a report."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dinolab.config import apply_overrides
from dinolab.eval import (
    ExtractionConfig,
    Features,
    KnnConfig,
    LinearConfig,
    LogRegConfig,
    evaluate_classification,
    extract_labelled,
    load_image_folder,
)
from dinolab.eval import (
    write_report as write_eval_report,
)
from dinolab.hub import load_backbone
from dinolab.quickstart.data import write_digits, write_photos
from dinolab.quickstart.report import (
    ScoreRow,
    grey_images,
    plot_neighbours,
    plot_training_curves,
    write_report,
)
from dinolab.train.config import TrainConfig
from dinolab.train.loop import train
from dinolab.train.meta_arch import build_backbone
from dinolab.train.recipes import get_recipe

log = logging.getLogger("dinolab.quickstart")

KNN_K = 20


@dataclass
class QuickstartResult:
    rows: list[ScoreRow]
    report_markdown: Path
    report_html: Path
    train_seconds: float
    total_seconds: float


def pixel_features(paths: list[Path], side: int = 8) -> np.ndarray:
    """Raw pixels as features ``[N, side*side]``: the grey image area-averaged to the digits' native 8 x 8 (the
    32 px images are upscaled from it, so nothing is lost), flattened and centred."""
    images = torch.from_numpy(grey_images(paths))[:, None]  # [N, 1, H, W]
    pixels = torch.nn.functional.adaptive_avg_pool2d(images, side).flatten(1).numpy()
    return pixels - pixels.mean(axis=1, keepdims=True)


def _scores(name: str, report) -> ScoreRow:
    knn = next(s.top1 for s in report.knn[0].scores if s.k == KNN_K)
    linear = next(iter(report.linear.evals.values())).top1
    logreg = next(iter(report.logreg.evals.values())).top1
    return ScoreRow(name, knn, linear, logreg)


def evaluate_all(
    config: TrainConfig,
    teacher_path: Path,
    train_set,
    val_set,
    out_dir: Path,
    progress: bool,
    pixel_side: int = 8,
) -> tuple[list[ScoreRow], np.ndarray, dict[str, np.ndarray]]:
    """k-NN, linear and logistic regression for the teacher, a random init and raw pixels (area-averaged to
    ``pixel_side`` squared); also, for a few validation images (their indices are returned), each extractor's
    nearest training images (for the picture)."""
    size = config.crops.global_size
    extraction = ExtractionConfig(
        resize=size,
        crop=size,
        batch_size=128,
        num_workers=0,
        cache_dir=str(out_dir / "feature_cache"),
        progress=progress,
    )
    tasks = dict(
        knn=KnnConfig(ks=(KNN_K,)),
        linear=LinearConfig(epochs=20, batch_size=128, progress=progress),
        logreg=LogRegConfig(search="coarse-to-fine", c_grid_size=23, max_iter=300, progress=progress),
    )
    torch.manual_seed(config.run.seed)
    # the random baseline: the same architecture, random weights; LayerScale at 1 (at the 1e-5 of training's
    # initialisation every image would map to nearly the same feature, an unfairly weak baseline)
    random_init = build_backbone(replace(config.model, layerscale_init=1.0), img_size=size, drop_path_rate=0.0)
    extractors = {
        "DINOv2-pretrained teacher": load_backbone(teacher_path),
        "same ViT, random init": random_init.eval(),
    }
    rows, neighbours = [], {}
    query_index = np.arange(0, len(val_set), max(len(val_set) // 6, 1))[:6]
    for name, backbone in extractors.items():
        report = evaluate_classification(backbone, train_set, val_set, extraction=extraction, **tasks)
        write_eval_report(report, out_dir / "evaluations", name.split()[0].lower().replace("-", "_"))
        rows.append(_scores(name, report))
        train_f = extract_labelled(backbone, train_set, extraction)  # read back from the cache
        val_f = extract_labelled(backbone, val_set, extraction)
        neighbours[name.split(",")[0]] = _nearest(val_f.last_cls[query_index], train_f.last_cls)
    train_pixels = pixel_features(train_set.paths, pixel_side)
    val_pixels = pixel_features(val_set.paths, pixel_side)
    pixels = evaluate_classification(
        None,
        Features.from_array(train_pixels, train_set.labels, train_set.classes, "train"),
        Features.from_array(val_pixels, val_set.labels, val_set.classes, "val"),
        **tasks,
    )
    write_eval_report(pixels, out_dir / "evaluations", "raw_pixels")
    rows.append(_scores("raw pixels", pixels))
    neighbours["raw pixels"] = _nearest(val_pixels[query_index], train_pixels)
    return rows, query_index, neighbours


def _nearest(queries: np.ndarray, database: np.ndarray, k: int = 5) -> np.ndarray:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    d = database / np.linalg.norm(database, axis=1, keepdims=True)
    return np.argsort(-(q @ d.T), axis=1)[:, :k]  # [Q, k] most similar first


def run_quickstart(output: str | Path, overrides: list[str] | None = None, progress: bool = True) -> QuickstartResult:
    """Pretrain (recipe ``quickstart``) on the built-in digits, evaluate, and write ``output/report.{md,html}``."""
    start = time.perf_counter()
    out = Path(output)
    data = write_digits(out / "data" / "digits")
    photos = write_photos(out / "data" / "photos")
    config = apply_overrides(
        get_recipe("quickstart"),
        [f"run.data={data.train}", f"run.output_dir={out / 'run'}", f"run.progress={progress}", *(overrides or [])],
    )
    log.info("pretraining %s on %d digit images (%s)", config.model.arch, data.num_train, out / "run")
    result = train(config)
    train_seconds = time.perf_counter() - start
    train_set, val_set = load_image_folder(data.train), load_image_folder(data.val)
    rows, query_index, neighbours = evaluate_all(config, result.backbone, train_set, val_set, out, progress)

    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    curves = plot_training_curves(out / "run", figures / "training_curves.png")
    queries = grey_images([val_set.paths[i] for i in query_index])
    knn_picture = plot_neighbours(queries, grey_images(train_set.paths), neighbours, figures / "neighbours.png")
    from dinolab.features.pca import pca_pictures

    teacher = load_backbone(result.backbone)
    size = 16 * config.model.patch_size  # a 16 x 16 patch grid
    pca = pca_pictures(teacher, photos, figures / "pca", image_size=(size, size), attention=True, progress=False)
    digit_pca = pca_pictures(
        teacher, [val_set.paths[i] for i in range(0, 60, 6)], figures / "pca_digits", image_size=(size, size),
        threshold=None, progress=False,
    )  # fmt: skip
    notes = [
        f"Pretrained a {config.model.arch} (patch {config.model.patch_size}, depth {config.model.depth or 'full'}) "
        f"with DINO + iBOT + KoLeo for {result.steps_done} iterations of batch {config.optim.batch_size_per_process} "
        f"on {data.num_train} unlabelled digit images ({train_seconds / 60:.1f} min).",
        f"Evaluated on {len(val_set)} held-out digits with labels: k-NN (k={KNN_K}, T=0.07), the linear-probe grid, "
        "and L-BFGS logistic regression with C chosen on a held-out part of train.",
    ]
    pictures = {
        "Training curves and target health": [curves],
        "Nearest training images of validation digits (teacher | random init | raw pixels)": [knn_picture],
        "PCA of patch features on photos (teacher)": pca.pictures + pca.attention,
        "PCA of patch features on digits (teacher)": digit_pca.pictures,
    }
    markdown, page = write_report(out, rows, KNN_K, pictures, notes)
    return QuickstartResult(rows, markdown, page, train_seconds, time.perf_counter() - start)
