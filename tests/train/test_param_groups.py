"""Parameter groups must carry the multipliers of dinov2.utils.param_groups.get_params_groups_with_decay (applied,
as the official meta-architecture does, to each student sub-model) and of the layer-decay formula."""

import logging

import pytest
import torch
from dinov2.layers import DINOHead as OfficialDINOHead
from dinov2.models.vision_transformer import DinoVisionTransformer as OfficialViT
from dinov2.utils.param_groups import get_params_groups_with_decay
from torch import nn

from dinolab.models import vit_tiny
from dinolab.models.heads import DINOHead
from dinolab.train.param_groups import apply_schedules, get_param_groups

logging.getLogger("dinov2").setLevel(logging.WARNING)


def _flatten(groups: list[dict]) -> dict[str, tuple]:
    return {
        name: (group["lr_multiplier"], group["wd_multiplier"], group["is_last_layer"])
        for group in groups
        for name in group["names"]
    }


def _official_per_submodel(student: nn.ModuleDict, decay: float, patch_mult: float) -> dict[str, tuple]:
    out = {}
    for key, submodel in student.items():
        for d in get_params_groups_with_decay(submodel, lr_decay_rate=decay, patch_embed_lr_mult=patch_mult):
            out[f"{key}.{d['name']}"] = (d["lr_multiplier"], d["wd_multiplier"], d["is_last_layer"])
    return out


def _official_student(block_chunks: int) -> nn.ModuleDict:
    backbone = OfficialViT(img_size=28, patch_size=14, embed_dim=16, depth=4, num_heads=2, block_chunks=block_chunks)
    head = dict(in_dim=16, out_dim=32, hidden_dim=16, bottleneck_dim=8)
    return nn.ModuleDict({"backbone": backbone, "dino_head": OfficialDINOHead(**head), "ibot_head": DINOHead(**head)})


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
@pytest.mark.parametrize("block_chunks", [0, 2])
def test_matches_official_on_official_vit_and_heads(block_chunks: int) -> None:
    student = _official_student(block_chunks)
    ours = _flatten(get_param_groups(student, num_blocks=4, layer_decay=0.9, patch_embed_lr_mult=0.2))
    official = _official_per_submodel(student, 0.9, 0.2)
    assert ours.keys() == official.keys()
    for name, values in official.items():
        assert ours[name] == pytest.approx(values, rel=1e-12), name


def test_matches_official_on_dinolab_vit_with_registers() -> None:
    backbone = vit_tiny(img_size=28, depth=3, num_register_tokens=2)
    backbone.chunked_blocks = False  # attribute the official function reads
    student = nn.ModuleDict({"backbone": backbone, "dino_head": DINOHead(192, 32, hidden_dim=16, bottleneck_dim=8)})
    ours = _flatten(get_param_groups(student, num_blocks=3, layer_decay=0.8, patch_embed_lr_mult=0.5))
    official = _official_per_submodel(student, 0.8, 0.5)
    # the April-2023 official code predates register tokens: it puts them at the last layer; we put them at layer 0
    official["backbone.register_tokens"] = (0.8**4, 1.0, False)
    assert ours.keys() == official.keys()
    for name, values in official.items():
        assert ours[name] == pytest.approx(values, rel=1e-12), name


def expected_lr_multiplier(name: str, depth: int, decay: float, patch_mult: float) -> float:
    if not name.startswith("backbone."):
        return 1.0
    if name.startswith(("backbone.patch_embed.",)):
        return decay ** (depth + 1) * patch_mult
    if name.startswith(("backbone.cls_token", "backbone.pos_embed", "backbone.mask_token")):
        return decay ** (depth + 1)
    if name.startswith("backbone.blocks."):
        return decay ** (depth - int(name.split(".")[2]))
    return 1.0  # final norm: layer depth + 1


def test_formula_and_fused_groups() -> None:
    backbone = vit_tiny(img_size=28, depth=2)
    student = nn.ModuleDict({"backbone": backbone, "dino_head": DINOHead(192, 32, hidden_dim=16, bottleneck_dim=8)})
    backbone.cls_token.requires_grad_(False)  # frozen parameters are left out
    groups = get_param_groups(student, num_blocks=2, layer_decay=0.5, patch_embed_lr_mult=0.2)
    flat = _flatten(groups)
    assert "backbone.cls_token" not in flat
    trainable = {n: p for n, p in student.named_parameters() if p.requires_grad}
    assert flat.keys() == trainable.keys()
    for name, (lr_mult, wd_mult, is_last) in flat.items():
        assert lr_mult == pytest.approx(expected_lr_multiplier(name, 2, 0.5, 0.2)), name
        assert wd_mult == (0.0 if trainable[name].ndim < 2 else 1.0), name
        assert is_last == name.startswith("dino_head.last_layer."), name
    keys = [(g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups]
    assert len(keys) == len(set(keys))  # one group per distinct triple
    assert all(len(g["params"]) == len(g["names"]) for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(trainable)


def test_wrapper_prefixes_are_ignored() -> None:
    student = nn.ModuleDict({"backbone": vit_tiny(img_size=28, depth=2)})
    compiled_like = nn.ModuleDict({"_orig_mod": student})
    plain = _flatten(get_param_groups(student, num_blocks=2))
    wrapped = _flatten(get_param_groups(compiled_like, num_blocks=2))
    assert plain == wrapped


def test_wrong_num_blocks_raises() -> None:
    student = nn.ModuleDict({"backbone": vit_tiny(img_size=28, depth=3)})
    with pytest.raises(ValueError, match="num_blocks=2"):
        get_param_groups(student, num_blocks=2)


def test_apply_schedules_sets_lr_and_weight_decay() -> None:
    student = nn.ModuleDict(
        {"backbone": vit_tiny(img_size=28, depth=2), "dino_head": DINOHead(192, 32, hidden_dim=16, bottleneck_dim=8)}
    )
    optimizer = torch.optim.AdamW(get_param_groups(student, num_blocks=2), betas=(0.9, 0.999))
    apply_schedules(optimizer, lr=1e-3, wd=0.04, last_layer_lr=0.0)
    for group in optimizer.param_groups:
        base = 0.0 if group["is_last_layer"] else 1e-3
        assert group["lr"] == pytest.approx(base * group["lr_multiplier"])
        assert group["weight_decay"] == pytest.approx(0.04 * group["wd_multiplier"])
    # a step with last_layer_lr = 0 leaves the prototype layer unchanged (the first-epoch freeze)
    last = student["dino_head"].last_layer.parametrizations.weight.original1
    first = student["dino_head"].mlp[0].weight
    last_before, first_before = last.detach().clone(), first.detach().clone()
    student["dino_head"](student["backbone"](torch.randn(2, 3, 28, 28))).sum().backward()
    optimizer.step()
    torch.testing.assert_close(last.detach(), last_before)
    assert not torch.equal(first.detach(), first_before)


def test_apply_schedules_needs_our_groups() -> None:
    optimizer = torch.optim.AdamW(nn.Linear(2, 2).parameters())
    with pytest.raises(KeyError, match="get_param_groups"):
        apply_schedules(optimizer, lr=1.0, wd=0.1, last_layer_lr=1.0)
