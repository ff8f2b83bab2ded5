"""One call from a backbone and labelled sets to k-NN, linear-probe and logistic-regression results."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, replace

from torch import nn

from dinolab.eval.features import ExtractionConfig, Features, extract_labelled, make_augmented_transform
from dinolab.eval.knn import KnnConfig, run_knn
from dinolab.eval.linear import LinearConfig, run_linear
from dinolab.eval.logreg import LogRegConfig, run_logreg
from dinolab.eval.readers.classification import (
    LabelledData,
    LabelledEmbeddings,
    LabelledImages,
    remap_labels,
    stratified_split,
)
from dinolab.eval.results import ClassificationReport

logger = logging.getLogger(__name__)

TASKS = ("knn", "linear", "logreg")

Source = LabelledData | Features


def _align(source: Source, classes: list[str]) -> Source:
    """Re-index an evaluation set's labels into the training set's classes (by class name)."""
    if source.classes == classes:
        return source
    if isinstance(source, Features):
        labels = remap_labels(source.name, source.labels, source.classes, classes)
        return Features(labels, source.cls, classes, source.patch_mean, source.name, source.failures)
    return source.with_classes(classes)


def _rename(source: Source, name: str) -> Source:
    return replace(source, name=name) if source.name != name else source


def evaluate_classification(
    backbone: nn.Module | None,
    train: Source,
    val: Source | None = None,
    test: Source | None = None,
    *,
    tasks: Sequence[str] = TASKS,
    extraction: ExtractionConfig = ExtractionConfig(),  # noqa: B008 - frozen dataclasses
    knn: KnnConfig = KnnConfig(),  # noqa: B008
    linear: LinearConfig = LinearConfig(),  # noqa: B008
    logreg: LogRegConfig = LogRegConfig(),  # noqa: B008
    val_fraction: float = 0.1,
    seed: int = 0,
    model_id: str | None = None,
    augment_linear: bool = False,
) -> ClassificationReport:
    """Extract features once per set (cached when ``extraction.cache_dir`` is set) and run the requested tasks.

    Sets: ``train`` (required), ``val`` and ``test`` (optional), each labelled images, precomputed embeddings or
    already extracted :class:`Features`. Without ``val`` and ``test``, a stratified ``val_fraction`` of train
    becomes the validation set. k-NN reports on every evaluation set; the linear probe chooses its head on ``val``
    (or a hold-out of train) and reports on ``val`` and ``test``; logistic regression chooses C on a hold-out of
    train and reports on ``val`` and ``test``. ``augment_linear`` re-extracts augmented training features every
    linear epoch (the official training augmentation; one extraction per epoch).
    """
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
        raise ValueError(f"unknown tasks {unknown}; choose among {list(TASKS)}")
    val = _align(val, train.classes) if val is not None else None
    test = _align(test, train.classes) if test is not None else None
    if val is None and (test is None or (augment_linear and "linear" in tasks)):
        kept, held = stratified_split(train.labels, val_fraction, seed)
        train, val = train.subset(kept), train.subset(held, f"{train.name} val split ({val_fraction:.0%})")
    if val is not None and test is not None and val.name == test.name:
        val, test = _rename(val, f"val {val.name}"), _rename(test, f"test {test.name}")

    def features_of(source: Source) -> Features:
        return (
            source
            if isinstance(source, Features)
            else extract_labelled(backbone, source, extraction, model_id=model_id)
        )

    train_f = features_of(train)
    val_f = features_of(val) if val is not None else None
    test_f = features_of(test) if test is not None else None
    evaluated = [f for f in (val_f, test_f) if f is not None]
    report = ClassificationReport(
        failures={f.name: f.failures for f in (train_f, *evaluated)},
        config={
            "tasks": list(tasks),
            "extraction": asdict(extraction),
            "knn": asdict(knn),
            "linear": asdict(linear),
            "logreg": asdict(logreg),
            "val_fraction": val_fraction,
            "seed": seed,
            "augment_linear": augment_linear,
            "sets": {
                "train": train_f.name,
                "val": val_f.name if val_f else None,
                "test": test_f.name if test_f else None,
            },
            "model_id": model_id,
        },
    )
    if "knn" in tasks:
        report.knn = [run_knn(train_f, f, knn) for f in evaluated]
    if "linear" in tasks:
        provider = _augmented_provider(backbone, train, extraction) if augment_linear else None
        tests = [test_f] if test_f is not None else []
        report.linear = run_linear(train_f, val_f, tests, linear, train_epoch_features=provider)
    if "logreg" in tasks:
        report.logreg = run_logreg(train_f, val_f, [test_f] if test_f is not None else [], logreg)
    return report


def _augmented_provider(backbone: nn.Module | None, train: Source, extraction: ExtractionConfig):
    if not isinstance(train, LabelledImages) or backbone is None:
        kind = "embeddings" if isinstance(train, LabelledEmbeddings | Features) else type(train).__name__
        raise ValueError(f"augmented linear training needs training images and a backbone, got {kind}")
    transform = make_augmented_transform(extraction.crop)

    def provider(epoch: int) -> Features:
        logger.info("linear epoch %d: extracting augmented training features", epoch)
        return extract_labelled(backbone, train, extraction, transform=transform, use_cache=False)

    return provider
