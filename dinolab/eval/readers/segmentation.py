"""Semantic segmentation datasets in their standard on-disk layouts: ADE20K, Pascal VOC 2012, Cityscapes, and a
generic image folder / mask folder pair.

Every reader returns a :class:`SegmentationSet`: (image, mask) path pairs and the lookup table that turns a mask
file's stored values into train ids (``0 .. num_classes-1``, :data:`IGNORE_INDEX` for pixels not scored).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from dinolab.data.images import IMAGE_EXTENSIONS

IGNORE_INDEX = 255

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel",
    "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane",
    "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster",
    "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool",
    "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture",
    "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

# Cityscapes label id (0..33, as stored in *_gtFine_labelIds.png) -> train id; ids not listed are ignored.
CITYSCAPES_LABEL_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14,
    28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def identity_lookup() -> np.ndarray:
    """Stored value -> the same train id (``[256]`` uint8)."""
    return np.arange(256, dtype=np.uint8)


def reduce_zero_label_lookup() -> np.ndarray:
    """ADE20K convention: stored 0 means "other" (ignored), classes 1..150 become train ids 0..149."""
    lut = (np.arange(256, dtype=np.int64) - 1) % 256
    lut[0] = IGNORE_INDEX
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut.astype(np.uint8)


def cityscapes_lookup() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label_id, train_id in CITYSCAPES_LABEL_TO_TRAIN.items():
        lut[label_id] = train_id
    return lut


@dataclass(frozen=True)
class SegmentationSet:
    """(image, mask) pairs of one split and how to read the masks."""

    name: str
    images: list[Path]
    masks: list[Path]
    num_classes: int
    class_names: tuple[str, ...]
    lookup: np.ndarray = field(default_factory=identity_lookup, repr=False)
    """``[256]`` uint8: stored mask value -> train id (or ``IGNORE_INDEX``)."""

    def __post_init__(self) -> None:
        if len(self.images) != len(self.masks):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.masks)} masks")
        if not self.images:
            raise ValueError(f"{self.name}: no (image, mask) pairs found; check the dataset root and split")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")
        if self.lookup.shape != (256,):
            raise ValueError(f"{self.name}: the mask lookup table must have 256 entries")

    def __len__(self) -> int:
        return len(self.images)

    def read_mask(self, index: int) -> np.ndarray:
        """Train ids of one mask, ``[H, W]`` uint8 (``IGNORE_INDEX`` = not scored); a value that is neither a class
        id below ``num_classes`` nor ignored raises ``ValueError`` naming the file (it would otherwise fail deep in
        the loss, or be scored as a wrong class)."""
        label = read_label(self.masks[index], self.lookup)
        bad = label[(label >= self.num_classes) & (label != IGNORE_INDEX)]
        if bad.size:
            raise ValueError(
                f"{self.masks[index]}: mask values {sorted(set(bad.tolist()))[:5]} are not class ids of this "
                f"{self.num_classes}-class set (0..{self.num_classes - 1}, {IGNORE_INDEX} = ignore); check "
                "--num-classes (or --reduce-zero-label when 0 means 'ignore')"
            )
        return label


def read_label(path: str | os.PathLike, lookup: np.ndarray) -> np.ndarray:
    """A mask PNG's stored values (palette indices for VOC, raw values otherwise) mapped through ``lookup``."""
    with Image.open(path) as mask:
        # Palette ("P") PNGs store class indices directly; converting them to RGB would lose them.
        if mask.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(
                f"{path}: mask has mode {mask.mode}; expected a single-channel (L) or palette (P) PNG of class ids"
            )
        values = np.asarray(mask)
    if values.max(initial=0) > 255:
        raise ValueError(f"{path}: mask values go up to {values.max()}; class ids must be < 256")
    return lookup[values.astype(np.uint8)]


def _split_dir(root: Path, options: tuple[str, ...], what: str) -> Path:
    for option in options:
        if (root / option).is_dir():
            return root / option
    raise FileNotFoundError(f"{what}: none of {', '.join(str(root / o) for o in options)} exists")


