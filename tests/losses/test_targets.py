"""Teacher targets: sinkhorn_knopp and CenteringEMA against the official DINOv2 code, a float64 transcription of
the reference algorithm, and (distributed) the single-process result on the concatenated global batch."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dinov2.loss import DINOLoss as OfficialDINOLoss
from dinov2.loss import iBOTPatchLoss as OfficialiBOTLoss

from dinolab.losses import CenteringEMA, sinkhorn_knopp


def reference_sinkhorn(logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """SwAV / DINOv2 Sinkhorn-Knopp on Q = exp(logits / T)^T [K, N], step by step, in float64."""
    q = torch.exp(logits.double() / temp).t()  # [K, N]
    n_protos, n_samples = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= n_protos
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    return (q * n_samples).t()


def _logits(n: int = 12, k: int = 20, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("n_iterations", [1, 3, 10])
def test_sinkhorn_matches_reference_algorithm(n_iterations: int) -> None:
    logits = _logits()
    expected = reference_sinkhorn(logits, 0.07, n_iterations).float()
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.07, n_iterations), expected)


def test_sinkhorn_inplace_overwrites_the_logits_with_the_same_result() -> None:
    logits = _logits()
    expected = sinkhorn_knopp(logits, 0.07)
    result = sinkhorn_knopp(logits, 0.07, inplace=True)
    assert result.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(result, expected)
    half = _logits().bfloat16()  # not fp32: computed in an fp32 copy, the input left as it was
    torch.testing.assert_close(sinkhorn_knopp(half, 0.07, inplace=True), sinkhorn_knopp(half.float(), 0.07))
    torch.testing.assert_close(half, _logits().bfloat16())


def test_sinkhorn_matches_official() -> None:
    logits = _logits(n=16, k=32, seed=1) * 0.5
    official = OfficialDINOLoss(out_dim=32).sinkhorn_knopp_teacher(logits, teacher_temp=0.04)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.04), official)


def test_sinkhorn_stays_finite_where_plain_exp_overflows() -> None:
    # logits / T up to ~400: exp overflows fp32 in the official code; the per-prototype max shift removes it exactly.
    logits = _logits(scale=5.0, seed=2)
    official = OfficialDINOLoss(out_dim=20).sinkhorn_knopp_teacher(logits, teacher_temp=0.04)
    assert not torch.isfinite(official).all()
    ours = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, reference_sinkhorn(logits, 0.04).float())  # float64 exp does not overflow


def test_sinkhorn_marginals() -> None:
    logits = _logits(n=30, k=6, seed=3)
    probs = sinkhorn_knopp(logits, 0.1)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(30))  # each sample: a distribution
    # the prototypes' masses tend to N / K as the iterations converge (3 iterations are only approximate)
    converged = sinkhorn_knopp(logits, 0.1, n_iterations=200)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((6,), 30 / 6), rtol=1e-3, atol=1e-3)


def test_sinkhorn_bad_input_raises() -> None:
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        sinkhorn_knopp(torch.zeros(2, 3, 4), 0.1)
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp(torch.zeros(2, 3), 0.0)


def test_centering_matches_official_dino_and_ibot_centering() -> None:
    g = torch.Generator().manual_seed(4)
    ours_cls, ours_patch = CenteringEMA(24, momentum=0.9), CenteringEMA(24, momentum=0.9)
    official_cls, official_patch = OfficialDINOLoss(out_dim=24), OfficialiBOTLoss(patch_out_dim=24)
    for step in range(4):
        cls_logits, patch_logits = torch.randn(8, 24, generator=g) + step, torch.randn(11, 24, generator=g)
        temp = 0.04 + 0.01 * step
        # official: the center update of step i is applied lazily at the next softmax_center_teacher call
        expected_cls = official_cls.softmax_center_teacher(cls_logits, teacher_temp=temp)
        official_cls.update_center(cls_logits)
        expected_patch = official_patch.softmax_center_teacher(patch_logits.unsqueeze(0), teacher_temp=temp)[0]
        official_patch.update_center(patch_logits.unsqueeze(0))
        torch.testing.assert_close(ours_cls.probs(cls_logits, temp), expected_cls)
        torch.testing.assert_close(ours_patch.probs(patch_logits, temp), expected_patch)
        ours_cls.update(cls_logits)
        ours_patch.update(patch_logits)


def test_centering_formula_and_state_dict_round_trip() -> None:
    logits = _logits(n=5, k=7, seed=5)
    center = CenteringEMA(7, momentum=0.8)
    center.update(logits)
    torch.testing.assert_close(center.center, 0.2 * logits.mean(0))
    restored = CenteringEMA(7, momentum=0.8)
    restored.load_state_dict(center.state_dict())
    torch.testing.assert_close(restored.probs(logits, 0.05), torch.softmax((logits - 0.2 * logits.mean(0)) / 0.05, -1))
    center.update(logits[:0])  # an empty batch leaves the center unchanged
    torch.testing.assert_close(center.center, restored.center)
    with pytest.raises(ValueError, match="7 prototypes"):
        center.probs(torch.zeros(2, 8), 0.1)


# ---------------------------------------------------------------------------------------------- distributed (gloo)
SPLITS = (5, 3, 0)  # per-rank sample counts of the 3 checks below, rank 0 / rank 1 = SPLITS[i] / N - SPLITS[i]
N_TOTAL = 8


def _worker(rank: int, world_size: int, store: str, out_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        logits = _logits(n=N_TOTAL, k=10, seed=6)
        results = {}
        for first in SPLITS:
            local = logits[:first] if rank == 0 else logits[first:]
            center = CenteringEMA(10, momentum=0.5)
            center.update(local)
            results[first] = {"sk": sinkhorn_knopp(local, 0.05), "center": center.center.clone()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_distributed_targets_equal_single_process_on_global_batch(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    logits = _logits(n=N_TOTAL, k=10, seed=6)
    expected_sk = sinkhorn_knopp(logits, 0.05)
    expected_center = CenteringEMA(10, momentum=0.5)
    expected_center.update(logits)
    for first in SPLITS:
        torch.testing.assert_close(torch.cat([ranks[0][first]["sk"], ranks[1][first]["sk"]]), expected_sk)
        for rank in ranks:
            torch.testing.assert_close(rank[first]["center"], expected_center.center)
    # single-process SK on a half is different: the distributed result really used the other rank's samples
    assert not torch.allclose(ranks[0][5]["sk"], sinkhorn_knopp(logits[:5], 0.05))
