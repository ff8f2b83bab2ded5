"""Frozen-feature evaluations. Classification: k-NN, linear-probe grid, logistic regression. Dense and other
tasks: segmentation, depth, instance retrieval, video (``dinolab.eval.segmentation`` … ``dinolab.eval.video``)."""

from dinolab.eval.classification import TASKS, evaluate_classification
from dinolab.eval.dense import DenseResult, slide_inference, train_head
from dinolab.eval.depth import evaluate_depth, train_depth
from dinolab.eval.features import ExtractionConfig, Features, extract_labelled, model_fingerprint
from dinolab.eval.heads import (
    Depther,
    LinearDepthHead,
    LinearSegHead,
    Segmenter,
    depth_head_from_checkpoint,
    seg_head_from_checkpoint,
)
from dinolab.eval.knn import KnnConfig, knn_class_scores, run_knn
from dinolab.eval.linear import LEARNING_RATES, LinearConfig, run_linear
from dinolab.eval.logreg import LogRegConfig, c_grid, run_logreg
from dinolab.eval.readers.classification import (
    LabelledEmbeddings,
    LabelledImages,
    load_embeddings,
    load_file_list,
    load_image_folder,
    load_labelled,
    load_torchvision,
    stratified_split,
)
from dinolab.eval.results import (
    Accuracy,
    ClassificationReport,
    KnnResult,
    LinearResult,
    LogRegResult,
    report_markdown,
    write_report,
)
from dinolab.eval.retrieval import compute_map, evaluate_retrieval
from dinolab.eval.segmentation import evaluate_segmentation, train_segmentation
from dinolab.eval.video import evaluate_video

__all__ = [
    "LEARNING_RATES",
    "TASKS",
    "Accuracy",
    "ClassificationReport",
    "DenseResult",
    "Depther",
    "ExtractionConfig",
    "Features",
    "KnnConfig",
    "KnnResult",
    "LabelledEmbeddings",
    "LabelledImages",
    "LinearConfig",
    "LinearDepthHead",
    "LinearResult",
    "LinearSegHead",
    "LogRegConfig",
    "LogRegResult",
    "Segmenter",
    "c_grid",
    "compute_map",
    "depth_head_from_checkpoint",
    "evaluate_classification",
    "evaluate_depth",
    "evaluate_retrieval",
    "evaluate_segmentation",
    "evaluate_video",
    "extract_labelled",
    "knn_class_scores",
    "load_embeddings",
    "load_file_list",
    "load_image_folder",
    "load_labelled",
    "load_torchvision",
    "model_fingerprint",
    "report_markdown",
    "run_knn",
    "run_linear",
    "run_logreg",
    "seg_head_from_checkpoint",
    "slide_inference",
    "stratified_split",
    "train_depth",
    "train_head",
    "train_segmentation",
    "write_report",
]
