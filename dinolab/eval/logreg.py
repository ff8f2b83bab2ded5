"""L-BFGS logistic regression on frozen global features, the regularisation chosen on held-out training data.

As in the official ``dinov2/eval/log_regression.py``: features = the last block's CLS token (no
standardisation, float64), L2-penalised multinomial logistic regression fitted by L-BFGS (``max_iter`` 1000,
``tol`` 1e-12), C swept over ``10 ** linspace(-6, 5, 45)``, chosen by top-1 on 10% of train (the first best,
i.e. the smallest C, on ties), then refit on all of train and scored on the evaluation sets. The official code
uses cuML; here scikit-learn's ``LogisticRegression(solver="lbfgs")`` (same objective and C convention) or,
optionally, ``torch.optim.LBFGS`` on the same objective (handy on a GPU). Differences, all optional: the
hold-out is stratified (official: a plain random 10%), and a coarser grid or a coarse-to-fine search saves fits.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from joblib import Parallel, delayed
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm

from dinolab.eval.features import Features
from dinolab.eval.readers.classification import stratified_split
from dinolab.eval.results import CScore, LogRegResult, accuracy
from dinolab.runtime import resolve_device

C_POWER_RANGE = (-6.0, 5.0)


def c_grid(size: int = 45) -> np.ndarray:
    """``10 ** linspace(-6, 5, size)``; the official grid has 45 values."""
    return 10.0 ** np.linspace(*C_POWER_RANGE, size)


@dataclass(frozen=True, kw_only=True)
class LogRegConfig:
    """Logistic-regression settings (defaults: the official ones)."""

    c_grid_size: int = 45
    """Number of C values in 10^[-6, 5] (official: 45)."""
    search: str = "full"
    """``full`` fits every C; ``coarse-to-fine`` fits every ``coarse_stride``-th C, then the grid around the best."""
    coarse_stride: int = 4
    holdout_fraction: float = 0.1
    """Stratified part of train on which C is chosen."""
    select_on_val: bool = False
    """Choose C on the validation set instead (official ``--finetune-on-val``); the final fit uses train only."""
    max_iter: int = 1000
    tol: float = 1e-12
    backend: str = "sklearn"
    """``sklearn`` (CPU) or ``torch`` (``torch.optim.LBFGS``, runs on ``device``)."""
    n_jobs: int = 1
    """Parallel fits of the C sweep (sklearn backend)."""
    seed: int = 0
    device: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.c_grid_size < 1 or self.coarse_stride < 1 or self.max_iter < 1:
            raise ValueError("c_grid_size, coarse_stride and max_iter must be >= 1")
        if self.search not in {"full", "coarse-to-fine"}:
            raise ValueError(f"search must be 'full' or 'coarse-to-fine', got {self.search!r}")
        if self.backend not in {"sklearn", "torch"}:
            raise ValueError(f"backend must be 'sklearn' or 'torch', got {self.backend!r}")


# model, features [N, D] -> class scores [N, num_classes]
Scorer = Callable[[np.ndarray], np.ndarray]


def fit_sklearn(
    x: np.ndarray, y: np.ndarray, C: float, num_classes: int, max_iter: int = 1000, tol: float = 1e-12
) -> Scorer:
    """Fit scikit-learn's L-BFGS logistic regression; the scorer returns probabilities over all classes."""
    model = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, tol=tol)
    with warnings.catch_warnings():
        # the official tol (1e-12) is rarely met: stopping at max_iter is the protocol's normal end, not a problem
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x, y)

    def score(features: np.ndarray) -> np.ndarray:
        probabilities = np.zeros((len(features), num_classes))
        probabilities[:, model.classes_] = model.predict_proba(features)  # classes absent from train stay 0
        return probabilities

    return score


