from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def noise_images(tmp_path_factory) -> Path:
    """Twelve small random images and one corrupt file."""
    folder = tmp_path_factory.mktemp("noise_images")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray((rng.random((40, 48, 3)) * 255).astype("uint8")).save(folder / f"img{i:02d}.png")
    (folder / "corrupt.jpg").write_bytes(b"this is not an image")
    return folder
