from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from dinolab.models.vit import vit_tiny


@pytest.fixture(autouse=True)
def _few_threads() -> Iterator[None]:
    # tiny models on a shared 2-core machine: extra intra-op threads only add contention
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_backbone() -> torch.nn.Module:
    """Random-init ViT-Ti/14 with 2 blocks for 56 px images (fast on CPU)."""
    torch.manual_seed(0)
    return vit_tiny(patch_size=14, depth=2, img_size=56).eval()


@pytest.fixture
def mixing_backbone() -> torch.nn.Module:
    """Like ``tiny_backbone`` but with LayerScale 1 (as the released models): with the default 1e-5 the random
    blocks barely act and the CLS token hardly depends on the image, useless for global descriptors."""
    torch.manual_seed(0)
    return vit_tiny(patch_size=14, depth=2, img_size=56, init_values=1.0).eval()
