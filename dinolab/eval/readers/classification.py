"""Labelled data for the classification evaluations: image folders, labelled file lists, torchvision datasets by
name, and precomputed embeddings; class alignment between sets; deterministic stratified splits.

A DATA spec (what the CLI takes) is one of:

- a folder of class subfolders (torchvision ``ImageFolder`` layout): ``train/cat/1.jpg``, ``train/dog/2.png`` …
- a ``.txt`` / ``.tsv`` / ``.csv`` file of ``path<TAB, space or comma>label`` lines (relative paths are relative to
  the list's folder; labels are class names or integers; a ``path,label`` header line is skipped);
- ``torchvision:NAME[:SPLIT]``, e.g. ``torchvision:cifar10`` or ``torchvision:flowers102:val``;
- precomputed embeddings: a ``.npz`` with ``features`` and ``labels`` arrays, a ``.npy`` features file with a
  ``labels.npy`` / ``labels.txt`` beside it, or a folder holding one of those (see :func:`load_embeddings`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from dinolab.data.images import IMAGE_EXTENSIONS, ImageFileDataset, LoadedImage, list_images, parse_path_line

Transform = Callable[[Image.Image], Tensor]

DATA_ROOT_ENV = "DINOLAB_DATA"
"""Environment variable naming where torchvision datasets are stored (default ``~/.cache/dinolab/datasets``)."""

LIST_SUFFIXES = (".txt", ".tsv", ".csv")
EMBEDDING_SUFFIXES = (".npy", ".npz")


def default_data_root() -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV, "~/.cache/dinolab/datasets")).expanduser()


def digest(*parts: object) -> str:
    """A short stable hash of JSON-serialisable parts (for dataset identities and cache keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------- labelled images
class TorchvisionItems(Dataset):
    """A torchvision dataset seen as :class:`LoadedImage` items (RGB, transformed); read errors are reported."""

    def __init__(self, dataset: Dataset, indices: np.ndarray, transform: Transform) -> None:
        self.dataset = dataset
        self.indices = indices
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> LoadedImage:
        try:
            image = self.dataset[int(self.indices[index])][0]
            if not isinstance(image, Image.Image):
                raise TypeError(f"expected a PIL image from the torchvision dataset, got {type(image).__name__}")
            return LoadedImage(index, self.transform(image.convert("RGB")))
        except Exception as error:  # a broken file inside a torchvision dataset is reported like any other
            return LoadedImage(index, None, f"{type(error).__name__}: {error}")


@dataclass
class LabelledImages:
    """Images with class labels, from files (``paths``) or from a torchvision dataset (``torchvision_dataset``).

    The transform is chosen at extraction time, so the same set serves plain and augmented extraction.
    """

    name: str
    labels: np.ndarray  # [N] int64 indices into ``classes``
    classes: list[str]
    paths: list[Path] | None = None
    torchvision_dataset: Dataset | None = None
    source_indices: np.ndarray | None = None  # [N] items of ``torchvision_dataset``
    identity: str = ""
    """Stable description of the content (paths or dataset + split, and labels); part of feature cache keys."""

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if (self.paths is None) == (self.torchvision_dataset is None):
            raise ValueError("LabelledImages needs exactly one of paths= or torchvision_dataset=")
        if self.torchvision_dataset is not None and self.source_indices is None:
            self.source_indices = np.arange(len(self.labels))
        size = len(self.paths) if self.paths is not None else len(self.source_indices)
        if size != len(self.labels):
            raise ValueError(f"{self.name}: {size} images but {len(self.labels)} labels")
        _check_labels(self.name, self.labels, self.classes)
        if not self.identity:
            items = [str(p) for p in self.paths] if self.paths is not None else self.source_indices.tolist()
            self.identity = digest("images", items, self.labels.tolist(), self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def make_dataset(self, transform: Transform) -> Dataset:
        """A dataset of :class:`~dinolab.data.images.LoadedImage` items for :func:`extract_features`."""
        if self.paths is not None:
            return ImageFileDataset(self.paths, transform)
        return TorchvisionItems(self.torchvision_dataset, self.source_indices, transform)

    def item_name(self, index: int) -> str:
        """How an item is named in failure reports (its path, or ``dataset[i]``)."""
        if self.paths is not None:
            return str(self.paths[index])
        return f"{self.name}[{int(self.source_indices[index])}]"

    def subset(self, indices: np.ndarray, name: str | None = None) -> LabelledImages:
        indices = np.asarray(indices, dtype=np.int64)
        return LabelledImages(
            name=name or self.name,
            labels=self.labels[indices],
            classes=self.classes,
            paths=[self.paths[i] for i in indices] if self.paths is not None else None,
            torchvision_dataset=self.torchvision_dataset,
            source_indices=self.source_indices[indices] if self.source_indices is not None else None,
            identity=digest(self.identity, indices.tolist()),
        )

    def with_classes(self, classes: list[str]) -> LabelledImages:
        """The same images with labels re-indexed into ``classes`` (e.g. the training set's class list)."""
        return LabelledImages(
            name=self.name,
            labels=remap_labels(self.name, self.labels, self.classes, classes),
            classes=classes,
            paths=self.paths,
            torchvision_dataset=self.torchvision_dataset,
            source_indices=self.source_indices,
            identity=digest(self.identity, classes),
        )


@dataclass
class LabelledEmbeddings:
    """Precomputed global features with labels (no images): usable by k-NN, logistic regression and the
    single-variant (last-block CLS) linear probe."""

    name: str
    features: np.ndarray  # [N, D] float32: the global feature (the CLS token)
    labels: np.ndarray  # [N] int64
    classes: list[str]
    patch_mean: np.ndarray | None = None  # [N, D] float32: mean patch token, when it was saved too
    failures: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.features = np.asarray(self.features, dtype=np.float32)
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.features.ndim != 2:
            raise ValueError(f"{self.name}: embeddings must be [N, D], got shape {self.features.shape}")
        if len(self.features) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.features)} embeddings but {len(self.labels)} labels")
        if self.patch_mean is not None:
            self.patch_mean = np.asarray(self.patch_mean, dtype=np.float32)
            if self.patch_mean.shape != self.features.shape:
                raise ValueError(
                    f"{self.name}: mean patch tokens {self.patch_mean.shape} do not match the "
                    f"embeddings {self.features.shape}"
                )
        _check_labels(self.name, self.labels, self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray, name: str | None = None) -> LabelledEmbeddings:
        indices = np.asarray(indices, dtype=np.int64)
        patch_mean = self.patch_mean[indices] if self.patch_mean is not None else None
        return LabelledEmbeddings(
            name or self.name, self.features[indices], self.labels[indices], self.classes, patch_mean
        )

    def with_classes(self, classes: list[str]) -> LabelledEmbeddings:
        labels = remap_labels(self.name, self.labels, self.classes, classes)
        return LabelledEmbeddings(self.name, self.features, labels, classes, self.patch_mean, self.failures)


