"""The chunked prototype cross-entropy must equal F.cross_entropy on the full logits, in value and in gradient."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils.parametrizations import weight_norm

from dinolab.losses import DINOLoss, dino_num_terms, dino_student_targets, prototype_cross_entropy


def _inputs(rows: int = 13, dim: int = 8, protos: int = 50, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = F.normalize(torch.randn(rows, dim, generator=g), dim=-1).requires_grad_()
    prototypes = torch.randn(protos, dim, generator=g).requires_grad_()
    targets = torch.randn(rows, protos, generator=g).softmax(-1)
    return features, prototypes, targets


def reference(features, prototypes, targets, temp):
    """torch's soft-label cross-entropy on the whole ``[rows, K]`` logits."""
    return F.cross_entropy(features @ prototypes.T / temp, targets, reduction="none")


TILES = [(1, None), (50, None), (3 * 50, None), (7 * 50 + 11, None), (10**6, None), (1, 1), (40, 16), (10**6, 7)]
"""(chunk_elements, chunk_columns) with K = 50 prototypes: row chunks of all columns, single-row chunks of one
column, and tiles of 16 or 7 columns whose last one is narrower."""


@pytest.mark.parametrize(("chunk_elements", "chunk_columns"), TILES)
def test_values_and_gradients_match_full_logits(chunk_elements: int, chunk_columns: int | None) -> None:
    features, prototypes, targets = _inputs()
    weights = torch.rand(features.shape[0], generator=torch.Generator().manual_seed(2))
    ours = prototype_cross_entropy(
        features, prototypes, targets, temp=0.1, chunk_elements=chunk_elements, chunk_columns=chunk_columns
    )
    ref = reference(features, prototypes, targets, 0.1)
    torch.testing.assert_close(ours, ref)
    ours_grads = torch.autograd.grad((ours * weights).sum(), [features, prototypes])
    ref_grads = torch.autograd.grad((ref * weights).sum(), [features, prototypes])
    for a, b in zip(ours_grads, ref_grads, strict=True):  # fp32 sums over the column tiles in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_target_segments_equal_the_concatenated_targets() -> None:
    features, prototypes, targets = _inputs(rows=9)
    shared = targets[4]
    segments = [targets[:4], shared.expand(3, -1), targets[7:]]
    whole = torch.cat([targets[:4], shared.expand(3, -1), targets[7:]])
    ours = prototype_cross_entropy(features, prototypes, segments, temp=0.2, chunk_elements=100)
    torch.testing.assert_close(ours, reference(features, prototypes, whole, 0.2))


def test_bf16_autocast_matches_a_bf16_matmul_with_fp32_softmax() -> None:
    features, prototypes, targets = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = prototype_cross_entropy(features, prototypes, targets, temp=0.1, chunk_elements=100)
        logits = features @ prototypes.T
    assert logits.dtype == torch.bfloat16 and ours.dtype == torch.float32
    torch.testing.assert_close(ours, F.cross_entropy(logits.float() / 0.1, targets, reduction="none"))


