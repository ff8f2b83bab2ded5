"""Readers for every evaluation's datasets: labelled images and embeddings for classification (folders, lists,
torchvision names, precomputed features), and the standard layouts of the segmentation, depth, retrieval and video
datasets."""

from dinolab.eval.readers.classification import (
    LabelledEmbeddings,
    LabelledImages,
    load_embeddings,
    load_labelled,
    stratified_split,
)
from dinolab.eval.readers.depth import DepthSet, read_depth
from dinolab.eval.readers.retrieval import QueryTruth, RetrievalSet, safe_load_pickle
from dinolab.eval.readers.segmentation import IGNORE_INDEX, SegmentationSet, read_label
from dinolab.eval.readers.video import VideoSet, read_frames, sample_indices

__all__ = [
    "IGNORE_INDEX",
    "DepthSet",
    "LabelledEmbeddings",
    "LabelledImages",
    "QueryTruth",
    "RetrievalSet",
    "SegmentationSet",
    "VideoSet",
    "load_embeddings",
    "load_labelled",
    "read_depth",
    "read_frames",
    "read_label",
    "safe_load_pickle",
    "sample_indices",
    "stratified_split",
]
