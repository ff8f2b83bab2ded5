"""Curation outputs: the path list pretraining reads, a per-image manifest, a summary and plots.

An output folder holds::

    selected.txt    kept images, one path per line (what ``dinolab`` pretraining takes as a dataset)
    manifest.csv    one row per pool image: path, source, kept, reason, cluster, similarity, twin
                    (``manifest.parquet`` instead when asked; needs pyarrow)
    summary.json    counts, settings and timings; summary.md says the same for people
    plots/*.png     similarity histograms, cluster sizes before / after rebalancing
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dinolab.runtime import atomic_write_json, atomic_write_text

MANIFEST_COLUMNS = ("path", "source", "kept", "reason", "cluster", "similarity", "twin")


@dataclass
class Manifest:
    """One entry per pool image (parallel columns)."""

    path: list[str]
    source: list[str]
    kept: np.ndarray  # [N] bool
    reason: list[str]
    cluster: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    """[N] cluster id (-1 when no clustering ran)."""
    similarity: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    """[N] the similarity that decided the image's fate (to its twin, eval match, seed), NaN when none."""
    twin: list[str] = field(default_factory=list)
    """[N] the kept duplicate / matched evaluation image / retrieving seed, '' when none."""

    def __post_init__(self) -> None:
        n = len(self.path)
        if not len(self.cluster):
            self.cluster = np.full(n, -1, dtype=np.int64)
        if not len(self.similarity):
            self.similarity = np.full(n, np.nan, dtype=np.float32)
        if not self.twin:
            self.twin = [""] * n
        lengths = {len(getattr(self, c)) for c in MANIFEST_COLUMNS}
        if lengths != {n}:
            raise ValueError(f"manifest columns have different lengths {lengths}")

    def columns(self) -> dict[str, list]:
        return {
            "path": list(self.path),
            "source": list(self.source),
            "kept": [bool(k) for k in self.kept],
            "reason": list(self.reason),
            "cluster": [int(c) for c in self.cluster],
            "similarity": [None if np.isnan(s) else round(float(s), 6) for s in self.similarity],
            "twin": list(self.twin),
        }


def write_path_list(paths: Sequence[str], path: str | Path) -> Path:
    """One path per line: the dataset format pretraining accepts."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(f"{p}\n" for p in paths))
    return path


def write_manifest(manifest: Manifest, path: str | Path) -> Path:
    """CSV, or Parquet when ``path`` ends with ``.parquet`` (pyarrow)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = manifest.columns()
    if path.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as error:
            raise ImportError("Parquet manifests need pyarrow: pip install 'dinolab[parquet]', or use .csv") from error
        pq.write_table(pa.table(columns), path)
        return path
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(MANIFEST_COLUMNS)
        writer.writerows(zip(*(columns[c] for c in MANIFEST_COLUMNS)))
    return path


def read_manifest(path: str | Path) -> dict[str, list]:
    """Manifest columns back as lists of strings (CSV) or typed values (Parquet)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pydict()
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {c: [r[c] for r in rows] for c in MANIFEST_COLUMNS}


def _markdown(summary: dict[str, Any], plots: Sequence[Path]) -> str:
    lines = [f"# Curation summary: {summary.get('command', '')}", "", "| quantity | value |", "|---|---|"]
    for key, value in summary.items():
        if not isinstance(value, dict | list):
            lines.append(f"| {key} | {value} |")
    for key, value in summary.items():
        if isinstance(value, dict):
            lines += ["", f"## {key}", "", "| setting | value |", "|---|---|"]
            lines += [f"| {k} | {v} |" for k, v in value.items()]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict[str, Any], out_dir: str | Path, plots: Sequence[Path] = ()) -> tuple[Path, Path]:
    """``summary.json`` and ``summary.md`` (a table of the same numbers, with the plots)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "summary.json", out_dir / "summary.md"
    atomic_write_json(json_path, summary)
    atomic_write_text(md_path, _markdown(summary, plots))
    return json_path, md_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_similarity_histogram(
    similarities: np.ndarray, threshold: float | None, title: str, path: str | Path, bins: int = 100
) -> Path:
    """Histogram (log count) of similarities with the decision threshold marked."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.asarray(similarities, dtype=np.float64)
    values = values[np.isfinite(values)]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(values, bins=bins, range=(min(-0.1, values.min(initial=0.0)), 1.0), log=True, color="tab:blue")
    if threshold is not None:
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold}")
        ax.legend()
    ax.set(xlabel="cosine similarity", ylabel="count (log)", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_cluster_sizes(before: np.ndarray, after: np.ndarray, path: str | Path, title: str = "") -> Path:
    """Cluster sizes, largest first, before and after rebalancing (log scale)."""
    plt = _pyplot()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    order = np.argsort(-np.asarray(before), kind="stable")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(len(order)), np.asarray(before)[order], label="before", color="tab:gray")
    ax.plot(np.arange(len(order)), np.asarray(after)[order], label="after", color="tab:green")
    ax.set_yscale("symlog")
    ax.set(xlabel="cluster (sorted by size before)", ylabel="images", title=title or "cluster sizes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
