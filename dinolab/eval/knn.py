"""Weighted k-NN classification on frozen global features (the DINO / DINOv2 protocol).

Reference semantics (the unit tests check this loop):

    for each evaluated sample q (L2-normalised):
        sims = [cos(q, t) for t in train]; take the k largest, sorted
        scores[c] = sum over those neighbours j with label c of exp(sims[j] / T)
        prediction = argmax_c scores[c]

The official code normalises the weights with a softmax over the largest k_max neighbours first; that divides
every score of a sample by one positive number, so the ranking of classes (and the accuracy) is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from dinolab.eval.features import Features
from dinolab.eval.results import KnnResult, KnnScore
from dinolab.runtime import resolve_device

DEFAULT_KS = (10, 20, 100, 200)


@dataclass(frozen=True, kw_only=True)
class KnnConfig:
    """k-NN evaluation settings (defaults: the official ones)."""

    ks: tuple[int, ...] = DEFAULT_KS
    """Numbers of neighbours, all evaluated from one top-k search (capped at the train size)."""
    temperature: float = 0.07
    """Vote weight ``exp(similarity / temperature)``."""
    weighting: str = "exp"
    """``exp`` (the protocol) or ``uniform`` (plain majority vote)."""
    few_shot: tuple[int, ...] = ()
    """Also evaluate with only n training samples per class, for each n here."""
    tries: int = 5
    """Random draws of the few-shot training subsets (mean ± std reported)."""
    seed: int = 0
    chunk_size: int | None = None
    """Evaluated samples per similarity block; default keeps a block near 2^28 (GPU) or 2^26 (CPU) similarities."""
    device: str | None = None

    def __post_init__(self) -> None:
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"knn ks must be positive integers, got {self.ks}")
        if self.temperature <= 0:
            raise ValueError(f"knn temperature must be > 0, got {self.temperature}")
        if self.weighting not in {"exp", "uniform"}:
            raise ValueError(f"knn weighting must be 'exp' or 'uniform', got {self.weighting!r}")
        if any(n < 1 for n in self.few_shot) or self.tries < 1:
            raise ValueError("few-shot sizes and tries must be >= 1")


def knn_class_scores(
    train: Tensor,
    train_labels: Tensor,
    query: Tensor,
    ks: Sequence[int],
    num_classes: int,
    temperature: float = 0.07,
    weighting: str = "exp",
) -> dict[int, Tensor]:
    """Class votes ``{k: [Q, C]}`` of ``query [Q, D]`` against ``train [N, D]`` (both L2-normalised), from one
    top-``max(ks)`` search."""
    max_k = max(ks)
    if max_k > train.shape[0]:
        raise ValueError(f"k = {max_k} exceeds the {train.shape[0]} training samples")
    sims = query @ train.T  # [Q, N] cosine similarities
    top_sims, top_index = sims.topk(max_k, dim=1, largest=True, sorted=True)  # [Q, K]
    neighbour_labels = train_labels[top_index]  # [Q, K]
    weights = (top_sims / temperature).exp() if weighting == "exp" else torch.ones_like(top_sims)
    scores = {}
    for k in ks:
        votes = torch.zeros(query.shape[0], num_classes, dtype=weights.dtype, device=weights.device)
        scores[k] = votes.scatter_add_(1, neighbour_labels[:, :k], weights[:, :k])  # [Q, C]
    return scores


def knn_accuracy(
    train: Tensor,
    train_labels: Tensor,
    query: Tensor,
    query_labels: Tensor,
    ks: Sequence[int],
    num_classes: int,
    temperature: float = 0.07,
    weighting: str = "exp",
    chunk_size: int | None = None,
) -> dict[int, tuple[float, float]]:
    """``{k: (top-1 %, top-5 %)}``, computing similarities in blocks of ``chunk_size`` queries so that large sets
    fit in memory."""
    train = F.normalize(train.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    budget = 2**28 if train.device.type == "cuda" else 2**26  # similarities per block: 1 GiB on GPU, 256 MiB on CPU
    chunk = chunk_size or max(1, budget // max(train.shape[0], 1))
    correct = {k: [0.0, 0.0] for k in ks}
    top = min(5, num_classes)
    for start in range(0, query.shape[0], chunk):
        block, labels = query[start : start + chunk], query_labels[start : start + chunk]
        for k, scores in knn_class_scores(train, train_labels, block, ks, num_classes, temperature, weighting).items():
            correct[k][0] += (scores.argmax(dim=1) == labels).sum().item()
            correct[k][1] += (scores.topk(top, dim=1).indices == labels[:, None]).any(dim=1).sum().item()
    count = max(query.shape[0], 1)
    return {k: (100.0 * c1 / count, 100.0 * c5 / count) for k, (c1, c5) in correct.items()}


def sample_per_class(labels: np.ndarray, n_per_class: int, seed: int) -> np.ndarray:
    """Indices of ``n_per_class`` random samples of every class (all of a class that has fewer), sorted."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        chosen.append(rng.permutation(members)[:n_per_class])
    return np.sort(np.concatenate(chosen))


def run_knn(train: Features, evaluated: Features, config: KnnConfig = KnnConfig()) -> KnnResult:
    """Weighted k-NN of ``evaluated`` against ``train`` on the last block's CLS token (cosine similarity).

    Few-shot settings (``config.few_shot``) use, as the official code does, the ks not above the shot count
    plus k = the shot count, over ``config.tries`` random draws.
    """
    device = resolve_device(config.device)
    num_classes = max(train.num_classes, evaluated.num_classes)
    train_x = torch.from_numpy(train.last_cls).to(device)
    train_y = torch.from_numpy(train.labels).to(device)
    query_x = torch.from_numpy(evaluated.last_cls).to(device)
    query_y = torch.from_numpy(evaluated.labels).to(device)

    def evaluate(indices: np.ndarray | None, ks: Sequence[int]) -> dict[int, tuple[float, float]]:
        x, y = (train_x, train_y) if indices is None else (train_x[indices], train_y[indices])
        ks = sorted({min(k, x.shape[0]) for k in ks})
        return knn_accuracy(
            x, y, query_x, query_y, ks, num_classes, config.temperature, config.weighting, config.chunk_size
        )

    scores = [KnnScore(k, top1, top5) for k, (top1, top5) in evaluate(None, config.ks).items()]
    for n in config.few_shot:
        ks = sorted({k for k in config.ks if k <= n} | {n})
        tries = [
            evaluate(torch.from_numpy(sample_per_class(train.labels, n, config.seed + t)).to(device), ks)
            for t in range(config.tries)
        ]
        for k in tries[0]:
            top1 = np.array([result[k][0] for result in tries])
            top5 = np.array([result[k][1] for result in tries])
            ddof = 1 if len(tries) > 1 else 0
            scores.append(
                KnnScore(
                    k,
                    float(top1.mean()),
                    float(top5.mean()),
                    n,
                    len(tries),
                    float(top1.std(ddof=ddof)),
                    float(top5.std(ddof=ddof)),
                )
            )
    return KnnResult(evaluated.name, len(train), len(evaluated), config.temperature, scores)