def ade20k(root: str | os.PathLike, split: str = "validation") -> SegmentationSet:
    """ADE20K (SceneParsing, 150 classes): ``ADEChallengeData2016/images/{training,validation}/*.jpg`` with
    ``annotations/{split}/*.png``; ``root`` may be the ``ADEChallengeData2016`` folder or its parent."""
    split = {"train": "training", "val": "validation"}.get(split, split)
    base = Path(root).expanduser()
    if (base / "ADEChallengeData2016").is_dir():
        base = base / "ADEChallengeData2016"
    image_dir = _split_dir(base / "images", (split,), "ADE20K images")
    mask_dir = _split_dir(base / "annotations", (split,), "ADE20K annotations")
    images = sorted(image_dir.glob("*.jpg"))
    masks = [mask_dir / (p.stem + ".png") for p in images]
    _check_exist(masks, "ADE20K annotation")
    return SegmentationSet(f"ade20k/{split}", images, masks, 150, ADE20K_CLASSES, reduce_zero_label_lookup())


def voc2012(root: str | os.PathLike, split: str = "val") -> SegmentationSet:
    """Pascal VOC 2012 (21 classes incl. background): ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass}`` and
    ``ImageSets/Segmentation/{split}.txt``; ``root`` may be ``VOCdevkit``, ``VOC2012`` or their parent.
    Masks are palette PNGs whose indices are the class ids (255 = object boundary, ignored)."""
    base = Path(root).expanduser()
    for candidate in (base / "VOCdevkit" / "VOC2012", base / "VOC2012", base):
        if (candidate / "ImageSets" / "Segmentation").is_dir():
            base = candidate
            break
    else:
        raise FileNotFoundError(f"VOC 2012: no ImageSets/Segmentation under {root} (expected VOCdevkit/VOC2012)")
    list_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        raise FileNotFoundError(f"VOC 2012: split list {list_file} does not exist (splits: train, val, trainval)")
    ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
    images = [base / "JPEGImages" / f"{i}.jpg" for i in ids]
    masks = [base / "SegmentationClass" / f"{i}.png" for i in ids]
    _check_exist(images, "VOC image")
    _check_exist(masks, "VOC mask")
    return SegmentationSet(f"voc2012/{split}", images, masks, 21, VOC_CLASSES, identity_lookup())


def cityscapes(root: str | os.PathLike, split: str = "val") -> SegmentationSet:
    """Cityscapes fine annotations: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` with
    ``gtFine/{split}/{city}/*_gtFine_labelIds.png``, label ids mapped to the 19 train ids."""
    base = Path(root).expanduser()
    image_dir = _split_dir(base / "leftImg8bit", (split,), "Cityscapes images")
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    masks = [
        base / "gtFine" / split / p.parent.name / p.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
        for p in images
    ]
    _check_exist(masks, "Cityscapes gtFine labelIds")
    return SegmentationSet(f"cityscapes/{split}", images, masks, 19, CITYSCAPES_CLASSES, cityscapes_lookup())


def folder_pair(
    image_dir: str | os.PathLike,
    mask_dir: str | os.PathLike,
    num_classes: int,
    class_names: tuple[str, ...] | None = None,
    reduce_zero_label: bool = False,
) -> SegmentationSet:
    """Images under ``image_dir`` and single-channel PNG masks of the same relative path and stem under
    ``mask_dir`` (values = class ids, 255 = ignore; or 0 = ignore and ids from 1 with ``reduce_zero_label``)."""
    image_dir, mask_dir = Path(image_dir).expanduser(), Path(mask_dir).expanduser()
    if not image_dir.is_dir() or not mask_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} or mask folder {mask_dir} does not exist")
    images = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    masks = [mask_dir / p.relative_to(image_dir).with_suffix(".png") for p in images]
    _check_exist(masks, "mask")
    names = class_names or tuple(f"class_{i}" for i in range(num_classes))
    lookup = reduce_zero_label_lookup() if reduce_zero_label else identity_lookup()
    return SegmentationSet(f"folder/{image_dir.name}", images, masks, num_classes, names, lookup)


def _check_exist(paths: list[Path], what: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} {what} file(s) missing, e.g. {missing[0]}")