@pytest.mark.parametrize(("chunk_elements", "chunk_columns"), [(60, None), (10**6, None), (60, 16)])
def test_bf16_autocast_gradients_match_autograd_through_the_same_casts(
    chunk_elements: int, chunk_columns: int | None
) -> None:
    """The backward written out equals autograd through ``bf16 matmul -> fp32 log-softmax``; backward() called
    inside the autocast region, as the trainer does."""
    features, prototypes, targets = _inputs()
    weights = torch.rand(features.shape[0], generator=torch.Generator().manual_seed(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = prototype_cross_entropy(
            features, prototypes, targets, temp=0.1, chunk_elements=chunk_elements, chunk_columns=chunk_columns
        )
        ours_grads = torch.autograd.grad((ours * weights).sum(), [features, prototypes])
    logits = features.bfloat16() @ prototypes.bfloat16().T
    ref = -(targets * F.log_softmax(logits.float() / 0.1, dim=-1)).sum(-1)
    ref_grads = torch.autograd.grad((ref * weights).sum(), [features, prototypes])
    torch.testing.assert_close(ours, ref)
    for a, b in zip(ours_grads, ref_grads, strict=True):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)  # bf16 gradients: rounding of the [r, K] products


@pytest.mark.parametrize(
    ("chunk_elements", "chunk_columns"), [(50, None), (7 * 50 + 11, None), (10**6, None), (30, 16)]
)
def test_gradcheck_with_unnormalised_target_weights(chunk_elements: int, chunk_columns: int | None) -> None:
    """Numerical gradients in float64, with targets that sum to more than 1 (the DINO loss sums the targets of
    the other views) and a loss weighted per row."""
    g = torch.Generator().manual_seed(3)
    features = torch.randn(9, 5, generator=g, dtype=torch.float64).requires_grad_()
    prototypes = torch.randn(50, 5, generator=g, dtype=torch.float64).requires_grad_()
    targets = torch.rand(9, 50, generator=g, dtype=torch.float64) * 3

    def loss(f: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        segments = [targets[:4], targets[4:]]
        return prototype_cross_entropy(
            f, w, segments, temp=0.3, chunk_elements=chunk_elements, chunk_columns=chunk_columns
        )

    assert torch.autograd.gradcheck(loss, (features, prototypes))
    torch.testing.assert_close(
        loss(features, prototypes).float(),
        -(targets * F.log_softmax(features @ prototypes.T / 0.3, dim=-1)).sum(-1).float(),
    )


def _weight_normed_layer(protos: int, dim: int, dtype: torch.dtype = torch.float32, seed: int = 5):
    """torch's own weight-norm parametrization (the DINO heads' prototype layer) with magnitudes g != 1."""
    torch.manual_seed(seed)
    layer = weight_norm(torch.nn.Linear(dim, protos, bias=False).to(dtype))
    with torch.no_grad():
        layer.parametrizations.weight.original0.uniform_(0.5, 2.0)
    return layer, layer.parametrizations.weight.original0, layer.parametrizations.weight.original1


@pytest.mark.parametrize(
    ("chunk_elements", "chunk_columns"), [(50, None), (7 * 50 + 11, None), (10**6, None), (40, 16)]
)
def test_weight_norm_magnitudes_match_the_parametrized_layer(chunk_elements: int, chunk_columns: int | None) -> None:
    """Passing v and g gives the loss and the gradients (features, v, g) of the materialised g * v / ||v||,
    differentiated by autograd through torch's weight_norm."""
    features, _, targets = _inputs()
    layer, g, v = _weight_normed_layer(protos=50, dim=8)
    weights = torch.rand(features.shape[0], generator=torch.Generator().manual_seed(2))
    ours = prototype_cross_entropy(
        features, v, targets, 0.1, chunk_elements=chunk_elements, magnitudes=g, chunk_columns=chunk_columns
    )
    ref = F.cross_entropy(layer(features) / 0.1, targets, reduction="none")
    torch.testing.assert_close(ours, ref)
    ours_grads = torch.autograd.grad((ours * weights).sum(), [features, v, g])
    ref_grads = torch.autograd.grad((ref * weights).sum(), [features, v, g])
    for a, b in zip(ours_grads, ref_grads, strict=True):  # fp32 sums over the column tiles in another order
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(("chunk_elements", "chunk_columns"), [(50, None), (10**6, None), (30, 16)])
def test_weight_norm_gradcheck(chunk_elements: int, chunk_columns: int | None) -> None:
    g = torch.Generator().manual_seed(4)
    features = torch.randn(7, 5, generator=g, dtype=torch.float64).requires_grad_()
    targets = torch.rand(7, 50, generator=g, dtype=torch.float64) * 2
    _, magnitudes, v = _weight_normed_layer(protos=50, dim=5, dtype=torch.float64)

    def loss(f: torch.Tensor, v_: torch.Tensor, g_: torch.Tensor) -> torch.Tensor:
        return prototype_cross_entropy(
            f, v_, targets, temp=0.3, chunk_elements=chunk_elements, magnitudes=g_, chunk_columns=chunk_columns
        )

    assert torch.autograd.gradcheck(loss, (features, v.detach().requires_grad_(), magnitudes.detach().requires_grad_()))


def test_weight_norm_under_bf16_autocast_matches_the_materialised_weight() -> None:
    """bf16 matmul with fp32 softmax: the same as the cross-entropy of the materialised weight under autocast."""
    features, _, targets = _inputs(rows=40, dim=16, protos=300)
    _, g, v = _weight_normed_layer(protos=300, dim=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = prototype_cross_entropy(features, v, targets, 0.1, magnitudes=g)
        weight = torch._weight_norm(v, g, 0)
        ref = prototype_cross_entropy(features, weight, targets, 0.1)
    torch.testing.assert_close(ours, ref, atol=0.05, rtol=0.01)


def test_weight_norm_magnitudes_must_match_the_prototypes() -> None:
    features, prototypes, targets = _inputs()
    with pytest.raises(ValueError, match="one value per prototype"):
        prototype_cross_entropy(features, prototypes, targets, 0.1, magnitudes=torch.ones(3, 1))


def test_without_grad_and_with_no_rows() -> None:
    features, prototypes, targets = _inputs()
    with torch.no_grad():
        ours = prototype_cross_entropy(features, prototypes, targets, temp=0.1, chunk_elements=60)
    torch.testing.assert_close(ours, reference(features, prototypes, targets, 0.1).detach())
    empty = prototype_cross_entropy(features[:0], prototypes, targets[:0], temp=0.1)
    assert empty.shape == (0,)


def test_bad_shapes_raise() -> None:
    features, prototypes, targets = _inputs()
    with pytest.raises(ValueError, match="targets have 12 rows"):
        prototype_cross_entropy(features, prototypes, targets[:12], temp=0.1)
    with pytest.raises(ValueError, match="K=50"):
        prototype_cross_entropy(features, prototypes, targets[:, :10], temp=0.1)
    with pytest.raises(ValueError, match=r"features \[R, D\]"):
        prototype_cross_entropy(features, prototypes[:, :3], targets, temp=0.1)
    with pytest.raises(ValueError, match="temp > 0"):
        prototype_cross_entropy(features, prototypes, targets, temp=0.0)
    with pytest.raises(ValueError, match="chunk_columns >= 1"):
        prototype_cross_entropy(features, prototypes, targets, temp=0.1, chunk_columns=0)


@pytest.mark.parametrize(("n_student", "n_teacher"), [(10, 2), (2, 2), (3, 1), (4, 3)])
def test_dino_loss_as_one_cross_entropy_per_student_crop(n_student: int, n_teacher: int) -> None:
    g = torch.Generator().manual_seed(1)
    batch, protos = 3, 20
    student = torch.randn(n_student, batch, protos, generator=g)
    teacher = torch.randn(n_teacher, batch, protos, generator=g).softmax(-1)
    rows = torch.cat(dino_student_targets(teacher, n_student))  # [S*B, K]
    ce = F.cross_entropy(student.flatten(0, 1) / 0.1, rows, reduction="none")
    loss = ce.sum() / dino_num_terms(n_student, n_teacher, batch)
    torch.testing.assert_close(loss, DINOLoss(0.1)(student, teacher))


def test_dino_student_targets_need_two_views() -> None:
    with pytest.raises(ValueError, match="no pair of different views"):
        dino_student_targets(torch.rand(2, 3, 4), num_student_crops=1)


def test_default_tiles_on_cpus_and_gpus() -> None:
    from dinolab.losses.prototypes import default_chunk_columns, default_chunk_elements

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (default_chunk_elements(cpu), default_chunk_columns(cpu)) == (2**22, 8192)  # 512 x 8192 tiles
    assert (default_chunk_elements(cuda), default_chunk_columns(cuda)) == (2**26, None)  # 1024 rows x all 65536


def test_chunks_run_across_target_segments() -> None:
    from dinolab.losses.prototypes import _target_chunks

    segments = [torch.randn(n, 6) for n in (3, 1, 1, 5)]
    chunks = list(_target_chunks(segments, rows_per_chunk=4))
    assert [c.rows for c in chunks] == [4, 4, 2]  # not one chunk per segment
    everything = slice(0, 6)
    torch.testing.assert_close(torch.cat([c.tile(everything, torch.float32) for c in chunks]), torch.cat(segments))
    assert chunks[2].tile(everything, torch.float32).data_ptr() == segments[3][3:].data_ptr()  # one segment: a view
    spanning = chunks[0].tile(slice(2, 4), torch.float32)  # across segments: a copy of the tile's columns only
    assert spanning.shape == (4, 2)
    torch.testing.assert_close(spanning, torch.cat(segments)[:4, 2:4])
    torch.testing.assert_close(chunks[1].sums(torch.float64)[:, 0], torch.cat(segments)[4:8].sum(-1).double())


@pytest.mark.parametrize("chunk_columns", [None, 16, 7])
def test_prototype_logits_equal_the_weight_normed_layer(chunk_columns: int | None) -> None:
    """The teacher's logits without gradients: tiles of any width, leading dimensions kept, the weight norm's
    prototypes never materialised; equal to the parametrized layer's output."""
    from dinolab.losses.prototypes import prototype_logits

    layer, g, v = _weight_normed_layer(protos=50, dim=8)
    features = torch.randn(2, 5, 8)
    with torch.no_grad():
        ours = prototype_logits(features, v, g, chunk_columns=chunk_columns)
        plain = prototype_logits(features, v, chunk_columns=chunk_columns)
        torch.testing.assert_close(ours, layer(features))
        torch.testing.assert_close(plain, features @ v.T)
    assert not ours.requires_grad


def test_the_head_without_gradients_gives_its_layer_output() -> None:
    from dinolab.models.heads import DINOHead

    torch.manual_seed(0)
    head = DINOHead(in_dim=16, out_dim=40, hidden_dim=24, bottleneck_dim=8)
    with torch.no_grad():
        head.last_layer.parametrizations.weight.original0.uniform_(0.5, 2.0)
    x = torch.randn(6, 16)
    with_grad = head(x)
    with torch.no_grad():
        torch.testing.assert_close(head(x), with_grad.detach())
