"""AdamW parameter groups of DINOv2: layer-wise lr decay, no weight decay on biases/norms/LayerScale, frozen
prototype layer.

Rules, per trainable parameter (names as in ``module.named_parameters()``):

- ``lr_multiplier``: inside the backbone (names starting with ``backbone_prefix``),
  ``layer_decay ** (num_blocks + 1 - layer_id)`` with ``layer_id`` 0 for the patch embedding and the tokens
  (``patch_embed``, ``cls_token``, ``pos_embed``, ``mask_token``, ``register_tokens``), ``i + 1`` for block ``i``
  (``blocks.{i}.`` or, chunked, ``blocks.{chunk}.{i}.``) and ``num_blocks + 1`` for the rest (the final norm);
  the patch embedding gets a further ``x patch_embed_lr_mult``. Outside the backbone (heads): 1.
- ``wd_multiplier``: 0 for biases, normalisation weights (a module named ``*norm*``), LayerScale ``gamma`` and
  any other parameter with fewer than 2 dims; 1 otherwise. As in the official
  ``get_params_groups_with_decay``, the position embedding and the tokens are decayed.
- ``is_last_layer``: the heads' ``last_layer`` (its lr follows the last-layer schedule, 0 in the first epoch).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer

_LAYER0_NAMES = frozenset({"patch_embed", "cls_token", "pos_embed", "mask_token", "register_tokens"})
# Path segments that wrappers insert into parameter names (torch.compile, activation checkpointing, FSDP1).
_WRAPPER_SEGMENTS = frozenset({"_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})
_GROUP_KEYS = ("lr_multiplier", "wd_multiplier", "is_last_layer")


def layer_id(backbone_name: str, num_blocks: int) -> int:
    """Depth of a backbone parameter (name relative to the backbone) for layer-wise lr decay."""
    parts = backbone_name.split(".")
    if parts[0] in _LAYER0_NAMES:
        return 0
    if parts[0] == "blocks" and len(parts) > 2:
        # blocks.{i}.* or, with chunked blocks (official FSDP layout), blocks.{chunk}.{i}.* with global i
        index = int(parts[2]) if parts[2].isdigit() else int(parts[1])
        if index >= num_blocks:
            raise ValueError(f"parameter {backbone_name!r} is in block {index} but num_blocks={num_blocks}")
        return index + 1
    return num_blocks + 1


def _strip_wrappers(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def _multipliers(
    name: str, ndim: int, num_blocks: int, layer_decay: float, patch_embed_lr_mult: float, backbone_prefix: str
) -> dict[str, Any]:
    parts = name.split(".")
    lr_multiplier = 1.0
    if name.startswith(backbone_prefix):
        local = name[len(backbone_prefix) :]
        lr_multiplier = layer_decay ** (num_blocks + 1 - layer_id(local, num_blocks))
        if local.startswith("patch_embed."):
            lr_multiplier *= patch_embed_lr_mult
    no_decay = ndim < 2 or parts[-1] == "bias" or parts[-1] == "gamma" or any("norm" in part for part in parts[:-1])
    return {
        "lr_multiplier": lr_multiplier,
        "wd_multiplier": 0.0 if no_decay else 1.0,
        "is_last_layer": "last_layer" in parts,
    }


def get_param_groups(
    module: nn.Module,
    num_blocks: int,
    layer_decay: float = 0.9,
    patch_embed_lr_mult: float = 0.2,
    backbone_prefix: str = "backbone.",
) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``module``'s trainable parameters, fused by identical multipliers.

    Each group is ``{"params", "names", "lr_multiplier", "wd_multiplier", "is_last_layer"}`` (see the module
    docstring for the rules), in order of first appearance; parameters with the same three values share a
    group (fewer groups make the fused/foreach AdamW faster). ``num_blocks`` is the backbone's depth.
    """
    if num_blocks < 0 or not 0.0 < layer_decay <= 1.0 or patch_embed_lr_mult < 0:
        raise ValueError(
            "get_param_groups needs num_blocks >= 0, 0 < layer_decay <= 1 and patch_embed_lr_mult >= 0, got "
            f"{num_blocks}, {layer_decay}, {patch_embed_lr_mult}"
        )
    groups: dict[tuple, dict[str, Any]] = {}
    for raw_name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        name = _strip_wrappers(raw_name)
        multipliers = _multipliers(name, param.ndim, num_blocks, layer_decay, patch_embed_lr_mult, backbone_prefix)
        key = tuple(multipliers[k] for k in _GROUP_KEYS)
        group = groups.setdefault(key, {"params": [], "names": [], **multipliers})
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ValueError("get_param_groups: the module has no trainable parameter (all have requires_grad=False)")
    return list(groups.values())


def apply_schedules(optimizer: Optimizer, lr: float, wd: float, last_layer_lr: float) -> None:
    """Set every group's ``lr`` (``last_layer_lr`` for last-layer groups) times its ``lr_multiplier``, and its
    ``weight_decay`` to ``wd`` times its ``wd_multiplier``; call once per iteration before ``optimizer.step()``."""
    for group in optimizer.param_groups:
        try:
            base = last_layer_lr if group["is_last_layer"] else lr
            group["lr"] = base * group["lr_multiplier"]
            group["weight_decay"] = wd * group["wd_multiplier"]
        except KeyError as missing:
            raise KeyError(
                f"optimizer param group lacks {missing}; build the optimizer from get_param_groups(...)"
            ) from None
