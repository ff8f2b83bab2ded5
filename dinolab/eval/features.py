"""Frozen features of labelled sets, extracted once (one pass gives what k-NN, the linear grid and logistic
regression need) and cached on disk under a key of (model, dataset, transform, feature kind, dtype)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision import transforms

from dinolab.data.transforms import Resolution, make_normalize
from dinolab.eval.readers.classification import LabelledData, LabelledEmbeddings, LabelledImages, Transform, digest
from dinolab.features.extract import extract_features
from dinolab.runtime import atomic_write, check_dtype

logger = logging.getLogger(__name__)

FEATURE_KIND = "cls_last_n+patch_mean/v1"
"""Bumped whenever what the extractor stores changes, so old cache files are not reused."""


@dataclass
class Features:
    """Frozen features of one labelled set.

    ``cls`` holds the final-norm CLS tokens of the last ``L`` blocks (oldest first, the last block last), so
    ``cls[:, -1]`` is the backbone's global feature; ``patch_mean`` is the mean of the last block's normed patch
    tokens (``None`` when unavailable, e.g. for precomputed embeddings).
    """

    labels: np.ndarray  # [N] int64
    cls: np.ndarray  # [N, L, D] float32
    classes: list[str]
    patch_mean: np.ndarray | None = None  # [N, D] float32
    name: str = ""
    failures: list[tuple[str, str]] = field(default_factory=list)  # (item, error) of unreadable images

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.cls = np.asarray(self.cls, dtype=np.float32)
        if self.cls.ndim == 2:
            self.cls = self.cls[:, None]
        if self.cls.ndim != 3 or len(self.cls) != len(self.labels):
            raise ValueError(f"{self.name}: cls must be [N, L, D] with N = {len(self.labels)}, got {self.cls.shape}")
        if self.patch_mean is not None:
            self.patch_mean = np.asarray(self.patch_mean, dtype=np.float32)
            if self.patch_mean.shape != (len(self.labels), self.cls.shape[-1]):
                raise ValueError(f"{self.name}: patch_mean must be [N, D], got {self.patch_mean.shape}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise ValueError(f"{self.name}: labels must index the {len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def last_cls(self) -> np.ndarray:
        """The last block's CLS token ``[N, D]``: the backbone's global feature."""
        return self.cls[:, -1]

    @property
    def n_blocks(self) -> int:
        return self.cls.shape[1]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: np.ndarray, name: str | None = None) -> Features:
        indices = np.asarray(indices, dtype=np.int64)
        patch_mean = self.patch_mean[indices] if self.patch_mean is not None else None
        return Features(self.labels[indices], self.cls[indices], self.classes, patch_mean, name or self.name)

    @classmethod
    def from_array(
        cls, features: np.ndarray, labels: np.ndarray, classes: list[str] | None = None, name: str = ""
    ) -> Features:
        """Features from a plain ``[N, D]`` array of global features (one block, no patch mean)."""
        labels = np.asarray(labels, dtype=np.int64)
        classes = classes if classes is not None else [str(i) for i in range(int(labels.max()) + 1)]
        return cls(labels, np.asarray(features)[:, None], classes, None, name)


# ----------------------------------------------------------------------------------------------- extraction
class ClassificationFeatureFn:
    """One forward that yields every feature the classification evaluations use.

    ``cls``: ``[B, L, D]`` final-norm CLS of the last ``L = min(n_last_blocks, depth)`` blocks;
    ``patch_mean``: ``[B, D]`` mean of the last block's normed patch tokens. A module without
    ``get_intermediate_layers`` contributes ``model(images)`` as a one-block ``cls`` only.
    """

    def __init__(self, n_last_blocks: int = 4) -> None:
        self.n_last_blocks = n_last_blocks

    def __call__(self, model: nn.Module, images: Tensor) -> dict[str, Tensor]:
        if not hasattr(model, "get_intermediate_layers"):
            return {"cls": model(images)[:, None]}
        n = min(self.n_last_blocks, getattr(model, "n_blocks", self.n_last_blocks))
        outputs = model.get_intermediate_layers(images, n=n, return_class_token=True)  # n x ([B, P, D], [B, D])
        cls_tokens = torch.stack([cls_token for _, cls_token in outputs], dim=1)  # [B, n, D]
        return {"cls": cls_tokens, "patch_mean": outputs[-1][0].mean(dim=1)}


@dataclass(frozen=True, kw_only=True)
class ExtractionConfig:
    """How images become features."""

    resize: int = 256
    """Short side after the bicubic resize (official: 256)."""
    crop: int = 224
    """Center-crop size (official: 224); a multiple of the patch size avoids dropping border pixels."""
    batch_size: int = 64
    num_workers: int = 2
    dtype: str = "fp32"
    """Autocast dtype of the backbone: fp32, bf16 or fp16 (features are stored as float32)."""
    device: str | None = None
    """Extraction device; default cuda when available, else cpu."""
    n_last_blocks: int = 4
    """CLS tokens of this many last blocks are kept (the linear grid's "last 4" variant)."""
    cache_dir: str | None = None
    """Where extracted features are kept and reused; None disables the cache."""
    progress: bool = True

    @property
    def resolution(self) -> Resolution:
        return Resolution(resize=self.resize, crop=self.crop)

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        self.resolution  # noqa: B018 (validates resize and crop by the one rule every command uses)
        if self.batch_size <= 0 or self.num_workers < 0 or self.n_last_blocks <= 0:
            raise ValueError("batch_size and n_last_blocks must be positive and num_workers >= 0")


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the module's class and every state-dict tensor (names, dtypes, shapes and bytes)."""
    hasher = hashlib.blake2b(digest_size=16)
    hasher.update(type(model).__qualname__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        hasher.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        hasher.update(tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def file_fingerprint(path: str | os.PathLike) -> str:
    """A cheap model identity for a checkpoint file: resolved path, size and modification time."""
    stat = Path(path).stat()
    return f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns}"


def content_stamp(data: LabelledImages) -> str:
    """Size, modification and change times and inode of every image file: part of the cache key, so that files
    replaced or edited in place are extracted again. A torchvision dataset is a fixed download: its identity is
    enough."""
    if data.paths is None:
        return ""
    hasher = hashlib.blake2b(digest_size=16)
    for path in data.paths:
        try:
            stat = os.stat(path)
            hasher.update(f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}:{stat.st_ino}\n".encode())
        except OSError:
            hasher.update(b"missing\n")
    return hasher.hexdigest()


def make_augmented_transform(crop: int = 224) -> transforms.Compose:
    """The official linear-probe training augmentation: random-resized crop (bicubic) + horizontal flip."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(crop, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            make_normalize(),
        ]
    )


def extract_labelled(
    model: nn.Module | None,
    data: LabelledData,
    config: ExtractionConfig = ExtractionConfig(),
    *,
    model_id: str | None = None,
    transform: Transform | None = None,
    use_cache: bool = True,
) -> Features:
    """Features of a labelled set (images through ``model``, or precomputed embeddings as they are).

    With ``config.cache_dir`` the result is stored on disk and reused (with a warning that says so) when the model
    (``model_id``, default a hash of the state dict), the dataset identity, the files' sizes and times
    (:func:`content_stamp`), the transform and the feature kind are the same. A custom
    ``transform`` (e.g. augmentation) is never cached. Unreadable images are skipped and listed in ``failures``.
    """
    if isinstance(data, LabelledEmbeddings):
        return Features(data.labels, data.features, data.classes, data.patch_mean, data.name, list(data.failures))
    if model is None:
        raise ValueError(f"{data.name} holds images: a backbone is needed to extract its features")
    cache_file = None
    if config.cache_dir and use_cache and transform is None:
        key = digest(
            model_id or model_fingerprint(model),
            data.identity,
            content_stamp(data),
            {"resize": config.resize, "crop": config.crop, "dtype": config.dtype, "n": config.n_last_blocks},
            FEATURE_KIND,
        )
        safe_name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in data.name)
        cache_file = Path(config.cache_dir).expanduser() / f"{safe_name}-{key}.npz"
        if cache_file.is_file():
            # said out loud: a result computed from a cache must never pass for a fresh one
            logger.warning(
                "%s: reusing features cached %s in %s (same files, model and settings); --no-cache recomputes",
                data.name,
                time.strftime("%Y-%m-%d %H:%M", time.localtime(cache_file.stat().st_mtime)),
                cache_file.parent,
            )
            return _load_cached(cache_file, data)
    dataset = data.make_dataset(transform or config.resolution.transform())
    extracted = extract_features(
        model,
        dataset,
        feature_fn=ClassificationFeatureFn(config.n_last_blocks),
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        dtype=config.dtype,
        device=config.device,
        progress=config.progress,
        description=f"features {data.name}",
        distributed=True,  # under torchrun, each process embeds its share; a no-op in one process
    )
    failures = [(data.item_name(i), message) for i, message in extracted.failures]
    for item, message in failures[:10]:
        logger.warning("skipped unreadable image %s: %s", item, message)
    if len(failures) > 10:
        logger.warning("… %d unreadable images in all in %s", len(failures), data.name)
    if len(extracted.indices) == 0:
        raise RuntimeError(f"no image of {data.name} could be read ({len(failures)} failures, e.g. {failures[:1]})")
    features = Features(
        labels=data.labels[extracted.indices],
        cls=extracted.features["cls"],
        classes=data.classes,
        patch_mean=extracted.features.get("patch_mean"),
        name=data.name,
        failures=failures,
    )
    if cache_file is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        _save_cached(cache_file, features, extracted.indices, config)
    return features


def _save_cached(path: Path, features: Features, indices: np.ndarray, config: ExtractionConfig) -> None:
    """Write to a temporary file in the same folder, then rename: a crash never leaves a half cache file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "cls": features.cls,
        "indices": indices,
        "failures": np.array(json.dumps(features.failures)),
        "config": np.array(json.dumps(asdict(config))),
    }
    if features.patch_mean is not None:
        arrays["patch_mean"] = features.patch_mean
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def _load_cached(path: Path, data: LabelledImages) -> Features:
    with np.load(path, allow_pickle=False) as archive:
        indices = archive["indices"]
        return Features(
            labels=data.labels[indices],
            cls=archive["cls"],
            classes=data.classes,
            patch_mean=archive.get("patch_mean"),
            name=data.name,
            failures=[tuple(f) for f in json.loads(str(archive["failures"]))],
        )
