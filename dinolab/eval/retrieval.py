"""Instance retrieval with global descriptors of a frozen backbone: cosine ranking, mAP and mP@k under the
revisited Oxford / Paris protocol (Radenović et al., CVPR 2018).

Protocols (which database images count as positive, which are ignored as "junk"):
    easy:   positive = easy,         junk = junk + hard
    medium: positive = easy + hard,  junk = junk
    hard:   positive = hard,         junk = junk + easy
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import functional as TF
from tqdm.auto import tqdm

from dinolab.data.images import load_rgb
from dinolab.data.transforms import make_normalize
from dinolab.eval.dense import single_item
from dinolab.eval.readers.retrieval import Box, QueryTruth, RetrievalSet

MULTISCALE = (1.0, 1 / math.sqrt(2), 0.5)
"""Scales of the multi-scale descriptor (average of the L2-normalised descriptors at each)."""


# ----------------------------------------------------------------------------------------------- metrics
def protocol_truth(truth: QueryTruth, protocol: str) -> tuple[np.ndarray, np.ndarray]:
    """(positive, junk) database indices of one query under "easy", "medium", "hard" (or "all" = medium)."""
    if protocol == "easy":
        return truth.easy, np.concatenate([truth.junk, truth.hard])
    if protocol in ("medium", "all"):
        return np.concatenate([truth.easy, truth.hard]), truth.junk
    if protocol == "hard":
        return truth.hard, np.concatenate([truth.junk, truth.easy])
    raise ValueError(f"unknown protocol {protocol!r}; choose easy, medium, hard or all")


def compute_ap(ranks: np.ndarray, num_positives: int) -> float:
    """Average precision of the revisited protocol's ``compute_ap``: the area under the precision-recall curve
    by trapezoids. ``ranks``: sorted 0-based positions of the positives once junk is removed::

        ap = sum_j (p0_j + p1_j) / 2 / num_positives,  p0_j = j / r_j (1 if r_j = 0),  p1_j = (j + 1) / (r_j + 1)
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    j = np.arange(len(ranks), dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        before = np.where(ranks == 0, 1.0, j / ranks)
    after = (j + 1) / (ranks + 1)
    return float(np.sum((before + after) / 2) / num_positives)


@dataclass
class RankingScores:
    """mAP and mean precision at k of one protocol (queries without positives are left out, as the protocol)."""

    map: float
    mp_at_k: dict[int, float]
    aps: np.ndarray = field(repr=False)  # [Q] NaN for queries without positives
    precisions: np.ndarray = field(repr=False)  # [Q, len(k)]


def compute_map(
    ranking: np.ndarray, truth: list[tuple[np.ndarray, np.ndarray]], kappas: tuple[int, ...] = (1, 5, 10)
) -> RankingScores:
    """Scores of ``ranking`` ``[Q, N]`` (database indices, best first) against (positive, junk) indices per query.

    Junk images are removed from the ranking before scoring. Precision at k follows the protocol's definition:
    ``k' = min(k, position of the last positive)``, ``P@k = #positives in the top k' / k'``.
    """
    aps = np.full(len(truth), np.nan)
    precisions = np.full((len(truth), len(kappas)), np.nan)
    for q, (ok, junk) in enumerate(truth):
        if len(ok) == 0:
            continue
        order = ranking[q]
        positions = np.flatnonzero(np.isin(order, ok))  # 0-based ranks of the positives
        junk_positions = np.flatnonzero(np.isin(order, junk))
        positions = positions - np.searchsorted(junk_positions, positions)  # junk ranked above does not count
        aps[q] = compute_ap(positions, len(ok))
        one_based = positions + 1
        for i, k in enumerate(kappas):
            cutoff = min(int(one_based.max()), k)
            precisions[q, i] = (one_based <= cutoff).sum() / cutoff
    scored = ~np.isnan(aps)
    if not scored.any():
        raise ValueError("no query has a positive database image under this protocol")
    mp = {k: float(precisions[scored, i].mean()) for i, k in enumerate(kappas)}
    return RankingScores(float(aps[scored].mean()), mp, aps, precisions)


def rank_database(queries: np.ndarray, database: np.ndarray) -> np.ndarray:
    """Database indices sorted by decreasing cosine similarity, ``[Q, N]`` (descriptors are L2-normalised)."""
    similarity = queries @ database.T  # [Q, N]
    return np.argsort(-similarity, axis=1, kind="stable")


# ----------------------------------------------------------------------------------------------- descriptors
@dataclass(frozen=True, kw_only=True)
class RetrievalConfig:
    """How global descriptors are computed."""

    image_size: int = 512
    """Longest image side at scale 1 (each side then rounded down to a multiple of the patch size)."""
    scales: tuple[float, ...] = (1.0,)
    """Image scales whose L2-normalised descriptors are averaged; :data:`MULTISCALE` for 1, 1/sqrt 2, 1/2."""
    pooling: str = "cls"
    """"cls": the normalised CLS token; "gem": generalised mean of the last block's (normalised) patch tokens,
    clamped at 1e-6 first as GeM needs positive inputs."""
    gem_p: float = 3.0

    def __post_init__(self) -> None:
        if self.pooling not in ("cls", "gem"):
            raise ValueError(f"pooling must be 'cls' or 'gem', got {self.pooling!r}")
        if self.image_size < 1 or not self.scales or min(self.scales) <= 0 or self.gem_p <= 0:
            raise ValueError("image_size, scales and gem_p must be positive")


def gem(tokens: Tensor, p: float = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalised mean over tokens: ``[B, N, D] -> [B, D]``, ``(mean_n clamp(x, eps)^p)^(1/p)``."""
    return tokens.clamp(min=eps).pow(p).mean(dim=1).pow(1.0 / p)


def resize_for_patches(image: Image.Image, longest: float, patch_size: int) -> Image.Image:
    """Resize so the longest side is about ``longest``, each side a multiple of ``patch_size`` (at least one)."""
    factor = longest / max(image.size)
    width = max(patch_size, int(image.width * factor) // patch_size * patch_size)
    height = max(patch_size, int(image.height * factor) // patch_size * patch_size)
    return image.resize((width, height), Image.BICUBIC)


class _DescriptorImages(Dataset):
    def __init__(self, paths: list, boxes: list[Box | None], config: RetrievalConfig, patch_size: int) -> None:
        self.paths, self.boxes, self.config, self.patch_size = paths, boxes, config, patch_size
        self.normalize = make_normalize()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> list[Tensor]:
        image = load_rgb(self.paths[index])
        box = self.boxes[index]
        if box is not None:  # the protocol's queries are the bounding-box crop of the query image
            image = image.crop(tuple(round(v) for v in box))
        sizes = [self.config.image_size * s for s in self.config.scales]
        return [self.normalize(TF.to_tensor(resize_for_patches(image, size, self.patch_size))) for size in sizes]


@torch.no_grad()
def describe(model: nn.Module, image: Tensor, config: RetrievalConfig) -> Tensor:
    """L2-normalised global descriptor ``[B, D]`` of normalised images ``[B, 3, H, W]``."""
    out = model.forward_features(image)
    if config.pooling == "cls":
        descriptor = out["x_norm_clstoken"]
    else:
        descriptor = gem(out["x_norm_patchtokens"].float(), config.gem_p)
    return nn.functional.normalize(descriptor.float(), dim=-1)


def describe_images(
    model: nn.Module,
    paths: list,
    boxes: list[Box | None] | None,
    config: RetrievalConfig,
    device: torch.device | str = "cpu",
    num_workers: int = 2,
    progress: bool = True,
    description: str = "descriptors",
) -> np.ndarray:
    """Descriptors ``[N, D]`` (L2-normalised; multi-scale = normalised mean of the per-scale descriptors)."""
    dataset = _DescriptorImages(list(paths), boxes or [None] * len(paths), config, model.patch_size)
    loader = DataLoader(dataset, batch_size=1, collate_fn=single_item, num_workers=num_workers)
    model.to(device).eval()
    rows = []
    for scaled in tqdm(loader, total=len(dataset), desc=description, disable=not progress):
        per_scale = torch.cat([describe(model, x[None].to(device), config) for x in scaled])  # [S, D]
        rows.append(nn.functional.normalize(per_scale.mean(0), dim=-1).cpu().numpy())
    return np.stack(rows).astype(np.float32)


@dataclass
class RetrievalResults:
    """Scores per protocol (None where no query has a positive) and the number of queries / database images."""

    protocols: dict[str, RankingScores | None]
    num_queries: int
    num_database: int

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"num_queries": self.num_queries, "num_database": self.num_database}
        for name, scores in self.protocols.items():
            if scores is None:
                out[name] = None
            else:
                out[name] = {"mAP": scores.map, **{f"mP@{k}": v for k, v in scores.mp_at_k.items()}}
        return out

    def summary_line(self) -> str:
        return "  ".join(
            f"{name} mAP {100 * s.map:.2f}" if s else f"{name}: no positives" for name, s in self.protocols.items()
        )


def evaluate_retrieval(
    model: nn.Module,
    data: RetrievalSet,
    config: RetrievalConfig,
    device: torch.device | str = "cpu",
    num_workers: int = 2,
    progress: bool = True,
) -> RetrievalResults:
    """Describe queries (cropped to their boxes) and database images, rank by cosine similarity, and score
    every protocol the dataset supports."""
    queries = describe_images(model, data.queries, data.boxes, config, device, num_workers, progress, "queries")
    database = describe_images(model, data.database, None, config, device, num_workers, progress, "database")
    ranking = rank_database(queries, database)
    scores: dict[str, RankingScores | None] = {}
    for protocol in data.protocols:
        truth = [protocol_truth(t, protocol) for t in data.truth]
        # a protocol without any positive (e.g. "hard" on a set with no hard images) has no mAP
        scores[protocol] = compute_map(ranking, truth) if any(len(ok) for ok, _ in truth) else None
    return RetrievalResults(scores, len(data.queries), len(data.database))
