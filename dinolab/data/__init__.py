"""Data: reading images, multi-crop augmentation, iBOT masking, collation and the infinite resumable sampler."""

from dinolab.data.augmentation import AugmentationConfig, MultiCropAugmentation, MultiCropViews
from dinolab.data.collate import Batch, MultiCropCollate, collate_views, stratified_mask_counts
from dinolab.data.datasets import (
    TrainSample,
    UnlabeledImageDataset,
    make_pretraining_loader,
    sample_seed,
    seed_worker,
)
from dinolab.data.masking import MaskBlock, MaskingGenerator
from dinolab.data.samplers import InfiniteSampler, StreamIndex

__all__ = [
    "AugmentationConfig",
    "Batch",
    "InfiniteSampler",
    "MaskBlock",
    "MaskingGenerator",
    "MultiCropAugmentation",
    "MultiCropCollate",
    "MultiCropViews",
    "StreamIndex",
    "TrainSample",
    "UnlabeledImageDataset",
    "collate_views",
    "make_pretraining_loader",
    "sample_seed",
    "seed_worker",
    "stratified_mask_counts",
]
