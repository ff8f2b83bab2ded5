"""Backbones (DINOv2 ViTs) and projection heads."""

from dinolab.models.heads import DINOHead
from dinolab.models.vit import (
    ARCHS,
    DinoVisionTransformer,
    ViTArch,
    build_vit,
    vit_base,
    vit_giant2,
    vit_large,
    vit_small,
    vit_tiny,
)

__all__ = [
    "ARCHS",
    "DINOHead",
    "DinoVisionTransformer",
    "ViTArch",
    "build_vit",
    "vit_base",
    "vit_giant2",
    "vit_large",
    "vit_small",
    "vit_tiny",
]
