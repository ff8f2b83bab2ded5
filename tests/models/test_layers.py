"""The efficient layers against plain references: patch embedding, packed attention, both stochastic depths."""

import pytest
import torch
import torch.nn.functional as F

from dinolab.models.layers import Attention, Block, PatchEmbed, drop_path_by_subset, drop_path_by_zeroing


@pytest.mark.parametrize(("height", "width"), [(28, 28), (42, 28)])
def test_patch_embedding_equals_the_strided_conv(height: int, width: int) -> None:
    torch.manual_seed(0)
    embed = PatchEmbed(patch_size=7, embed_dim=16)
    images = torch.randn(2, 3, height, width)
    expected = F.conv2d(images, embed.proj.weight, embed.proj.bias, stride=7).flatten(2).transpose(1, 2)
    torch.testing.assert_close(embed(images), expected)


def naive_block_diagonal_attention(attn: Attention, groups: list[torch.Tensor]) -> list[torch.Tensor]:
    """All sequences concatenated into one, attention masked to each sequence's own tokens, computed by hand."""
    sequences = [seq for group in groups for seq in group]  # each [T, D]
    owner = torch.cat([torch.full((seq.shape[0],), i) for i, seq in enumerate(sequences)])
    tokens = torch.cat(sequences)  # [sum T, D]
    q, k, v = attn.qkv(tokens).view(tokens.shape[0], 3, attn.num_heads, attn.head_dim).permute(1, 2, 0, 3)
    scores = q @ k.transpose(-2, -1) * attn.scale  # [heads, sum T, sum T]
    scores = scores.masked_fill(owner[:, None] != owner[None, :], float("-inf"))
    out = attn.proj((scores.softmax(-1) @ v).transpose(0, 1).reshape(tokens.shape[0], -1))
    sizes = [g.shape[0] * g.shape[1] for g in groups]
    return [chunk.view_as(g) for chunk, g in zip(out.split(sizes), groups, strict=True)]


def test_packed_attention_is_block_diagonal_attention() -> None:
    torch.manual_seed(0)
    attn = Attention(dim=16, num_heads=2)
    groups = [torch.randn(3, 5, 16), torch.randn(4, 2, 16)]
    shapes = [(g.shape[0], g.shape[1]) for g in groups]
    packed = attn.forward_packed(torch.cat([g.reshape(-1, 16) for g in groups]), shapes)
    expected = torch.cat([e.reshape(-1, 16) for e in naive_block_diagonal_attention(attn, groups)])
    torch.testing.assert_close(packed, expected)


def test_block_on_a_packed_list_equals_one_call_per_tensor() -> None:
    torch.manual_seed(0)
    block = Block(dim=16, num_heads=2, init_values=0.5).eval()
    groups = [torch.randn(3, 5, 16), torch.randn(4, 2, 16)]
    for packed, single in zip(block(groups), [block(g) for g in groups], strict=True):
        torch.testing.assert_close(packed, single)


def _double(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return [2 * x + 1 for x in xs]


def test_subset_drop_path_runs_the_branch_on_the_kept_samples_only() -> None:
    x = torch.randn(10, 3, 4)
    seen = []

    def branch(xs):
        seen.append(xs[0].shape[0])
        return _double(xs)

    torch.manual_seed(0)
    out = drop_path_by_subset([x], branch, drop_rate=0.3)[0]
    assert seen == [7]  # int(10 * 0.7)
    changed = (out != x).flatten(1).any(dim=1)
    assert changed.sum() == 7
    # kept samples get the branch output scaled by B / kept, the others are untouched
    torch.testing.assert_close(out[changed], x[changed] + (2 * x[changed] + 1) * 10 / 7)
    torch.testing.assert_close(out[~changed], x[~changed])


@pytest.mark.parametrize("drop", [drop_path_by_subset, drop_path_by_zeroing])
def test_both_stochastic_depths_are_unbiased(drop) -> None:
    torch.manual_seed(0)
    x = torch.randn(8, 2, 3)
    expected = x + 2 * x + 1
    mean = torch.stack([drop([x], _double, drop_rate=0.25)[0] for _ in range(4000)]).mean(0)
    torch.testing.assert_close(mean, expected, rtol=0.05, atol=0.1)


def test_subset_drop_path_keeps_at_least_one_sample() -> None:
    x = torch.randn(2, 3, 4)
    out = drop_path_by_subset([x], _double, drop_rate=0.9)[0]
    assert (out != x).flatten(1).any(dim=1).sum() == 1


def test_compiled_block_with_activation_checkpointing_matches_eager() -> None:
    torch.manual_seed(0)
    eager = Block(dim=16, num_heads=2, init_values=0.5, drop_path=0.0)
    compiled = Block(dim=16, num_heads=2, init_values=0.5, drop_path=0.0)
    compiled.load_state_dict(eager.state_dict())
    compiled.activation_checkpointing = "full"
    compiled.compile_body(backend="aot_eager")  # traced and partitioned like inductor, without a C++ toolchain
    groups = [torch.randn(3, 5, 16, requires_grad=True), torch.randn(4, 2, 16, requires_grad=True)]
    outputs = {}
    for name, block in (("eager", eager), ("compiled", compiled)):
        out = block(groups)
        grads = torch.autograd.grad(sum(o.square().sum() for o in out), [*groups, *block.parameters()])
        outputs[name] = [o.detach() for o in out], grads
    for a, b in zip(
        outputs["compiled"][0] + list(outputs["compiled"][1]), outputs["eager"][0] + list(outputs["eager"][1])
    ):
        torch.testing.assert_close(a, b)
    assert set(compiled.state_dict()) == set(eager.state_dict())


def _kept_bytes_and_grads(block: Block, groups: list[torch.Tensor]) -> tuple[int, list, list]:
    """Bytes still allocated after the forward (outputs and what autograd keeps for backward; the profiler's
    count of CPU allocations minus frees), outputs, gradients."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(7)  # the same drop-path draws in every mode
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = block(groups)
    kept = sum(event.self_cpu_memory_usage for event in prof.events())
    grads = torch.autograd.grad(sum(o.square().sum() for o in out), [*groups, *block.parameters()])
    return kept, [o.detach() for o in out], list(grads)


def test_checkpointing_modes_give_the_same_result_and_keep_less() -> None:
    """``full`` and ``selective`` recompute (drop-path draws included) exactly what ``none`` stores; ``selective``
    keeps less than ``none`` (no layer-norm, GELU or gathered inputs) and ``full`` least. Autograd through the
    modules (the fused CPU branches of ``none`` and ``full``: tests/models/test_fused.py)."""
    torch.manual_seed(0)
    block = Block(dim=32, num_heads=4, init_values=0.5, drop_path=0.3)
    block.fused_branches = False
    groups = [torch.randn(6, 9, 32, requires_grad=True), torch.randn(6, 4, 32, requires_grad=True)]
    results = {}
    for mode in ("none", "selective", "full"):
        block.activation_checkpointing = mode
        results[mode] = _kept_bytes_and_grads(block, groups)
    for mode in ("selective", "full"):
        for a, b in zip(results[mode][1] + results[mode][2], results["none"][1] + results["none"][2], strict=True):
            torch.testing.assert_close(a, b)
    assert results["full"][0] < results["selective"][0] < 0.8 * results["none"][0]
    block.activation_checkpointing = "some"
    with pytest.raises(ValueError, match="activation_checkpointing"):
        block(groups)
