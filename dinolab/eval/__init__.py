"""Frozen-feature evaluations. Classification: k-NN, linear-probe grid, logistic regression."""

from dinolab.eval.classification import TASKS, evaluate_classification
from dinolab.eval.datasets import (
    LabelledEmbeddings,
    LabelledImages,
    load_embeddings,
    load_file_list,
    load_image_folder,
    load_labelled,
    load_torchvision,
    stratified_split,
)
from dinolab.eval.features import ExtractionConfig, Features, extract_labelled, model_fingerprint
from dinolab.eval.knn import KnnConfig, knn_class_scores, run_knn
from dinolab.eval.linear import LEARNING_RATES, LinearConfig, run_linear
from dinolab.eval.logreg import LogRegConfig, c_grid, run_logreg
from dinolab.eval.results import (
    Accuracy,
    ClassificationReport,
    KnnResult,
    LinearResult,
    LogRegResult,
    report_markdown,
    write_report,
)

__all__ = [
    "LEARNING_RATES",
    "TASKS",
    "Accuracy",
    "ClassificationReport",
    "ExtractionConfig",
    "Features",
    "KnnConfig",
    "KnnResult",
    "LabelledEmbeddings",
    "LabelledImages",
    "LinearConfig",
    "LinearResult",
    "LogRegConfig",
    "LogRegResult",
    "c_grid",
    "evaluate_classification",
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
    "stratified_split",
    "write_report",
]
