"""Projection heads of DINOv2 pretraining: the DINO head (also used as the iBOT head)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from dinolab.losses.prototypes import prototype_cross_entropy, prototype_logits
from dinolab.matmul import Linear


class DINOHead(nn.Module):
    """MLP projection to ``out_dim`` prototype scores (logits): the DINO and iBOT heads of DINOv2.

    ``x [..., in_dim] -> MLP (in -> hidden -> ... -> bottleneck, GELU between) -> L2-normalise
    -> weight-normalised linear bottleneck -> out_dim (no bias) -> [..., out_dim]``.

    The last layer is ``last_layer`` (the training loop zeroes its learning rate for the first epoch). Its
    weight is ``g * v / ||v||`` per prototype with the magnitude ``g`` initialised to 1, so at start every logit
    is a cosine similarity in [-1, 1].
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        for name, value in (
            ("in_dim", in_dim),
            ("out_dim", out_dim),
            ("hidden_dim", hidden_dim),
            ("bottleneck_dim", bottleneck_dim),
            ("nlayers", nlayers),
        ):
            if value < 1:
                raise ValueError(f"DINOHead {name} must be >= 1, got {value}")
        self.mlp = _build_mlp(nlayers, in_dim, hidden_dim, bottleneck_dim, bias=mlp_bias)
        self.mlp.apply(_init_linear)
        # As in the official head, the prototype layer keeps nn.Linear's default init for its direction ``v``
        # (only ``||v||`` matters to the effective step size of a weight-normalised layer).
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        features = self.project(x)
        if torch.is_grad_enabled():
            return self.last_layer(features)  # [..., out_dim]
        # the teacher's targets: without gradients the prototypes need not be materialised from v and g
        weight = self.last_layer.parametrizations.weight
        return prototype_logits(features, weight.original1, weight.original0)

    def project(self, x: Tensor) -> Tensor:
        """``[..., in_dim] -> [..., bottleneck_dim]``: the MLP and the L2 normalisation, before the prototypes."""
        x = self.mlp(x)
        # 1e-12 underflows in fp16; the official head uses 1e-6 there.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return F.normalize(x, dim=-1, p=2, eps=eps)

    def cross_entropy(self, x: Tensor, targets: Tensor | Sequence[Tensor], temp: float) -> Tensor:
        """Per-row cross-entropy of ``softmax(self(x) / temp)`` against ``targets``, without the full logits.

        ``x [R, in_dim]``, ``targets [R, out_dim]`` (or consecutive row segments of it) -> ``[R]`` fp32; see
        :func:`dinolab.losses.prototype_cross_entropy`. A method of the head (not a free function on its weight)
        so that FSDP2 gathers the parameters around it like around ``forward``. The weight-normalised prototypes
        go in as their direction and magnitude: the ``[out_dim, bottleneck_dim]`` weight is never materialised.
        """
        weight = self.last_layer.parametrizations.weight
        return prototype_cross_entropy(self.project(x), weight.original1, targets, temp, magnitudes=weight.original0)


def _build_mlp(nlayers: int, in_dim: int, hidden_dim: int, bottleneck_dim: int, bias: bool) -> nn.Module:
    if nlayers == 1:
        return Linear(in_dim, bottleneck_dim, bias=bias)
    layers: list[nn.Module] = [Linear(in_dim, hidden_dim, bias=bias), nn.GELU()]
    for _ in range(nlayers - 2):
        layers += [Linear(hidden_dim, hidden_dim, bias=bias), nn.GELU()]
    layers.append(Linear(hidden_dim, bottleneck_dim, bias=bias))
    return nn.Sequential(*layers)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
