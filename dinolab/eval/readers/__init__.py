"""Readers for the standard layouts of the dense, retrieval and video evaluation datasets."""

from dinolab.eval.readers.depth import DepthSet, read_depth
from dinolab.eval.readers.retrieval import QueryTruth, RetrievalSet, safe_load_pickle
from dinolab.eval.readers.segmentation import IGNORE_INDEX, SegmentationSet, read_label
from dinolab.eval.readers.video import VideoSet, read_frames, sample_indices

__all__ = [
    "IGNORE_INDEX",
    "DepthSet",
    "QueryTruth",
    "RetrievalSet",
    "SegmentationSet",
    "VideoSet",
    "read_depth",
    "read_frames",
    "read_label",
    "safe_load_pickle",
    "sample_indices",
]
