"""Losses of DINOv2 pretraining (stateless) and the teacher targets they compare against."""

from dinolab.losses.dino import DINOLoss, dino_num_terms, dino_student_targets
from dinolab.losses.ibot import ibot_loss, masked_patch_weights
from dinolab.losses.koleo import koleo_loss
from dinolab.losses.prototypes import prototype_cross_entropy
from dinolab.losses.targets import CenteringEMA, sinkhorn_knopp

__all__ = [
    "CenteringEMA",
    "DINOLoss",
    "dino_num_terms",
    "dino_student_targets",
    "ibot_loss",
    "koleo_loss",
    "masked_patch_weights",
    "prototype_cross_entropy",
    "sinkhorn_knopp",
]