LabelledData = LabelledImages | LabelledEmbeddings


def _check_labels(name: str, labels: np.ndarray, classes: Sequence[str]) -> None:
    if labels.ndim != 1:
        raise ValueError(f"{name}: labels must be one integer per item, got shape {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(classes)):
        raise ValueError(
            f"{name}: labels must lie in [0, {len(classes)}) (one per class), got [{labels.min()}, {labels.max()}]"
        )


def remap_labels(name: str, labels: np.ndarray, classes: Sequence[str], target: Sequence[str]) -> np.ndarray:
    """Re-index ``labels`` (into ``classes``) into ``target`` by class name; unknown classes are an error."""
    position = {c: i for i, c in enumerate(target)}
    unknown = sorted({classes[i] for i in np.unique(labels)} - set(position))
    if unknown:
        shown = ", ".join(unknown[:10]) + (f" … ({len(unknown)} in all)" if len(unknown) > 10 else "")
        raise ValueError(
            f"{name} has classes that the training set lacks: {shown}. The evaluation sets must use the training "
            "set's class names (folder names or labels)"
        )
    lookup = np.array([position.get(c, -1) for c in classes], dtype=np.int64)
    return lookup[labels]


def class_list(raw_labels: Sequence[str]) -> list[str]:
    """Sorted distinct labels; integer labels sort numerically (so ``"10"`` comes after ``"9"``)."""
    distinct = set(raw_labels)
    if all(_is_int(label) for label in distinct):
        return sorted(distinct, key=int)
    return sorted(distinct)


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def encode_labels(raw_labels: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    classes = class_list(raw_labels)
    position = {c: i for i, c in enumerate(classes)}
    return np.array([position[label] for label in raw_labels], dtype=np.int64), classes


# ----------------------------------------------------------------------------------------------- readers
def load_image_folder(root: str | os.PathLike) -> LabelledImages:
    """An ``ImageFolder`` tree: one subfolder per class (sorted names), images anywhere below it."""
    root = Path(root).expanduser()
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(
            f"{root} has no class subfolders; an image folder dataset looks like {root}/CLASS_NAME/IMAGE.jpg"
        )
    paths: list[Path] = []
    raw: list[str] = []
    for class_dir in class_dirs:
        found = list_images(class_dir)
        paths.extend(found)
        raw.extend([class_dir.name] * len(found))
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under the class folders of {root}")
    classes = [d.name for d in class_dirs]  # empty class folders still count as classes, as in torchvision
    position = {c: i for i, c in enumerate(classes)}
    labels = np.array([position[c] for c in raw], dtype=np.int64)
    return LabelledImages(name=root.name, labels=labels, classes=classes, paths=paths)


def load_file_list(list_file: str | os.PathLike) -> LabelledImages:
    """``path label`` lines (tab, whitespace or comma separated; the label is the last field)."""
    list_file = Path(list_file).expanduser()
    rows = _read_rows(list_file)
    if not rows:
        raise ValueError(f"{list_file} lists no images; expected lines of 'path<TAB>label'")
    paths = []
    for path_text, _ in rows:
        path = Path(path_text).expanduser()
        paths.append(path if path.is_absolute() else list_file.parent / path)
    labels, classes = encode_labels([label for _, label in rows])
    return LabelledImages(name=list_file.stem, labels=labels, classes=classes, paths=paths)


def _read_rows(list_file: Path) -> list[tuple[str, str]]:
    text = list_file.read_text()
    if list_file.suffix.lower() == ".csv":
        records = [row for row in csv.reader(text.splitlines()) if row and not row[0].startswith("#")]
    else:
        records = []
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            # a tab separates when present (paths may hold spaces); otherwise the label is the last token
            records.append(line.split("\t") if "\t" in line else line.rsplit(None, 1))
    if records and records[0][0].strip().lower() in {"path", "file", "filename", "image", "image_path"}:
        records = records[1:]
    rows = []
    for number, record in enumerate(records, 1):
        fields = [f.strip() for f in record if f.strip()]
        if len(fields) != 2:
            raise ValueError(f"{list_file}: record {number} {record!r} is not 'path<separator>label'")
        rows.append((fields[0], fields[1]))
    return rows


# ----------------------------------------------------------------------------------------------- torchvision
@dataclass(frozen=True)
class TorchvisionSpec:
    """How to open one torchvision dataset: its class, how it names splits, and the default train/eval splits."""

    class_name: str
    split_style: str  # "train_flag" (train=True/False), "split" (split="..."), or "none" (one set)
    train_split: str = "train"
    eval_split: str = "test"


TORCHVISION_DATASETS: dict[str, TorchvisionSpec] = {
    "cifar10": TorchvisionSpec("CIFAR10", "train_flag"),
    "cifar100": TorchvisionSpec("CIFAR100", "train_flag"),
    "mnist": TorchvisionSpec("MNIST", "train_flag"),
    "fashionmnist": TorchvisionSpec("FashionMNIST", "train_flag"),
    "stl10": TorchvisionSpec("STL10", "split"),
    "svhn": TorchvisionSpec("SVHN", "split"),
    "flowers102": TorchvisionSpec("Flowers102", "split"),
    "food101": TorchvisionSpec("Food101", "split"),
    "pets": TorchvisionSpec("OxfordIIITPet", "split", "trainval", "test"),
    "dtd": TorchvisionSpec("DTD", "split"),
    "aircraft": TorchvisionSpec("FGVCAircraft", "split", "trainval", "test"),
    "cars": TorchvisionSpec("StanfordCars", "split"),
    "gtsrb": TorchvisionSpec("GTSRB", "split"),
    "country211": TorchvisionSpec("Country211", "split"),
    "imagenette": TorchvisionSpec("Imagenette", "split", "train", "val"),
    "sun397": TorchvisionSpec("SUN397", "none", "all", "all"),
    "caltech101": TorchvisionSpec("Caltech101", "none", "all", "all"),
    "eurosat": TorchvisionSpec("EuroSAT", "none", "all", "all"),
}


def load_torchvision(
    name: str,
    split: str | None = None,
    *,
    role: str = "train",
    root: str | os.PathLike | None = None,
    download: bool = False,
) -> LabelledImages:
    """A torchvision dataset by short name (see ``TORCHVISION_DATASETS``); ``split`` defaults by ``role``.

    Nothing is downloaded unless ``download=True``; a missing dataset is reported with what to do.
    """
    import torchvision.datasets

    key = name.lower().replace("-", "").replace("_", "")
    if key not in TORCHVISION_DATASETS:
        raise ValueError(f"unknown torchvision dataset {name!r}; known: {', '.join(TORCHVISION_DATASETS)}")
    spec = TORCHVISION_DATASETS[key]
    split = split or (spec.train_split if role == "train" else spec.eval_split)
    root = Path(root).expanduser() if root is not None else default_data_root()
    kwargs: dict[str, object] = {"root": str(root / key), "download": download}
    if spec.split_style == "train_flag":
        if split not in {"train", "test", "val"}:
            raise ValueError(f"{name} has splits 'train' and 'test', got {split!r}")
        kwargs["train"] = split == "train"
    elif spec.split_style == "split":
        kwargs["split"] = split
    elif split != "all":
        raise ValueError(f"{name} comes as one set (split 'all'); hold out a validation part with --val-fraction")
    dataset_class = getattr(torchvision.datasets, spec.class_name)
    try:
        dataset = dataset_class(**kwargs)
    except (RuntimeError, FileNotFoundError, OSError) as error:
        advice = (
            "check the internet connection or download it elsewhere and copy it there"
            if download
            else "pass --download (needs internet) or point --data-root / $DINOLAB_DATA at a folder that holds it"
        )
        raise RuntimeError(
            f"torchvision dataset {name} ({split}) is not available under {kwargs['root']}: {error}; {advice}"
        ) from error
    labels = np.asarray(_torchvision_targets(dataset), dtype=np.int64)
    classes = [str(c) for c in getattr(dataset, "classes", [])] or [str(i) for i in range(int(labels.max()) + 1)]
    identity = digest("torchvision", key, split, len(dataset), labels.tolist())
    return LabelledImages(
        name=f"{key}:{split}", labels=labels, classes=classes, torchvision_dataset=dataset, identity=identity
    )


def _torchvision_targets(dataset: Dataset) -> Sequence[int]:
    """Labels without decoding images: torchvision keeps them under one of a few attribute names."""
    for attribute in ("targets", "labels", "_labels", "y"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            return [int(v) for v in values]
    samples = getattr(dataset, "_samples", None) or getattr(dataset, "samples", None)
    if samples is not None:
        return [int(label) for _, label in samples]
    return [int(dataset[i][1]) for i in range(len(dataset))]  # slow fallback: decodes every image


# ----------------------------------------------------------------------------------------------- embeddings
FEATURE_NAMES = ("cls", "features", "embeddings", "feats", "x")
PATCH_MEAN_NAMES = ("patch_pooled", "patch_mean")
NOT_FEATURES = {"labels", "patch_tokens", "registers", *PATCH_MEAN_NAMES}


def load_embeddings(source: str | os.PathLike) -> LabelledEmbeddings:
    """Precomputed features with labels.

    - ``file.npz`` holding ``cls`` / ``features`` / ``embeddings`` ``[N, D]`` and ``labels`` ``[N]`` (optionally
      ``classes`` and ``patch_pooled`` ``[N, D]``);
    - ``file.npy`` ``[N, D]`` with ``labels.npy`` (integers) or ``labels.txt`` (one label per line) beside it;
    - a folder holding ``cls.npy`` (as written by ``dinolab embed``), ``features.npy`` or ``embeddings.npy``
      and a labels file as above; without a labels file, ``paths.txt`` (one image path per line, as written by
      ``dinolab embed``) gives each image its parent folder's name as label (ImageFolder layout). A
      ``patch_pooled.npy`` beside it (``dinolab embed --patch-pooled``) is used as the mean patch token.
    """
    source = Path(source).expanduser()
    if source.suffix == ".npz":
        with np.load(source, allow_pickle=False) as archive:
            feature_key = next((k for k in FEATURE_NAMES if k in archive), None)
            if feature_key is None or "labels" not in archive:
                raise ValueError(f"{source} needs arrays 'features' and 'labels'; it has {sorted(archive.files)}")
            features, labels = archive[feature_key], archive["labels"]
            classes = [str(c) for c in archive["classes"]] if "classes" in archive else None
            patch_key = next((k for k in PATCH_MEAN_NAMES if k in archive), None)
            patch_mean = archive[patch_key] if patch_key else None
        return _embeddings_from(source.stem, features, labels, classes, patch_mean)
    folder = source if source.is_dir() else source.parent
    features_file = source if source.is_file() else _find_features_file(source)
    features = np.load(features_file, allow_pickle=False)
    raw = _read_embedding_labels(folder, features_file)
    patch_file = next((folder / f"{k}.npy" for k in PATCH_MEAN_NAMES if (folder / f"{k}.npy").is_file()), None)
    patch_mean = np.load(patch_file, allow_pickle=False) if source.is_dir() and patch_file else None
    return _embeddings_from(folder.name if source.is_dir() else source.stem, features, raw, None, patch_mean)


def _find_features_file(folder: Path) -> Path:
    for stem in FEATURE_NAMES:
        if (folder / f"{stem}.npy").is_file():
            return folder / f"{stem}.npy"
    candidates = [p for p in sorted(folder.glob("*.npy")) if p.stem not in NOT_FEATURES]
    if len(candidates) != 1:
        raise ValueError(
            f"{folder} should hold one features file (cls.npy, features.npy or embeddings.npy), found "
            f"{[p.name for p in candidates] or 'none'}"
        )
    return candidates[0]


def _read_embedding_labels(folder: Path, features_file: Path) -> np.ndarray | list[str]:
    for candidate in (features_file.with_name(features_file.stem + "_labels.npy"), folder / "labels.npy"):
        if candidate.is_file():
            return np.load(candidate, allow_pickle=False)
    if (folder / "labels.txt").is_file():
        return [line.strip() for line in (folder / "labels.txt").read_text().splitlines() if line.strip()]
    if (folder / "paths.txt").is_file():  # dinolab embed's index: labels from the ImageFolder layout
        lines = (folder / "paths.txt").read_text(encoding="utf-8", errors="surrogateescape").splitlines()
        return [Path(parse_path_line(line.strip())).parent.name for line in lines if line.strip()]
    raise ValueError(
        f"no labels for {features_file}: put labels.npy (integers) or labels.txt (one label per line) in {folder}"
    )


def _embeddings_from(
    name: str,
    features: np.ndarray,
    raw_labels: np.ndarray | list[str],
    classes: list[str] | None,
    patch_mean: np.ndarray | None = None,
) -> LabelledEmbeddings:
    if classes is not None:
        return LabelledEmbeddings(name, features, np.asarray(raw_labels, dtype=np.int64), classes, patch_mean)
    labels, classes = encode_labels([str(v) for v in np.asarray(raw_labels).tolist()])
    return LabelledEmbeddings(name, features, labels, classes, patch_mean)


# ----------------------------------------------------------------------------------------------- dispatch
def load_labelled(
    spec: str | os.PathLike,
    *,
    role: str = "train",
    data_root: str | os.PathLike | None = None,
    download: bool = False,
) -> LabelledData:
    """Open a DATA spec (see the module docstring). ``role`` ("train" or "eval") picks torchvision's default split."""
    text = os.fspath(spec)
    if text.startswith("torchvision:"):
        _, _, rest = text.partition(":")
        name, _, split = rest.partition(":")
        return load_torchvision(name, split or None, role=role, root=data_root, download=download)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix.lower() in EMBEDDING_SUFFIXES:
        return load_embeddings(path)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return load_file_list(path)
    if path.is_dir():
        if any(path.glob("*.npy")) or any(path.glob("*.npz")):
            npz = sorted(path.glob("*.npz"))
            return load_embeddings(npz[0] if npz and not any(path.glob("*.npy")) else path)
        return load_image_folder(path)
    raise FileNotFoundError(
        f"{text!r} is not a class-folder tree, a .txt/.csv list of 'path label' lines, an embeddings file/folder "
        f"(.npy/.npz) or torchvision:NAME (known: {', '.join(TORCHVISION_DATASETS)})"
    )


# ----------------------------------------------------------------------------------------------- splits
def stratified_split(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic per-class split: ``round(fraction * n_c)`` items of each class are held out (at least one
    item of every class stays in the kept part). Returns sorted ``(kept, held_out)`` indices."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        members = members[rng.permutation(len(members))]
        n_held = min(int(np.floor(fraction * len(members) + 0.5)), len(members) - 1)
        held.append(members[:n_held])
        kept.append(members[n_held:])
    kept_all, held_all = np.sort(np.concatenate(kept)), np.sort(np.concatenate(held))
    if len(held_all) == 0:
        raise ValueError(
            f"a {fraction:.0%} stratified hold-out of {len(labels)} items is empty (too few items per class); "
            "pass a validation set or a larger fraction"
        )
    return kept_all, held_all
