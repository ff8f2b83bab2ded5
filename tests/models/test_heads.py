"""DINOHead must reproduce dinov2.layers.DINOHead given the same weights, and be initialised like it."""

import copy
import warnings

import pytest
import torch
from dinov2.layers import DINOHead as OfficialDINOHead

from dinolab.hub.convert import head_state_dict_from_official
from dinolab.models.heads import DINOHead


def _official(**kwargs) -> OfficialDINOHead:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the official head uses the deprecated weight_norm
        return OfficialDINOHead(**kwargs)


@pytest.mark.parametrize(("nlayers", "mlp_bias"), [(3, True), (2, False), (1, True), (4, True)])
def test_matches_official_head_with_copied_weights(nlayers: int, mlp_bias: bool) -> None:
    torch.manual_seed(0)
    kwargs = dict(in_dim=24, out_dim=64, hidden_dim=32, bottleneck_dim=8, nlayers=nlayers, mlp_bias=mlp_bias)
    official = _official(**kwargs)
    with torch.no_grad():  # a non-trivial magnitude, so g is really compared
        official.last_layer.weight_g.uniform_(0.5, 2.0)
    ours = DINOHead(**kwargs)
    ours.load_state_dict(head_state_dict_from_official(official.state_dict()), strict=True)
    x = torch.randn(5, 24)
    torch.testing.assert_close(ours(x), official(x))
    torch.testing.assert_close(ours.last_layer.weight, official.last_layer.weight)


def test_init() -> None:
    torch.manual_seed(0)
    head = DINOHead(in_dim=64, out_dim=128, hidden_dim=256, bottleneck_dim=16)
    hidden = head.mlp[2]
    assert abs(hidden.weight.std().item() - 0.02) < 0.002 and hidden.bias.abs().max() == 0
    g = head.last_layer.parametrizations.weight.original0
    torch.testing.assert_close(g, torch.ones(128, 1))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(128))
    # L2-normalised input to unit-norm prototypes: logits are cosine similarities
    assert head(torch.randn(10, 64)).abs().max() <= 1.0 + 1e-6


def test_prefixed_official_keys_are_renamed() -> None:
    sd = {"dino_head.last_layer.weight_g": torch.ones(1), "dino_head.mlp.0.weight": torch.ones(1)}
    assert sorted(head_state_dict_from_official(sd)) == [
        "dino_head.last_layer.parametrizations.weight.original0",
        "dino_head.mlp.0.weight",
    ]


def test_fp16_uses_a_representable_eps() -> None:
    head = DINOHead(in_dim=8, out_dim=16, hidden_dim=8, bottleneck_dim=4, nlayers=1).half()
    with torch.no_grad():
        head.mlp.weight.zero_()
        head.mlp.bias.zero_()
    out = head(torch.randn(3, 8).half())  # zero bottleneck: 0 / max(0, 1e-12 -> 0 in fp16) would be NaN
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_last_layer_is_trainable_and_deepcopyable_for_the_teacher() -> None:
    head = DINOHead(in_dim=8, out_dim=16, hidden_dim=8, bottleneck_dim=4)
    head(torch.randn(3, 8)).sum().backward()
    last = [name for name, p in head.named_parameters() if name.startswith("last_layer.") and p.grad is not None]
    assert len(last) == 2
    teacher = copy.deepcopy(head)
    x = torch.randn(2, 8)
    torch.testing.assert_close(teacher(x), head(x))


def test_bad_dims_raise() -> None:
    with pytest.raises(ValueError, match="out_dim"):
        DINOHead(in_dim=8, out_dim=0)
