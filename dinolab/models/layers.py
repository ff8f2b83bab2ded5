"""Building blocks of the DINOv2 Vision Transformer.

Parameter names match the released checkpoints exactly (``attn.qkv``, ``ls1.gamma``, ``mlp.w12`` …), so a
released state dict loads with ``strict=True``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

from dinolab.matmul import Linear
from dinolab.models import fused

CHECKPOINTING_MODES = ("none", "full", "selective")
"""Activation checkpointing of a block: ``full`` keeps only its input and recomputes everything in backward;
``selective`` keeps the outputs of its matrix products and attention and recomputes the cheap rest (layer norms,
GELU, layer scale, residual adds, drop-path gathers): less memory than none, no extra matmul FLOPs."""


def _matmul_and_attention_ops() -> list:
    aten = torch.ops.aten
    names = ("mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention")  # fmt: skip
    ops = [getattr(aten, name).default for name in names if hasattr(aten, name)]
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):  # the oneDNN CPU linear (dinolab.matmul)
        ops.append(torch.ops.mkldnn._linear_pointwise.default)
    return ops


class PatchEmbed(nn.Module):
    """Image to patch tokens: a conv with kernel = stride = patch size. ``[B, C, H, W] -> [B, N, D]``.

    The conv (kept as ``proj`` for the released keys) is computed as the matmul it is: the image cut into
    flattened patches times the kernel viewed as ``[D, C*p*p]``. Same result; several times faster than the
    conv in bf16 on CPUs, where it has no fast kernel, and a contiguous ``[B, N, D]`` output.
    """

    def __init__(self, patch_size: int = 14, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        _, _, height, width = x.shape
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {self.patch_size}; "
                f"resize or crop to a multiple of {self.patch_size} (e.g. 224 or 518)"
            )
        batch, channels, p = x.shape[0], x.shape[1], self.patch_size
        patches = x.reshape(batch, channels, height // p, p, width // p, p).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(batch, (height // p) * (width // p), channels * p * p)  # [B, N, C*p*p]
        kernel = self.proj.weight.reshape(self.proj.out_channels, -1)  # [D, C*p*p], (c, i, j) as in the patches
        return F.linear(patches, kernel, self.proj.bias)


class LayerScale(nn.Module):
    """Per-channel learned scale of a residual branch (CaiT)."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (flash / memory-efficient kernels)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by the number of heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = Linear(dim, dim, bias=proj_bias)

    def _split_heads(self, qkv: Tensor, batch: int, tokens: int) -> tuple[Tensor, Tensor, Tensor]:
        qkv = qkv.reshape(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, head_dim]
        return q, k, v

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_packed(x.reshape(-1, x.shape[-1]), [(x.shape[0], x.shape[1])]).view_as(x)

    def forward_packed(self, tokens: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """Attention over a packed token sequence with a block-diagonal structure.

        ``tokens`` is ``[sum_g B_g*T_g, D]``: group ``g`` holds ``B_g`` sequences of ``T_g`` tokens each (e.g. the
        global crops, then the local crops). The linear layers run once on all tokens; attention runs within
        each sequence only, which is exactly a block-diagonal attention mask without materialising it.
        """
        return self.proj(self.attend(self.qkv(tokens), shapes))

    def attend(self, qkv: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """The attention of each sequence of a packed ``[sum_g B_g*T_g, 3D]`` qkv, before the output projection."""
        outputs = self.attend_groups(qkv, shapes)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def attend_groups(self, qkv: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
        """:meth:`attend` per group: ``[B_g*T_g, D]`` each (on CPUs views of the attention kernel's output, whose
        memory is ``[B, T, heads, head_dim]``; elsewhere copies where it is not)."""
        outputs = []
        for chunk, (batch, length) in zip(qkv.split([b * t for b, t in shapes]), shapes):
            q, k, v = self._split_heads(chunk, batch, length)
            out = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, head_dim]
            outputs.append(out.transpose(1, 2).reshape(batch * length, -1))
        return outputs

    def attention_map(self, x: Tensor, num_queries: int | None = None) -> Tensor:
        """Softmax attention weights ``[B, heads, Q, T]`` of the first ``Q = num_queries`` tokens (all ``T`` by
        default) over all tokens (for visualisation; not used in training)."""
        q, k, _ = self._split_heads(self.qkv(x), x.shape[0], x.shape[1])
        q = q if num_queries is None else q[:, :, :num_queries]
        return (q @ k.transpose(-2, -1) * self.scale).softmax(dim=-1)


class Mlp(nn.Module):
    """Two-layer feed-forward network with GELU."""

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        self.fc1 = Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = Linear(hidden_features, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFNFused(nn.Module):
    """SwiGLU feed-forward of ViT-g/14: one fused input projection ``w12`` split into gate and value.

    The hidden width follows the released model: ``2/3`` of the nominal MLP width rounded up to a multiple
    of 8 (4096 for ViT-g's nominal 6144).
    """

    def __init__(self, in_features: int, hidden_features: int, bias: bool = True) -> None:
        super().__init__()
        hidden = (int(hidden_features * 2 / 3) + 7) // 8 * 8
        self.w12 = Linear(in_features, 2 * hidden, bias=bias)
        self.w3 = Linear(hidden, in_features, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


Branch = Callable[[list[Tensor]], list[Tensor]]


def drop_path_by_zeroing(xs: list[Tensor], branch: Branch, drop_rate: float) -> list[Tensor]:
    """Classic stochastic depth: compute the branch for every sample, zero the dropped ones, rescale the rest."""
    keep = 1.0 - drop_rate
    residuals = branch(xs)
    out = []
    for x, residual in zip(xs, residuals):
        mask = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(keep)
        out.append(x + residual * mask / keep)
    return out


def drop_path_by_subset(xs: list[Tensor], branch: Branch, drop_rate: float) -> list[Tensor]:
    """Efficient stochastic depth (DINOv2): compute the branch only for the kept samples.

    In each group, a random subset of ``max(int(B * (1 - drop_rate)), 1)`` samples goes through ``branch``; its
    output is added back to those samples scaled by ``B / kept`` (so the expectation matches the classic
    version). At ``drop_rate = 0.4`` this saves ~40% of the block's compute.
    """
    indices = []
    for x in xs:
        kept = max(int(x.shape[0] * (1.0 - drop_rate)), 1)
        indices.append(torch.randperm(x.shape[0], device=x.device)[:kept])
    residuals = branch([x[index] for x, index in zip(xs, indices)])
    return [
        torch.index_add(x, 0, index, residual.to(x.dtype), alpha=x.shape[0] / index.numel())
        for x, index, residual in zip(xs, indices, residuals)
    ]


def _pack(xs: list[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
    # [B_g, T_g, D] per group -> [sum_g B_g*T_g, D]
    shapes = [(x.shape[0], x.shape[1]) for x in xs]
    flat = [x.reshape(-1, x.shape[-1]) for x in xs]
    return (flat[0] if len(flat) == 1 else torch.cat(flat)), shapes


def _unpack(tokens: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    chunks = tokens.split([b * t for b, t in shapes])
    return [chunk.view(b, t, -1) for chunk, (b, t) in zip(chunks, shapes)]


def _save_matmul_outputs() -> tuple:
    """The context pair torch.utils.checkpoint takes: save matmul and attention outputs, recompute the rest."""
    return create_selective_checkpoint_contexts(_matmul_and_attention_ops())


def _gamma(layer_scale: nn.Module) -> Tensor | None:
    return layer_scale.gamma if isinstance(layer_scale, LayerScale) else None


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``.

    Takes one ``[B, T, D]`` tensor, or a list of them with different ``T`` (sequence packing: every token-wise
    layer runs once over all groups, attention stays within each sequence).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        init_values: float | None = 1e-5,
        drop_path: float = 0.0,
        ffn_layer: str = "mlp",
        efficient_drop_path: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        if ffn_layer == "mlp":
            self.mlp: nn.Module = Mlp(dim, hidden, bias=ffn_bias)
        elif ffn_layer in ("swiglu", "swiglufused"):
            self.mlp = SwiGLUFFNFused(dim, hidden, bias=ffn_bias)
        else:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r}; expected 'mlp' or 'swiglufused'")
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = drop_path
        self.efficient_drop_path = efficient_drop_path
        self.activation_checkpointing = "none"
        """One of :data:`CHECKPOINTING_MODES`: which activations are recomputed in backward (set by the trainer)."""
        self.fused_branches = True
        """Run the branches as dinolab.models.fused's functions where they apply (fp32 CPU training); False:
        autograd through the modules (the benchmarks' reference)."""

    def _attn_branch(self, xs: list[Tensor]) -> list[Tensor]:
        tokens, shapes = _pack(xs)
        if self._fused_branches(tokens):
            qkv = fused.norm_linear(tokens, self.norm1, self.attn.qkv)
            # the projection per group, on views of the attention's output: no packed copy kept for backward
            groups = self.attn.attend_groups(qkv, shapes)
            outs = [fused.scaled_linear(group, self.attn.proj, _gamma(self.ls1)) for group in groups]
            return [out.view(b, t, -1) for out, (b, t) in zip(outs, shapes)]
        return _unpack(self.ls1(self.attn.forward_packed(self.norm1(tokens), shapes)), shapes)

    def _ffn_branch(self, xs: list[Tensor]) -> list[Tensor]:
        tokens, shapes = _pack(xs)
        if self._fused_branches(tokens) and isinstance(self.mlp, Mlp):
            out = fused.feed_forward(tokens, self.norm2, self.mlp.fc1, self.mlp.fc2, _gamma(self.ls2))
            return _unpack(out, shapes)
        return _unpack(self.ls2(self.mlp(self.norm2(tokens))), shapes)

    def _fused_branches(self, tokens: Tensor) -> bool:
        """The branches as dinolab.models.fused's functions (the same values, less kept for backward): in CPU fp32
        training, unless selective checkpointing is on (its policy is written for the plain operators)."""
        return (
            self.fused_branches
            and self.activation_checkpointing != "selective"
            and self.training
            and fused.applies(tokens)
        )

    def compile_body(self, **compile_kwargs) -> None:
        """``torch.compile`` the block's computation in place; activation checkpointing, when on, stays outside
        the compiled code (inductor can fail on a checkpoint traced inside the graph). Keys are unchanged."""
        self._forward = torch.compile(self._forward, **compile_kwargs)

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        mode = self.activation_checkpointing
        if mode == "none" or not (self.training and torch.is_grad_enabled()):
            return self._forward(x)
        if mode not in CHECKPOINTING_MODES:
            raise ValueError(f"Block.activation_checkpointing must be one of {CHECKPOINTING_MODES}, got {mode!r}")
        # the RNG state is restored for the recomputation, so stochastic depth drops the same samples
        if mode == "full":
            return checkpoint(self._forward, x, use_reentrant=False)
        return checkpoint(self._forward, x, use_reentrant=False, context_fn=_save_matmul_outputs)

    def _forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:
        xs = x if isinstance(x, list) else [x]
        if not self.training or self.drop_path == 0.0:
            xs = [x + r for x, r in zip(xs, self._attn_branch(xs))]
            xs = [x + r for x, r in zip(xs, self._ffn_branch(xs))]
        else:
            drop = drop_path_by_subset if self.efficient_drop_path else drop_path_by_zeroing
            xs = drop(xs, self._attn_branch, self.drop_path)
            xs = drop(xs, self._ffn_branch, self.drop_path)
        return xs if isinstance(x, list) else xs[0]
