"""Teacher targets: Sinkhorn-Knopp normalisation and EMA centering of the teacher's logits.

Both reduce over the *global* batch: when ``torch.distributed`` is initialised with more than one process, the
sums they need are all-reduced, so every process gets the targets it would get if the whole batch were local.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from dinolab.runtime import world_size


def _all_reduce(tensor: Tensor, maximum: bool = False) -> Tensor:
    """All-reduce (sum, or max) in place across processes when there are several; a no-op on one process."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if maximum else dist.ReduceOp.SUM)
    return tensor


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3, inplace: bool = False) -> Tensor:
    """Teacher targets by Sinkhorn-Knopp: soft assignments of the global batch spread evenly over prototypes.

    ``teacher_logits [N, K] -> probs [N, K]`` (fp32), each row summing to 1. The reference algorithm (SwAV,
    DINOv2's ``sinkhorn_knopp_teacher``), with ``N_g`` the global number of samples::

        Q = exp(logits / T); Q /= Q.sum()                              # over the global batch
        repeat n_iterations:
            Q /= Q.sum(samples) (all-reduced); Q /= K                  # each prototype gets mass 1/K
            Q /= Q.sum(prototypes);            Q /= N_g                # each sample gets mass 1/N_g
        return Q * N_g

    Computed here without the global scalings (``/Q.sum()``, ``/K``, ``/N_g``, ``*N_g``): each multiplies the
    whole matrix by one constant, which the next prototype or sample normalisation divides out again, so the
    result is the same. For the same reason the exponent is shifted by each prototype's global maximum logit
    (removed exactly by the first prototype normalisation), which keeps ``exp`` from overflowing at low
    temperatures. Collectives per call: one max and ``n_iterations`` sums of a ``[K]`` vector; every process
    must call it, even one with ``N = 0`` samples (e.g. no masked patch).

    ``inplace=True`` computes the result in the memory of fp32 ``teacher_logits`` (which it overwrites): one
    ``[N, K]`` buffer instead of two, for callers that no longer need the logits.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(
            f"sinkhorn_knopp expects teacher_logits [N, K] (samples, prototypes), got {tuple(teacher_logits.shape)}"
        )
    if teacher_temp <= 0 or n_iterations < 1:
        raise ValueError(
            f"sinkhorn_knopp needs teacher_temp > 0 and n_iterations >= 1, got {teacher_temp}, {n_iterations}"
        )
    logits = teacher_logits.float()  # [N, K]
    n_samples, n_protos = logits.shape
    proto_max = logits.amax(dim=0) if n_samples else logits.new_full((n_protos,), -torch.inf)  # [K]
    _all_reduce(proto_max, maximum=True)
    q = logits.sub_(proto_max) if inplace else logits - proto_max
    q.div_(teacher_temp).exp_()  # [N, K], entries in (0, 1]
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=0))  # [K]: equal total mass per prototype over the global batch
        q /= q.sum(dim=1, keepdim=True)  # [N, 1]: each sample's assignment sums to 1
    return q


class CenteringEMA(nn.Module):
    """Teacher targets by centering and sharpening (DINO): ``softmax((logits - center) / T)``.

    The center is an exponential moving average of the teacher logits' batch mean over the global batch:
    ``center = momentum * center + (1 - momentum) * mean_{global batch}(logits)``. It is state (a buffer, in
    ``state_dict()``), to be saved and restored with the checkpoint. Per step, call :meth:`probs` first, then
    :meth:`update` with the same logits: the official code's deferred update has the same effect (the targets
    of step ``i`` use the center updated through step ``i - 1``).
    """

    center: Tensor

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        if dim < 1 or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"CenteringEMA needs dim >= 1 and 0 <= momentum <= 1, got dim={dim}, momentum={momentum}")
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(dim))  # [K], fp32

    @torch.no_grad()
    def probs(self, teacher_logits: Tensor, teacher_temp: float) -> Tensor:
        """``[..., K] -> [..., K]`` fp32 probabilities ``softmax((logits - center) / teacher_temp)``."""
        self._check(teacher_logits)
        if teacher_temp <= 0:
            raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
        return torch.softmax((teacher_logits.float() - self.center) / teacher_temp, dim=-1)

    @torch.no_grad()
    def update(self, teacher_logits: Tensor) -> None:
        """EMA step of the center towards the mean of ``teacher_logits [..., K]`` over the global batch.

        The mean is weighted by sample count across processes (one all-reduce of ``K + 1`` numbers), so
        processes with different batch sizes (e.g. masked-patch counts) are averaged correctly.
        """
        self._check(teacher_logits)
        flat = teacher_logits.reshape(-1, self.center.shape[0]).float()  # [N, K]
        sum_and_count = torch.cat([flat.sum(dim=0), flat.new_tensor([flat.shape[0]])])  # [K + 1]
        _all_reduce(sum_and_count)
        count = sum_and_count[-1]
        if count == 0:  # nothing to average anywhere (e.g. no masked patch in the global batch)
            return
        batch_mean = sum_and_count[:-1] / count  # [K]
        self.center.mul_(self.momentum).add_(batch_mean, alpha=1.0 - self.momentum)

    def _check(self, teacher_logits: Tensor) -> None:
        if teacher_logits.shape[-1] != self.center.shape[0]:
            raise ValueError(
                f"CenteringEMA was built for {self.center.shape[0]} prototypes, got logits {tuple(teacher_logits.shape)}"
            )

    def extra_repr(self) -> str:
        return f"dim={self.center.shape[0]}, momentum={self.momentum}"
