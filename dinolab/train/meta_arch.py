"""The DINOv2 student/teacher pair and one training forward: teacher targets, student predictions, losses."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dinolab.data.collate import Batch
from dinolab.losses import (
    CenteringEMA,
    DINOLoss,
    dino_num_terms,
    dino_student_targets,
    ibot_loss,
    koleo_loss,
    sinkhorn_knopp,
)
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
        """Baseline only (benchmarks): run the heads on every token of every crop and the iBOT loss densely over
        all patches, as the iBOT code does, instead of on the CLS and masked tokens alone."""
        self.dino_loss = DINOLoss(student_temp=loss.student_temp)
        self.dino_center = CenteringEMA(heads.dino_prototypes, momentum=loss.center_momentum)
        ibot_prototypes = heads.ibot_prototypes if heads.ibot_separate_head else heads.dino_prototypes
        self.ibot_center = CenteringEMA(ibot_prototypes, momentum=loss.center_momentum)

    # ------------------------------------------------------------------------------------------------ helpers
    def _masked_patch_logits(self, net: nn.ModuleDict, cls_tokens: Tensor, patches: Tensor, batch: Batch):
        """Head outputs for CLS tokens ``[n, D]`` and the masked patches of ``patches [G*B, N, D]`` (the baseline
        computes them for every patch and selects after)."""
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
            return sinkhorn_knopp(logits, temp, inplace=True)  # the logits are not needed after
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
        dino_targets, ibot_targets = self.teacher_targets(batch, teacher_temp)

        crops = [batch.global_crops] + ([batch.local_crops] if batch.local_crops.shape[0] else [])
        masks = [batch.masks] + [None] * (len(crops) - 1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_backbone):
            outs = self.student["backbone"].forward_features_list(crops, masks, packed=self.packed_sequences)
        if freeze_backbone:
            outs = [{name: v if v is None else v.detach() for name, v in out.items()} for out in outs]
        global_cls = outs[0]["x_norm_clstoken"]  # [G*B, D]
        cls_tokens = torch.cat([out["x_norm_clstoken"] for out in outs])  # [(G+L)*B, D], crop-major
        patches = outs[0]["x_norm_patchtokens"]  # [G*B, N, D]
        if self.heads_on_all_patches:
            dino, ibot = self._prototype_losses_ibot_style(batch, outs, dino_targets, ibot_targets)
        elif cfg.chunked_cross_entropy:
            dino, ibot = self._prototype_losses_chunked(batch, cls_tokens, patches, dino_targets, ibot_targets)
        else:
            dino, ibot = self._prototype_losses(batch, cls_tokens, patches, dino_targets, ibot_targets)

        # the prototype losses are fp32 (they reduce over K prototypes); KoLeo and the total too
        with torch.autocast(global_cls.device.type, enabled=False):
            koleo = dino.new_zeros(())
            if cfg.koleo_weight > 0:
                koleo = sum(koleo_loss(chunk) for chunk in global_cls.float().chunk(dino_targets.shape[0]))
            total = cfg.dino_weight * dino + cfg.ibot_weight * ibot + cfg.koleo_weight * koleo
        return LossTerms(total=total, dino=dino, ibot=ibot, koleo=koleo)

    def _prototype_losses(
        self, batch: Batch, cls_tokens: Tensor, patches: Tensor, dino_targets: Tensor, ibot_targets: Tensor
    ) -> tuple[Tensor, Tensor]:
        """DINO and iBOT losses from the full student logits ``[rows, K]`` (``loss.chunked_cross_entropy=false``)."""
        cls_logits, patch_logits = self._masked_patch_logits(self.student, cls_tokens, patches, batch)
        with torch.autocast(cls_logits.device.type, enabled=False):
            cls_logits, patch_logits = cls_logits.float(), patch_logits.float()
            dino = self.dino_loss(cls_logits.view(-1, batch.num_images, cls_logits.shape[-1]), dino_targets.float())
            ibot = dino.new_zeros(())
            if self.loss_config.ibot_weight > 0 and patch_logits.shape[0]:
                ibot = ibot_loss(
                    patch_logits,
                    ibot_targets.float(),
                    batch.mask_weights,
                    num_images=batch.global_crops.shape[0],
                    student_temp=self.loss_config.student_temp,
                )
        return dino, ibot

    def _prototype_losses_ibot_style(
        self, batch: Batch, outs: list[dict[str, Tensor]], dino_targets: Tensor, ibot_targets: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Baseline only (benchmarks): the same losses computed the way the iBOT code does.

        The head runs on every token of every crop (the local crops' patch logits are computed and dropped), and
        the iBOT loss is dense over all patches of the global crops, the unmasked ones weighted 0.
        """
        cls_logits, patch_logits = [], []
        for out in outs:
            cls, patch = self._heads(self.student, out["x_norm_clstoken"], out["x_norm_patchtokens"].flatten(0, 1))
            cls_logits.append(cls)
            patch_logits.append(patch)
        global_patch_logits = patch_logits[0]  # [G*B*N, K]
        del patch_logits
        with torch.autocast(global_patch_logits.device.type, enabled=False):
            cls_logits = torch.cat(cls_logits).float()
            dino = self.dino_loss(cls_logits.view(-1, batch.num_images, cls_logits.shape[-1]), dino_targets.float())
            ibot = dino.new_zeros(())
            if self.loss_config.ibot_weight > 0 and batch.mask_indices.numel():
                rows = batch.mask_indices
                dense_targets = ibot_targets.new_zeros(global_patch_logits.shape).index_copy_(0, rows, ibot_targets)
                dense_weights = batch.mask_weights.new_zeros(dense_targets.shape[0]).index_copy_(
                    0, rows, batch.mask_weights
                )
                ibot = ibot_loss(
                    global_patch_logits.float(),
                    dense_targets,
                    dense_weights,
                    num_images=batch.global_crops.shape[0],
                    student_temp=self.loss_config.student_temp,
                )
        return dino, ibot

    def _prototype_losses_chunked(
        self, batch: Batch, cls_tokens: Tensor, patches: Tensor, dino_targets: Tensor, ibot_targets: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The same losses, each row's cross-entropy computed chunk by chunk by the head (no ``[rows, K]`` logits).

        The DINO loss becomes one cross-entropy per student CLS token against the summed targets of the other
        teacher views (:func:`dino_student_targets`); the iBOT loss weights each masked patch's cross-entropy.
        """
        temp = self.loss_config.student_temp
        num_student_crops = cls_tokens.shape[0] // batch.num_images
        dino_rows = dino_student_targets(dino_targets, num_student_crops)  # S x [B, K]
        rows = batch.mask_indices if self.loss_config.ibot_weight > 0 else batch.mask_indices[:0]
        masked = patches.flatten(0, 1).index_select(0, rows)  # [M, D]
        masked_targets = ibot_targets[: rows.shape[0]]  # all of them, or none when the iBOT loss is off
        if "ibot_head" in self.student:
            cls_ce = self.student["dino_head"].cross_entropy(cls_tokens, dino_rows, temp)
            patch_ce = self.student["ibot_head"].cross_entropy(masked, masked_targets, temp)
        else:  # one head call on the CLS tokens and the masked patches together, as in _heads
            tokens = torch.cat([cls_tokens, masked])
            ce = self.student["dino_head"].cross_entropy(tokens, [*dino_rows, masked_targets], temp)
            cls_ce, patch_ce = ce[: cls_tokens.shape[0]], ce[cls_tokens.shape[0] :]
        dino = cls_ce.sum() / dino_num_terms(num_student_crops, dino_targets.shape[0], batch.num_images)
        ibot = (patch_ce * batch.mask_weights[: patch_ce.shape[0]]).sum() / batch.global_crops.shape[0]
        return dino, ibot

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """``teacher = momentum * teacher + (1 - momentum) * student``, all parameters at once."""
        teacher = [p for p in self.teacher.parameters()]
        student = [p.detach() for p in self.student.parameters()]
        torch._foreach_lerp_(teacher, student, 1.0 - momentum)
