"""The DINOv2 student/teacher pair and one training forward: teacher targets, student predictions, losses."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
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
from dinolab.models.vit import DinoVisionTransformer, build_vit, position_interpolation
from dinolab.runtime import phase
from dinolab.train.config import HeadsConfig, LossConfig, ModelConfig, TrainConfig
from dinolab.train.health import AGREEMENT_ROWS, feature_spread, target_stats


@dataclass
class LossTerms:
    """The weighted total and each (unweighted) term of one forward."""

    total: Tensor
    dino: Tensor
    ibot: Tensor
    koleo: Tensor
    health: dict[str, float] = field(default_factory=dict)
    """Target-health statistics (``dinolab.train.health``), computed when the forward is asked for them."""

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
        **position_interpolation(config.num_register_tokens),
    )
    if config.depth:
        kwargs["depth"] = config.depth
    if config.ffn_layer:
        kwargs["ffn_layer"] = "swiglufused" if config.ffn_layer == "swiglu" else "mlp"
    backbone = build_vit(config.arch, **kwargs)
    if config.weight_init != "trunc_normal":
        backbone.init_weights(linear_init=config.weight_init)
    return backbone


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


class TeacherOutput(NamedTuple):
    """What the teacher gives the student in one step."""

    dino_targets: Tensor  # [G, B, K] probabilities for the DINO loss
    ibot_targets: Tensor  # [M, K] probabilities of the selected (masked, or in distillation all) patches
    cls_tokens: Tensor  # [G*B, D_teacher] normalised CLS tokens (for the health statistics)


def select_all_patches(batch: Batch) -> Batch:
    """The batch with every patch of every global crop selected for the iBOT loss (distillation), each weighted
    ``1 / N`` so that the loss is the per-image mean, as for masked patches."""
    crops, patches = batch.masks.shape  # [G*B, N]
    indices = torch.arange(crops * patches, device=batch.masks.device)
    weights = torch.full((crops * patches,), 1.0 / patches, device=batch.masks.device)
    return dataclasses.replace(batch, mask_indices=indices, mask_weights=weights)


class SSLMetaArch(nn.Module):
    """Student (backbone + heads, trained) and teacher (its EMA, never back-propagated).

    ``student`` and ``teacher`` are ``ModuleDict``s with ``backbone``, ``dino_head`` and, with a separate iBOT
    head, ``ibot_head``; parameter names are therefore ``student.backbone.blocks.0…`` etc.
    """

    def __init__(
        self,
        model: ModelConfig,
        heads: HeadsConfig,
        loss: LossConfig,
        img_size: int,
        distillation_teacher: nn.ModuleDict | None = None,
        masked_student: bool = True,
    ) -> None:
        """``distillation_teacher`` (backbone + heads of another, frozen model) switches to distillation: the
        teacher is never updated, the student sees unmasked crops without stochastic depth, the iBOT loss covers
        every patch of both global crops, and ``student_ema`` (an EMA of the student's backbone) is the model the
        run produces. ``masked_student=False`` (masking switched off) freezes the mask token, which then never
        gets a gradient (and so would have no optimizer state to save and resume)."""
        super().__init__()
        self.loss_config = loss
        self.distillation = distillation_teacher is not None
        backbone = build_backbone(model, img_size, drop_path_rate=0.0 if self.distillation else None)
        if self.distillation or not masked_student:
            backbone.mask_token.requires_grad_(False)
        self.student = nn.ModuleDict({"backbone": backbone, **build_heads(heads, backbone.embed_dim)})
        if distillation_teacher is None:
            self.teacher = copy.deepcopy(self.student)
        else:
            self.teacher = distillation_teacher
            self.student_ema = copy.deepcopy(backbone).requires_grad_(False)
            _init_heads_from_teacher(self.student, self.teacher)
        for block in self.teacher["backbone"].blocks:
            block.drop_path = 0.0  # the teacher sees clean inputs: no masks, no stochastic depth
        self.teacher.requires_grad_(False)
        self.packed_sequences = model.packed_sequences
        self.dino_loss = DINOLoss(student_temp=loss.student_temp)
        self.dino_center = CenteringEMA(heads.dino_prototypes, momentum=loss.center_momentum)
        ibot_prototypes = heads.ibot_prototypes if heads.ibot_separate_head else heads.dino_prototypes
        self.ibot_center = CenteringEMA(ibot_prototypes, momentum=loss.center_momentum)

    @classmethod
    def from_config(cls, config: TrainConfig, distillation_teacher: nn.ModuleDict | None = None) -> SSLMetaArch:
        """The model a run's config describes (on the CPU, randomly initialised): the position embedding stored
        for ``model.img_size`` (or the global crop size), the mask token frozen when nothing is masked, and, with
        ``distillation_teacher`` (see :func:`dinolab.train.distill.build_teacher`), a distillation model."""
        img_size = config.model.img_size or config.crops.global_size
        masked = config.loss.ibot_weight > 0 and config.masking.sample_probability > 0
        return cls(
            config.model,
            config.heads,
            config.loss,
            img_size,
            distillation_teacher=distillation_teacher,
            masked_student=masked,
        )

    @property
    def produced_backbone(self) -> nn.Module:
        """The backbone this run produces: the teacher (pretraining) or the student's EMA (distillation)."""
        return self.student_ema if self.distillation else self.teacher["backbone"]

    # ------------------------------------------------------------------------------------------------ helpers
    def _masked_patch_logits(self, net: nn.ModuleDict, cls_tokens: Tensor, patches: Tensor, batch: Batch):
        """Head outputs for CLS tokens ``[n, D]`` and the masked patches of ``patches [G*B, N, D]``."""
        masked = patches.flatten(0, 1).index_select(0, batch.mask_indices)  # [M, D]
        return self._heads(net, cls_tokens, masked)

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
    def teacher_targets(self, batch: Batch, teacher_temp: float) -> TeacherOutput:
        """Teacher probabilities for the DINO loss ``[G, B, K]`` and for the selected patches ``[M, K]``."""
        num_images = batch.num_images
        out = self.teacher["backbone"].forward_features(self._teacher_input(batch.global_crops))
        cls_logits, patch_logits = self._masked_patch_logits(
            self.teacher, out["x_norm_clstoken"], out["x_norm_patchtokens"], batch
        )  # [G*B, K], [M, K]
        dino_probs = self._targets(cls_logits.float(), teacher_temp, self.dino_center)
        # called even with no masked patch here: the targets are collective across processes
        ibot_probs = self._targets(patch_logits.float(), teacher_temp, self.ibot_center)
        return TeacherOutput(dino_probs.view(-1, num_images, dino_probs.shape[-1]), ibot_probs, out["x_norm_clstoken"])

    def _teacher_input(self, global_crops: Tensor) -> Tensor:
        """Global crops at the size that gives the teacher the student's patch grid (distilling across patch
        sizes, e.g. a /14 teacher into a /16 student: the teacher sees the crop resized to 14 x grid)."""
        teacher_patch = self.teacher["backbone"].patch_size
        student_patch = self.student["backbone"].patch_size
        if teacher_patch == student_patch:
            return global_crops
        height, width = global_crops.shape[-2:]
        size = (height // student_patch * teacher_patch, width // student_patch * teacher_patch)
        return F.interpolate(global_crops, size=size, mode="bicubic", align_corners=False, antialias=True)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(
        self, batch: Batch, teacher_temp: float, freeze_backbone: bool = False, with_health: bool = False
    ) -> LossTerms:
        """Losses of one (micro-)batch. ``freeze_backbone`` trains only the heads (continued pretraining);
        ``with_health`` adds the target-health statistics (a logging step)."""
        cfg = self.loss_config
        if self.distillation:
            batch = select_all_patches(batch)
        with phase("teacher"):
            teacher = self.teacher_targets(batch, teacher_temp)
        dino_targets, ibot_targets = teacher.dino_targets, teacher.ibot_targets

        crops = [batch.global_crops] + ([batch.local_crops] if batch.local_crops.shape[0] else [])
        masks = [None if self.distillation else batch.masks] + [None] * (len(crops) - 1)
        with phase("student_backbone"), torch.set_grad_enabled(torch.is_grad_enabled() and not freeze_backbone):
            outs = self.student["backbone"].forward_features_list(crops, masks, packed=self.packed_sequences)
        if freeze_backbone:
            outs = [{name: v if v is None else v.detach() for name, v in out.items()} for out in outs]
        global_cls = outs[0]["x_norm_clstoken"]  # [G*B, D]
        cls_tokens = torch.cat([out["x_norm_clstoken"] for out in outs])  # [(G+L)*B, D], crop-major
        patches = outs[0]["x_norm_patchtokens"]  # [G*B, N, D]
        with phase("heads_and_losses"):
            dino, ibot = self._student_losses(batch, outs, cls_tokens, patches, dino_targets, ibot_targets)

        # the prototype losses are fp32 (they reduce over K prototypes); KoLeo and the total too
        with phase("koleo"), torch.autocast(global_cls.device.type, enabled=False):
            koleo = dino.new_zeros(())
            if cfg.koleo_weight > 0:
                koleo = sum(koleo_loss(chunk) for chunk in global_cls.float().chunk(dino_targets.shape[0]))
            total = cfg.dino_weight * dino + cfg.ibot_weight * ibot + cfg.koleo_weight * koleo
        health = self.health(batch, teacher, global_cls, patches) if with_health else {}
        return LossTerms(total=total, dino=dino, ibot=ibot, koleo=koleo, health=health)

    @torch.no_grad()
    def health(self, batch: Batch, teacher: TeacherOutput, student_cls: Tensor, patches: Tensor) -> dict[str, float]:
        """Target-health statistics of this batch (see :mod:`dinolab.train.health`); collective when distributed.

        The student's predictions are compared with the targets they are trained on: a global crop's with the
        other global crop's DINO target, a selected patch's with the teacher's target at that position.
        """
        dino_targets = teacher.dino_targets  # [G, B, K]
        num_global = dino_targets.shape[0]
        other_view = dino_targets.roll(1, dims=0) if num_global > 1 else dino_targets
        student_dino = self.student["dino_head"](student_cls[:AGREEMENT_ROWS].detach())  # [n, K]
        stats = {
            f"dino_{k}": v
            for k, v in target_stats(
                dino_targets.flatten(0, 1), student_dino, other_view.flatten(0, 1)[:AGREEMENT_ROWS].argmax(-1)
            ).items()
        }
        rows = batch.mask_indices[:AGREEMENT_ROWS] if self.loss_config.ibot_weight > 0 else batch.mask_indices[:0]
        head = self.student["ibot_head"] if "ibot_head" in self.student else self.student["dino_head"]
        student_ibot = head(patches.detach().flatten(0, 1).index_select(0, rows))  # [m, K]
        stats.update({f"ibot_{k}": v for k, v in target_stats(teacher.ibot_targets, student_ibot).items()})
        stats["teacher_cls_std"] = feature_spread(teacher.cls_tokens)
        stats["student_cls_std"] = feature_spread(student_cls.detach())
        return stats

    def _student_losses(
        self,
        batch: Batch,
        outs: list[dict[str, Tensor]],
        cls_tokens: Tensor,
        patches: Tensor,
        dino_targets: Tensor,
        ibot_targets: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """The DINO and iBOT losses of the student's outputs ``outs`` (one dict per crop size): chunk by chunk
        (``loss.chunked_cross_entropy``) or from the full logits. benchmarks/naive_meta_arch.py overrides this with
        the iBOT code's way, the baseline the efficiency measurements compare against."""
        if self.loss_config.chunked_cross_entropy:
            return self._prototype_losses_chunked(batch, cls_tokens, patches, dino_targets, ibot_targets)
        return self._prototype_losses(batch, cls_tokens, patches, dino_targets, ibot_targets)

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
        """``teacher = momentum * teacher + (1 - momentum) * student``, all parameters at once. In distillation
        the teacher is frozen and the student's EMA backbone moves instead."""
        if self.distillation:
            ema, source = list(self.student_ema.parameters()), self.student["backbone"].parameters()
        else:
            ema, source = list(self.teacher.parameters()), self.student.parameters()
        torch._foreach_lerp_(ema, [p.detach() for p in source], 1.0 - momentum)


def _init_heads_from_teacher(student: nn.ModuleDict, teacher: nn.ModuleDict) -> None:
    """Distillation: heads of the teacher's shape; when the widths match they start as copies of the teacher's
    (otherwise they are the student's own, trained from their initialisation; only the targets are the
    teacher's)."""
    for name, head in student.items():
        if name == "backbone":
            continue
        if name not in teacher:
            raise ValueError(f"the distillation teacher has no {name}; its heads must match the student's layout")
        source, target = teacher[name].state_dict(), head.state_dict()
        if all(k in source and source[k].shape == v.shape for k, v in target.items()):
            head.load_state_dict(source)
