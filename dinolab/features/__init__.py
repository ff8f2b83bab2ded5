"""Feature extraction with frozen backbones."""

from dinolab.data.transforms import Resolution, parse_image_size
from dinolab.features.embed import OUTPUTS, EmbeddingResult, embed_images, token_features
from dinolab.features.extract import Extracted, cls_features, extract_features
from dinolab.features.writers import read_parquet_features, summarize, write_embeddings
from dinolab.runtime import autocast_context, default_device

__all__ = [
    "OUTPUTS",
    "EmbeddingResult",
    "Extracted",
    "Resolution",
    "autocast_context",
    "cls_features",
    "default_device",
    "embed_images",
    "extract_features",
    "parse_image_size",
    "read_parquet_features",
    "summarize",
    "token_features",
    "write_embeddings",
]
