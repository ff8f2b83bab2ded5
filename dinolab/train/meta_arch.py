"""The DINOv2 student/teacher pair and one training forward: teacher targets, student predictions, losses."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dinolab.data.collate import Batch
from dinolab.losses import CenteringEMA, DINOLoss, ibot_loss, koleo_loss, sinkhorn_knopp
from dinolab.models.heads import DINOHead
from dinolab.models.vit import DinoVisionTransformer, build_vit
from dinolab.train.config import HeadsConfig, LossConfig, ModelConfig


@dataclass
class LossTerms:
    """The weighted total and each (unweighted) term of one forward."""

    total: Tensor
    dino: Tensor
    ibot: Tensor
    koleo: Tensor

    def detached(self) -> dict[str, float]:
        return {name: float(getattr(self, name).detach()) for name in ("total", "dino", "ibot", "koleo")}


def build_backbone(config: ModelConfig, img_size: int, drop_path_rate: float | None = None) -> DinoVisionTransformer:
    """The backbone a run trains; register models use the newer interpolation of the released register models."""
    kwargs = dict(
        patch_size=config.patch_size,
        img_size=img_size,
        num_register_tokens=config.num_register_tokens,
        drop_path_rate=config.drop_path_rate if drop_path_rate is None else drop_path_rate,
        init_values=config.layerscale_init,
        efficient_drop_path=config.efficient_drop_path,
        interpolate_antialias=config.num_register_tokens > 0,
        interpolate_offset=0.0 if config.num_register_tokens else 0.1,
    )
    if config.depth:
        kwargs["depth"] = config.depth
    return build_vit(config.arch, **kwargs)


def build_heads(config: HeadsConfig, embed_dim: int) -> nn.ModuleDict:
    heads = nn.ModuleDict(
        {
            "dino_head": DINOHead(
                embed_dim,
                config.dino_prototypes,
                hidden_dim=config.dino_hidden_dim,
                bottleneck_dim=config.dino_bottleneck_dim,
                nlayers=config.dino_nlayers,
            )
        }
    )
    if config.ibot_separate_head:
        heads["ibot_head"] = DINOHead(
            embed_dim,
            config.ibot_prototypes,
            hidden_dim=config.ibot_hidden_dim,
            bottleneck_dim=config.ibot_bottleneck_dim,
            nlayers=config.ibot_nlayers,
        )
    return heads


class SSLMetaArch(nn.Module):
    """Student (backbone + heads, trained) and teacher (its EMA, never back-propagated).

    ``student`` and ``teacher`` are ``ModuleDict``s with ``backbone``, ``dino_head`` and, with a separate iBOT
    head, ``ibot_head``; parameter names are therefore ``student.backbone.blocks.0…`` etc.
    """

    def __init__(self, model: ModelConfig, heads: HeadsConfig, loss: LossConfig, img_size: int) -> None:
        super().__init__()
        self.loss_config = loss
        backbone = build_backbone(model, img_size)
        self.student = nn.ModuleDict({"backbone": backbone, **build_heads(heads, backbone.embed_dim)})
        self.teacher = copy.deepcopy(self.student)
        for block in self.teacher["backbone"].blocks:
            block.drop_path = 0.0  # the teacher sees clean inputs: no masks, no stochastic depth
        self.teacher.requires_grad_(False)
        self.packed_sequences = model.packed_sequences
        self.heads_on_all_patches = False
        """Baseline only (benchmarks): run the iBOT head on every patch token and select the masked ones after,
        as the iBOT code does, instead of on the masked tokens alone."""
        self.dino_loss = DINOLoss(student_temp=loss.student_temp)
        self.dino_center = CenteringEMA(heads.dino_prototypes, momentum=loss.center_momentum)
        ibot_prototypes = heads.ibot_prototypes if heads.ibot_separate_head else heads.dino_prototypes
        self.ibot_center = CenteringEMA(ibot_prototypes, momentum=loss.center_momentum)

    # ------------------------------------------------------------------------------------------------ helpers
    def _masked_patch_logits(self, net: nn.ModuleDict, cls_tokens: Tensor, patches: Tensor, batch: Batch):
        """Head outputs for CLS tokens ``[n, D]`` and the masked patches of ``patches [G*B, N, D]``."""
        if not self.heads_on_all_patches:
            masked = patches.flatten(0, 1).index_select(0, batch.mask_indices)  # [M, D]
            return self._heads(net, cls_tokens, masked)
        cls_logits, all_logits = self._heads(net, cls_tokens, patches.flatten(0, 1))
        return cls_logits, all_logits.index_select(0, batch.mask_indices)

    def _heads(self, net: nn.ModuleDict, cls_tokens: Tensor, patch_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """DINO head on CLS tokens ``[n, D]``, iBOT head on masked patch tokens ``[M, D]`` — one call when shared."""
        if "ibot_head" in net:
            return net["dino_head"](cls_tokens), net["ibot_head"](patch_tokens)
        logits = net["dino_head"](torch.cat([cls_tokens, patch_tokens]))
        return logits[: cls_tokens.shape[0]], logits[cls_tokens.shape[0] :]

    def _targets(self, logits: Tensor, temp: float, center: CenteringEMA) -> Tensor:
        if self.loss_config.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp)
        probs = center.probs(logits, temp)
        center.update(logits)
        return probs

    @torch.no_grad()
    def teacher_targets(self, batch: Batch, teacher_temp: float) -> tuple[Tensor, Tensor]:
        """Teacher probabilities for the DINO loss ``[G, B, K]`` and for the masked patches ``[M, K]``."""
        num_images = batch.num_images
        out = self.teacher["backbone"].forward_features(batch.global_crops)
        cls_logits, patch_logits = self._masked_patch_logits(
            self.teacher, out["x_norm_clstoken"], out["x_norm_patchtokens"], batch
        )  # [G*B, K], [M, K]
        dino_probs = self._targets(cls_logits.float(), teacher_temp, self.dino_center)
        # called even with no masked patch here: the targets are collective across processes
        ibot_probs = self._targets(patch_logits.float(), teacher_temp, self.ibot_center)
        return dino_probs.view(-1, num_images, dino_probs.shape[-1]), ibot_probs

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, batch: Batch, teacher_temp: float, freeze_backbone: bool = False) -> LossTerms:
        """Losses of one (micro-)batch. ``freeze_backbone`` trains only the heads (continued pretraining)."""
        cfg = self.loss_config
        num_images = batch.num_images
        dino_targets, ibot_targets = self.teacher_targets(batch, teacher_temp)

        crops = [batch.global_crops] + ([batch.local_crops] if batch.local_crops.shape[0] else [])
        masks = [batch.masks] + [None] * (len(crops) - 1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_backbone):
            outs = self.student["backbone"].forward_features_list(crops, masks, packed=self.packed_sequences)
        global_cls = outs[0]["x_norm_clstoken"]  # [G*B, D]
        cls_tokens = torch.cat([out["x_norm_clstoken"] for out in outs])  # [(G+L)*B, D], crop-major
        patches = outs[0]["x_norm_patchtokens"]  # [G*B, N, D]
        if freeze_backbone:
            global_cls, cls_tokens, patches = global_cls.detach(), cls_tokens.detach(), patches.detach()
        cls_logits, patch_logits = self._masked_patch_logits(self.student, cls_tokens, patches, batch)

        # the losses reduce over K prototypes: compute them in fp32 even under bf16/fp16 autocast
        with torch.autocast(cls_logits.device.type, enabled=False):
            cls_logits, patch_logits = cls_logits.float(), patch_logits.float()
            zero = cls_logits.new_zeros(())
            dino = self.dino_loss(cls_logits.view(-1, num_images, cls_logits.shape[-1]), dino_targets.float())
            ibot = zero
            if cfg.ibot_weight > 0 and patch_logits.shape[0]:
                ibot = ibot_loss(
                    patch_logits,
                    ibot_targets.float(),
                    batch.mask_weights,
                    num_images=batch.global_crops.shape[0],
                    student_temp=cfg.student_temp,
                )
            koleo = zero
            if cfg.koleo_weight > 0:
                koleo = sum(koleo_loss(chunk) for chunk in global_cls.float().chunk(dino_targets.shape[0]))
            total = cfg.dino_weight * dino + cfg.ibot_weight * ibot + cfg.koleo_weight * koleo
        return LossTerms(total=total, dino=dino, ibot=ibot, koleo=koleo)

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher = momentum * teacher + (1 - momentum) * student``, all parameters at once."""
        teacher = [p for p in self.teacher.parameters()]
        student = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)
