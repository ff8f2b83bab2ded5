"""Typed results of the classification evaluations, top-k accuracy, and their JSON + Markdown reports."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from dinolab.runtime import atomic_write_json, atomic_write_text, to_jsonable


@dataclass
class Accuracy:
    """Top-1 / top-5 accuracy in percent (top-5 is top-min(5, classes))."""

    top1: float
    top5: float
    count: int
    """Number of evaluated samples."""


def accuracy(scores: Tensor, labels: Tensor) -> Accuracy:
    """Top-1 (argmax; ties go to the lower class index) and top-5 accuracy of ``scores [N, C]`` against
    ``labels [N]``."""
    if scores.ndim != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(f"scores must be [N, C] with N = {labels.shape[0]}, got {tuple(scores.shape)}")
    labels = labels.to(scores.device)
    top1 = (scores.argmax(dim=1) == labels).float().sum().item()
    top5_indices = scores.topk(min(5, scores.shape[1]), dim=1).indices  # [N, 5]
    top5 = (top5_indices == labels[:, None]).any(dim=1).float().sum().item()
    count = int(labels.shape[0])
    return Accuracy(100.0 * top1 / max(count, 1), 100.0 * top5 / max(count, 1), count)


@dataclass
class KnnScore:
    """k-NN accuracy for one k (and one few-shot setting: mean and std over the tries)."""

    k: int
    top1: float
    top5: float
    n_per_class: int | None = None
    """Training images per class in the few-shot setting; None = the full training set."""
    tries: int = 1
    top1_std: float = 0.0
    top5_std: float = 0.0


@dataclass
class KnnResult:
    eval_set: str
    num_train: int
    num_eval: int
    temperature: float
    scores: list[KnnScore]


@dataclass
class HeadScore:
    """One linear classifier of the grid and its top-1 accuracy on the selection set."""

    variant: str
    n_blocks: int
    avgpool: bool
    base_lr: float
    """Learning rate of the official list, before the batch-size scaling."""
    lr: float
    """Learning rate used: ``base_lr * batch_size / 256``."""
    selection_top1: float


@dataclass
class LinearResult:
    best: HeadScore
    heads: list[HeadScore]
    selection_set: str
    """Where the best head was chosen (the validation set, or a part held out of train)."""
    evals: dict[str, Accuracy]
    """The best head's accuracy on each reported set."""
    num_train: int
    iterations: int
    batch_size: int
    augmented: bool = False


@dataclass
class CScore:
    C: float
    selection_top1: float


@dataclass
class LogRegResult:
    best_C: float
    sweep: list[CScore]
    selection_set: str
    evals: dict[str, Accuracy]
    """The model refit with ``best_C`` on all of train, scored on each reported set."""
    num_train: int
    backend: str


@dataclass
class ClassificationReport:
    """Everything one run of the classification evaluations produced."""

    knn: list[KnnResult] = field(default_factory=list)
    linear: LinearResult | None = None
    logreg: LogRegResult | None = None
    failures: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    """Unreadable images per set: (item, error)."""
    config: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- markdown
def _pm(mean: float, std: float, tries: int) -> str:
    return f"{mean:.2f} ± {std:.2f}" if tries > 1 else f"{mean:.2f}"


def knn_markdown(results: list[KnnResult]) -> str:
    lines = []
    for result in results:
        lines += [
            f"### k-NN on {result.eval_set}",
            "",
            f"{result.num_train} train / {result.num_eval} evaluated, T = {result.temperature}",
            "",
            "| train | k | top-1 | top-5 |",
            "|---|---:|---:|---:|",
        ]
        for s in result.scores:
            train = "full" if s.n_per_class is None else f"{s.n_per_class}/class x {s.tries}"
            lines.append(
                f"| {train} | {s.k} | {_pm(s.top1, s.top1_std, s.tries)} | {_pm(s.top5, s.top5_std, s.tries)} |"
            )
        lines.append("")
    return "\n".join(lines)


def linear_markdown(result: LinearResult, top: int = 10) -> str:
    best = result.best
    lines = [
        "### Linear probe",
        "",
        f"{len(result.heads)} heads, {result.iterations} iterations of batch {result.batch_size} on "
        f"{result.num_train} train samples{' (augmented)' if result.augmented else ''}; "
        f"best on {result.selection_set}: **{best.variant}, lr {best.lr:.2e}** ({best.selection_top1:.2f}% top-1)",
        "",
        "| set | top-1 | top-5 |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {acc.top1:.2f} | {acc.top5:.2f} |" for name, acc in result.evals.items()]
    lines += ["", f"Top {top} heads on {result.selection_set}:", "", "| variant | lr | top-1 |", "|---|---:|---:|"]
    for head in sorted(result.heads, key=lambda h: -h.selection_top1)[:top]:
        lines.append(f"| {head.variant} | {head.lr:.2e} | {head.selection_top1:.2f} |")
    return "\n".join(lines) + "\n"


def logreg_markdown(result: LogRegResult) -> str:
    lines = [
        "### Logistic regression",
        "",
        f"L-BFGS ({result.backend}), C chosen on {result.selection_set} over {len(result.sweep)} values: "
        f"**C = {result.best_C:.3g}**, refit on {result.num_train} train samples",
        "",
        "| set | top-1 | top-5 |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {acc.top1:.2f} | {acc.top5:.2f} |" for name, acc in result.evals.items()]
    lines += ["", "| C | top-1 on selection |", "|---:|---:|"]
    lines += [f"| {s.C:.3g} | {s.selection_top1:.2f} |" for s in result.sweep]
    return "\n".join(lines) + "\n"


def report_markdown(report: ClassificationReport) -> str:
    parts = []
    if report.knn:
        parts.append(knn_markdown(report.knn))
    if report.linear is not None:
        parts.append(linear_markdown(report.linear))
    if report.logreg is not None:
        parts.append(logreg_markdown(report.logreg))
    failed = {name: items for name, items in report.failures.items() if items}
    if failed:
        parts.append("### Unreadable images (skipped)\n")
        for name, items in failed.items():
            shown = "; ".join(f"{item}: {error}" for item, error in items[:5])
            parts.append(f"- {name}: {len(items)} ({shown}{' …' if len(items) > 5 else ''})")
    return "\n".join(parts).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------- files
def write_report(report: ClassificationReport, output_dir: str | os.PathLike, stem: str = "results") -> str:
    """Write ``<stem>.json`` and ``<stem>.md`` into ``output_dir``; returns the Markdown text."""
    output_dir = Path(output_dir).expanduser()
    output_dir.mkdir(parents=True, exist_ok=True)
    markdown = report_markdown(report)
    atomic_write_json(output_dir / f"{stem}.json", to_jsonable(report))
    atomic_write_text(output_dir / f"{stem}.md", markdown)
    return markdown
