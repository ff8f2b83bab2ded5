"""Feature extraction with frozen backbones."""

from dinolab.features.extract import Extracted, autocast_context, cls_features, default_device, extract_features

__all__ = ["Extracted", "autocast_context", "cls_features", "default_device", "extract_features"]
