"""The quickstart report: a results table, training curves and pictures, as Markdown and HTML."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from dinolab.train.logger import read_metrics


@dataclass
class ScoreRow:
    """Top-1 accuracies (%) of one feature extractor on the validation digits."""

    name: str
    knn: float
    linear: float
    logreg: float


def results_markdown(rows: Sequence[ScoreRow], knn_k: int) -> str:
    lines = [
        f"| features | k-NN top-1 (k={knn_k}) | linear top-1 | logistic regression top-1 |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {r.name} | {r.knn:.1f} | {r.linear:.1f} | {r.logreg:.1f} |" for r in rows]
    return "\n".join(lines)


def plot_training_curves(run_dir: Path, path: Path) -> Path:
    """Loss terms, target health (``dinolab.train.health``), learning rate and teacher momentum over a run."""
    metrics = read_metrics(run_dir)
    steps = [m["step"] for m in metrics]
    figure = Figure(figsize=(15, 3.2))
    losses, health, schedule = figure.subplots(1, 3)
    for key in ("loss/total", "loss/dino", "loss/ibot", "loss/koleo"):
        losses.plot(steps, [m[key] for m in metrics], label=key.split("/")[1])
    losses.set_xlabel("iteration")
    losses.set_title("training losses")
    losses.legend()
    for key, label in (
        ("health/dino_row_entropy", "DINO target entropy / log K"),
        ("health/ibot_row_entropy", "iBOT target entropy / log K"),
        ("health/dino_agreement", "student-teacher agreement"),
        ("health/teacher_cls_std", "teacher CLS spread"),
    ):
        points = [(m["step"], m[key]) for m in metrics if key in m]
        if points:
            health.plot(*zip(*points), label=label)
    health.axhline(0.9, color="grey", linestyle=":", linewidth=1)  # above: near-uniform targets (a warning)
    health.set_xlabel("iteration")
    health.set_title("target health (1 = uniform targets)")
    health.legend(fontsize=7)
    schedule.plot(steps, [m["lr"] for m in metrics], label="learning rate")
    schedule.set_xlabel("iteration")
    schedule.set_title("schedules")
    twin = schedule.twinx()
    twin.plot(steps, [m["momentum"] for m in metrics], color="tab:red", label="teacher momentum")
    schedule.legend(loc="upper left")
    twin.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def plot_neighbours(
    queries: np.ndarray, database: np.ndarray, neighbours: dict[str, np.ndarray], path: Path, shown: int = 5
) -> Path:
    """For each query image (rows), its nearest database images under each feature extractor (column blocks).

    ``queries [Q, H, W]`` and ``database [N, H, W]`` are grey images; ``neighbours[name]`` is ``[Q, >=shown]``.
    """
    names = list(neighbours)
    columns = 1 + len(names) * shown
    figure = Figure(figsize=(columns * 0.6, len(queries) * 0.65 + 0.6))
    axes = figure.subplots(len(queries), columns, squeeze=False)
    for row, query in enumerate(queries):
        axes[row, 0].imshow(query, cmap="gray")
        for block, name in enumerate(names):
            for j, index in enumerate(neighbours[name][row, :shown]):
                axes[row, 1 + block * shown + j].imshow(database[index], cmap="gray")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0, 0].set_title("query", fontsize=8)
    for block, name in enumerate(names):
        axes[0, 1 + block * shown + shown // 2].set_title(name, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def write_report(
    out_dir: Path,
    rows: Sequence[ScoreRow],
    knn_k: int,
    pictures: dict[str, list[Path]],
    notes: Sequence[str],
) -> tuple[Path, Path]:
    """``report.md`` and ``report.html`` in ``out_dir``, pictures referenced by relative path."""
    table = results_markdown(rows, knn_k)
    md = ["# dinolab quickstart", "", *notes, "", "## Frozen-feature evaluation (validation digits)", "", table, ""]
    for title, paths in pictures.items():
        md += [f"## {title}", ""] + [f"![{p.stem}]({p.relative_to(out_dir)})" for p in paths] + [""]
    markdown_path = out_dir / "report.md"
    markdown_path.write_text("\n".join(md))

    cells = "".join(
        f"<tr><td>{html.escape(r.name)}</td><td>{r.knn:.1f}</td><td>{r.linear:.1f}</td><td>{r.logreg:.1f}</td></tr>"
        for r in rows
    )
    figures = "".join(
        f"<h2>{html.escape(title)}</h2>"
        + "".join(
            f'<p><img src="{html.escape(str(p.relative_to(out_dir)))}" style="max-width:100%"></p>' for p in paths
        )
        for title, paths in pictures.items()
    )
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>dinolab quickstart</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}td,th{padding:4px 12px;"
        "border-bottom:1px solid #ddd;text-align:right}td:first-child,th:first-child{text-align:left}</style>"
        "</head><body><h1>dinolab quickstart</h1>"
        + "".join(f"<p>{html.escape(n)}</p>" for n in notes)
        + "<h2>Frozen-feature evaluation (validation digits), top-1 %</h2><table><tr><th>features</th>"
        f"<th>k-NN (k={knn_k})</th><th>linear</th><th>logistic regression</th></tr>{cells}</table>"
        + figures
        + "</body></html>"
    )
    html_path = out_dir / "report.html"
    html_path.write_text(page)
    return markdown_path, html_path


def grey_images(paths: Sequence[Path]) -> np.ndarray:
    """``[N, H, W]`` float images in [0, 1] (the first channel of the RGB digits)."""
    return np.stack([np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0 for p in paths])