def fit_torch(
    x: np.ndarray,
    y: np.ndarray,
    C: float,
    num_classes: int,
    max_iter: int = 1000,
    tol: float = 1e-12,
    device: torch.device | None = None,
) -> Scorer:
    """The same objective as scikit-learn's multinomial ``LogisticRegression`` (penalty on the weights, not the
    intercept), scaled by ``1 / N``, minimised with ``torch.optim.LBFGS`` in float64::

        mean_i CE(W x_i + b, y_i) + ||W||^2 / (2 C N)

    Like scikit-learn, only the classes present in ``y`` get a row (an absent class's free intercept would run
    to -inf and keep L-BFGS busy); the others score 0.
    """
    device = resolve_device(device)
    present, encoded = np.unique(y, return_inverse=True)
    features = torch.as_tensor(x, dtype=torch.float64, device=device)  # [N, D]
    labels = torch.as_tensor(encoded, dtype=torch.long, device=device)
    weight = torch.zeros(len(present), features.shape[1], dtype=torch.float64, device=device, requires_grad=True)
    bias = torch.zeros(len(present), dtype=torch.float64, device=device, requires_grad=True)
    # stopping as scipy's L-BFGS-B in scikit-learn: gradient below tol, or loss change below 64 machine epsilons
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=tol,
        tolerance_change=64 * torch.finfo(torch.float64).eps,
        history_size=10,
        line_search_fn="strong_wolfe",
    )
    penalty = 1.0 / (2.0 * C * len(features))

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight.T + bias, labels) + penalty * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()

    def score(query: np.ndarray) -> np.ndarray:
        logits = torch.as_tensor(query, dtype=torch.float64, device=device) @ weight.T + bias
        probabilities = np.zeros((len(query), num_classes))
        probabilities[:, present] = logits.softmax(dim=1).cpu().numpy()
        return probabilities

    return score


def _fit(x: np.ndarray, y: np.ndarray, C: float, num_classes: int, config: LogRegConfig) -> Scorer:
    if config.backend == "torch":
        device = torch.device(config.device) if config.device else None
        return fit_torch(x, y, C, num_classes, config.max_iter, config.tol, device)
    return fit_sklearn(x, y, C, num_classes, config.max_iter, config.tol)


def _top1(scores: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float((scores.argmax(axis=1) == labels).mean())


def select_c(
    train_x: np.ndarray,
    train_y: np.ndarray,
    held_x: np.ndarray,
    held_y: np.ndarray,
    num_classes: int,
    config: LogRegConfig = LogRegConfig(),
) -> tuple[float, list[CScore]]:
    """Fit on ``train`` for each C of the grid (or of the coarse-to-fine path), score top-1 on ``held``; returns
    the best C (the smallest among equals) and the sweep sorted by C."""
    grid = c_grid(config.c_grid_size)
    scores: dict[int, float] = {}

    def sweep(indices: Sequence[int]) -> None:
        todo = [i for i in indices if i not in scores]
        fit_and_score = delayed(lambda i: _top1(_fit(train_x, train_y, grid[i], num_classes, config)(held_x), held_y))
        n_jobs = config.n_jobs if config.backend == "sklearn" else 1
        iterator = tqdm(todo, desc="logreg C sweep", disable=not config.progress, unit="C")
        results = Parallel(n_jobs=n_jobs)(fit_and_score(i) for i in iterator)
        scores.update(zip(todo, results))

    if config.search == "full":
        sweep(range(len(grid)))
    else:
        stride = config.coarse_stride
        sweep(sorted(set(range(0, len(grid), stride)) | {len(grid) - 1}))
        coarse_best = max(sorted(scores), key=lambda i: (scores[i], -i))
        sweep(range(max(0, coarse_best - stride + 1), min(len(grid), coarse_best + stride)))
    evaluated = sorted(scores)
    best = max(evaluated, key=lambda i: (scores[i], -i))
    return float(grid[best]), [CScore(float(grid[i]), scores[i]) for i in evaluated]


def run_logreg(
    train: Features,
    val: Features | None = None,
    tests: Sequence[Features] = (),
    config: LogRegConfig = LogRegConfig(),
) -> LogRegResult:
    """Choose C on a stratified hold-out of ``train`` (or on ``val`` with ``config.select_on_val``), refit on all
    of ``train`` and report top-1/top-5 on ``val`` and every set of ``tests``."""
    reported = ([val] if val is not None else []) + list(tests)
    if not reported:
        raise ValueError("logistic regression needs a validation or test set to report on")
    num_classes = max(f.num_classes for f in (train, *reported))
    x = train.last_cls.astype(np.float64)  # [N, D]; float64 as the official default
    if config.select_on_val:
        if val is None:
            raise ValueError("select_on_val needs a validation set")
        selection = val.name
        best_c, sweep = select_c(x, train.labels, val.last_cls.astype(np.float64), val.labels, num_classes, config)
    else:
        kept, held = stratified_split(train.labels, config.holdout_fraction, config.seed)
        selection = f"{train.name} hold-out ({config.holdout_fraction:.0%})"
        best_c, sweep = select_c(x[kept], train.labels[kept], x[held], train.labels[held], num_classes, config)
    final = _fit(x, train.labels, best_c, num_classes, config)
    evals = {
        f.name: accuracy(torch.from_numpy(final(f.last_cls.astype(np.float64))), torch.from_numpy(f.labels))
        for f in reported
    }
    return LogRegResult(best_c, sweep, selection, evals, len(train), config.backend)
