"""Losses of DINOv2 pretraining (stateless) and the teacher targets they compare against."""

from dinolab.losses.dino import DINOLoss
from dinolab.losses.ibot import ibot_loss, masked_patch_weights
from dinolab.losses.koleo import koleo_loss
from dinolab.losses.targets import CenteringEMA, sinkhorn_knopp

__all__ = ["CenteringEMA", "DINOLoss", "ibot_loss", "koleo_loss", "masked_patch_weights", "sinkhorn_knopp"]
