"""Target health: is the teacher still telling images apart?

DINO-style training fails quietly: the losses stay finite while the teacher's targets drift to the uniform
distribution (every image assigned to every prototype alike; the DINO loss then sits at ``log K``) or concentrate
on a few prototypes (every image assigned to the same one), and the features stop improving. These statistics,
computed on logging steps over the *global* batch, make that visible:

- ``row_entropy``: mean entropy of a target row, ``/ log K`` (1 = uniform targets: nothing is taught);
- ``batch_entropy``: entropy of the batch-mean target, ``/ log K`` (near 0 = every image on the same prototypes);
- ``prototypes_used``: how many prototypes are the argmax of at least one target row;
- ``agreement``: fraction of rows where the student's argmax equals the teacher's;
- ``cls_std``: standard deviation over the batch of the L2-normalised CLS features, averaged over dimensions and
  multiplied by ``sqrt(D)`` (about 1 for features spread over the sphere, 0 when all images map to one point).

:class:`HealthMonitor` turns them into a warning that says what is wrong and what to try.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger("dinolab.train")

AGREEMENT_ROWS = 512
"""At most this many rows enter the student-teacher agreement: its head forward is the statistics' main cost (with
65536 prototypes, 4096 masked patches cost more than a fifth of a small CPU step; 512 are enough for a fraction)."""


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor


@torch.no_grad()
def target_stats(targets: Tensor, student_logits: Tensor | None = None, teacher_argmax: Tensor | None = None) -> dict:
    """Health of teacher targets ``[N, K]`` (rows sum to 1) over the global batch.

    ``student_logits [n, K]`` (optional) are the student's predictions for the first ``n`` rows, compared with
    ``teacher_argmax [n]`` (default: the argmax of those target rows). Collective when distributed: every process
    calls it, also with ``N = 0``. Returns plain floats.
    """
    probs = targets.float()
    num_protos = probs.shape[-1]
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1)  # [N]
    used = torch.bincount(probs.argmax(dim=-1), minlength=num_protos).float() if probs.shape[0] else None
    agree = probs.new_zeros(2)
    if student_logits is not None and student_logits.shape[0]:
        wanted = teacher_argmax if teacher_argmax is not None else probs[: student_logits.shape[0]].argmax(dim=-1)
        agree = probs.new_tensor([(student_logits.argmax(dim=-1) == wanted).sum(), student_logits.shape[0]])
    sums = torch.cat(
        [
            probs.new_tensor([entropy.sum(), probs.shape[0]]),
            agree,
            probs.sum(dim=0),  # [K]
            used if used is not None else probs.new_zeros(num_protos),  # [K]
        ]
    )
    _all_reduce_sum(sums)
    rows = float(sums[1])
    if rows == 0:
        return {}
    log_k = math.log(num_protos)
    mean_target = sums[4 : 4 + num_protos] / rows
    batch_entropy = float(-(mean_target * mean_target.clamp_min(1e-30).log()).sum())
    stats = {
        "row_entropy": float(sums[0]) / rows / log_k,
        "batch_entropy": batch_entropy / log_k,
        "prototypes_used": int((sums[4 + num_protos :] > 0).sum()),
    }
    if float(sums[3]) > 0:
        stats["agreement"] = float(sums[2] / sums[3])
    return stats


@torch.no_grad()
def feature_spread(features: Tensor) -> float:
    """``sqrt(D) x mean_d std_b(normalize(features)[b, d])`` over the global batch (``features [N, D]``)."""
    x = F.normalize(features.float(), dim=-1)
    sums = torch.cat([x.sum(dim=0), x.new_tensor([x.shape[0]])])
    _all_reduce_sum(sums)
    dim, count = x.shape[-1], float(sums[-1])
    if count < 2:
        return 0.0
    # two passes (mean, then centred squares): E[x^2] - E[x]^2 cancels badly in fp32 near collapse
    squares = ((x - sums[:dim] / count) ** 2).sum(dim=0)
    _all_reduce_sum(squares)
    return float((squares / (count - 1)).sqrt().mean()) * math.sqrt(dim)


@dataclass
class HealthThresholds:
    """When the targets count as unhealthy (fractions of ``log K``; spread of normalised CLS features)."""

    uniform_row_entropy: float = 0.95
    """Above this the DINO targets count as uniform. Not lower: the quickstart's targets sit at 0.83-0.91 for
    hundreds of iterations while its k-NN accuracy climbs from 60 to 83 (91 at 2700 iterations); targets that teach
    nothing (a teacher temperature of 50, the old cpu_small on textures) sit above 0.99."""
    collapsed_batch_entropy: float = 0.2
    collapsed_cls_std: float = 0.05
    patience: int = 2
    """Consecutive unhealthy logging steps before the first warning (a fresh run starts near uniform)."""
    repeat_every: int = 10
    """While it lasts, repeat the warning every this many logging steps."""


class HealthMonitor:
    """Warns (once, then every ``repeat_every`` logs while it lasts) when the targets stop carrying information."""

    def __init__(self, thresholds: HealthThresholds | None = None, enabled: bool = True) -> None:
        self.thresholds = thresholds or HealthThresholds()
        self.enabled = enabled
        self.unhealthy_logs = 0
        self.warnings: list[str] = []

    def diagnose(self, metrics: dict[str, float]) -> str | None:
        """What is wrong with these logged metrics (``health/…`` keys), or None."""
        t = self.thresholds
        problems = []
        row = metrics.get("health/dino_row_entropy")
        if row is not None and row > t.uniform_row_entropy:
            problems.append(
                f"the DINO targets are nearly uniform (row entropy {row:.2f} log K): the teacher no longer tells "
                "images apart and the DINO loss teaches nothing"
            )
        batch = metrics.get("health/dino_batch_entropy")
        if batch is not None and batch < t.collapsed_batch_entropy:
            used = metrics.get("health/dino_prototypes_used", float("nan"))
            problems.append(
                f"the DINO targets are concentrated on very few prototypes (batch entropy {batch:.2f} log K, "
                f"{used:.0f} prototypes used): every image gets the same target"
            )
        spread = metrics.get("health/teacher_cls_std")
        if spread is not None and spread < t.collapsed_cls_std:
            problems.append(f"the teacher's CLS features have collapsed to one point (spread {spread:.3f})")
        if not problems:
            return None
        return (
            "; ".join(problems)
            + ". Try: loss.centering=sinkhorn_knopp (keeps targets spread over the prototypes), a lower "
            "loss.teacher_temp, fewer heads.dino_prototypes for a small batch, a larger batch, milder crops "
            "(crops.local_scale) or a lower optim.base_lr; docs/training.md ('Target health') explains each."
        )

    def update(self, step: int, metrics: dict[str, float]) -> str | None:
        """Record one logging step; returns (and logs) the warning when one is due."""
        problem = self.diagnose(metrics) if self.enabled else None
        if problem is None:
            self.unhealthy_logs = 0
            return None
        self.unhealthy_logs += 1
        due = self.unhealthy_logs - self.thresholds.patience
        if due < 0 or due % self.thresholds.repeat_every:
            return None
        message = f"iteration {step}: {problem}"
        self.warnings.append(message)
        log.warning(message)
        return message
