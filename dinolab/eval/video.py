"""Action recognition with frozen frame features: the CLS tokens of T uniformly sampled frames, averaged or
concatenated over time, and a linear classifier (scikit-learn logistic regression or SGD); top-1 accuracy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression, SGDClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from dinolab.data.transforms import make_eval_transform
from dinolab.eval.dense import single_item
from dinolab.eval.readers.video import VideoSet, read_frames


@dataclass(frozen=True, kw_only=True)
class VideoConfig:
    """Frame sampling, frame transform, temporal pooling and classifier."""

    num_frames: int = 8
    """Frames sampled uniformly (the centre of T equal segments) from each video."""
    temporal: str = "mean"
    """"mean": average the frames' CLS tokens ([D]); "concat": concatenate them in time order ([T·D])."""
    resize_size: int = 256
    crop_size: int = 224
    classifier: str = "logreg"
    """"logreg": L-BFGS logistic regression; "sgd": linear classifier trained by SGD on the log loss."""
    C: float = 1.0
    """Inverse L2 strength of the logistic regression (SGD uses alpha = 1 / (C · N))."""
    max_iter: int = 1000

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.resize_size < 1 or self.crop_size < 1:
            raise ValueError("num_frames, resize_size and crop_size must be positive")
        if self.temporal not in ("mean", "concat"):
            raise ValueError(f"temporal must be 'mean' or 'concat', got {self.temporal!r}")
        if self.classifier not in ("logreg", "sgd"):
            raise ValueError(f"classifier must be 'logreg' or 'sgd', got {self.classifier!r}")
        if self.C <= 0 or self.max_iter < 1:
            raise ValueError("C and max_iter must be positive")


class _Clips(Dataset):
    """One item per video: its T transformed frames ``[T, 3, S, S]``, or the read error."""

    def __init__(self, videos: VideoSet, config: VideoConfig) -> None:
        self.videos, self.config = videos, config
        self.transform = make_eval_transform(config.resize_size, config.crop_size)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, str | None]:
        try:
            frames = read_frames(self.videos.videos[index], self.config.num_frames)
        except ImportError:
            raise  # a missing decoder is a set-up problem, not a bad video
        except Exception as error:  # corrupt videos: report and go on
            return index, None, f"{type(error).__name__}: {error}"
        return index, torch.stack([self.transform(f) for f in frames]), None


@torch.no_grad()
def video_features(
    model: nn.Module,
    videos: VideoSet,
    config: VideoConfig,
    device: torch.device | str = "cpu",
    num_workers: int = 2,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Clip features ``[V', D]`` or ``[V', T·D]``, the indices of the readable videos ``[V']`` and the failures."""
    loader = DataLoader(_Clips(videos, config), batch_size=1, collate_fn=single_item, num_workers=num_workers)
    model.to(device).eval()
    rows, kept, failures = [], [], []
    for index, frames, error in tqdm(loader, total=len(videos), desc="video features", disable=not progress):
        if frames is None:
            failures.append((index, error))
            continue
        cls = model(frames.to(device)).float()  # [T, D]
        pooled = cls.mean(0) if config.temporal == "mean" else cls.reshape(-1)
        rows.append(pooled.cpu().numpy())
        kept.append(index)
    if not rows:
        raise ValueError(f"{videos.name}: no video could be read ({failures[:1]})")
    return np.stack(rows), np.asarray(kept, dtype=np.int64), failures


def make_classifier(config: VideoConfig, num_train: int):
    """Standardised features + a linear classifier (scikit-learn)."""
    if config.classifier == "logreg":
        linear = LogisticRegression(C=config.C, max_iter=config.max_iter)
    else:
        linear = SGDClassifier(loss="log_loss", alpha=1.0 / (config.C * num_train), max_iter=config.max_iter, tol=1e-4)
    return make_pipeline(StandardScaler(), linear)


@dataclass
class VideoResults:
    """Top-1 accuracy on the validation videos."""

    top1: float
    num_train: int
    num_val: int
    failures: list[tuple[str, str]]

    def to_dict(self) -> dict[str, object]:
        return {"top1": self.top1, "num_train": self.num_train, "num_val": self.num_val, "failures": self.failures}

    def summary_line(self) -> str:
        return f"top-1 {100 * self.top1:.2f} ({self.num_val} videos)"


def evaluate_video(
    model: nn.Module,
    train: VideoSet,
    val: VideoSet,
    config: VideoConfig,
    device: torch.device | str = "cpu",
    num_workers: int = 2,
    progress: bool = True,
) -> VideoResults:
    """Fit the linear classifier on the training videos' features and report top-1 on the validation videos."""
    if train.classes != val.classes:
        raise ValueError("train and validation sets must share the class list (pass classes=train.classes)")
    x_train, kept_train, bad_train = video_features(model, train, config, device, num_workers, progress)
    x_val, kept_val, bad_val = video_features(model, val, config, device, num_workers, progress)
    y_train, y_val = train.labels[kept_train], val.labels[kept_val]
    if len(np.unique(y_train)) < 2:
        raise ValueError("the training videos cover fewer than two classes; a classifier needs at least two")
    classifier = make_classifier(config, len(y_train)).fit(x_train, y_train)
    top1 = float((classifier.predict(x_val) == y_val).mean())
    failures = [(str(train.videos[i]), e) for i, e in bad_train] + [(str(val.videos[i]), e) for i, e in bad_val]
    return VideoResults(top1, len(y_train), len(y_val), failures)
