"""Feature extraction under torch.distributed (gloo, 2 processes) equals one process, in dataset order."""

import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from dinolab.data.images import ImageFileDataset
from dinolab.data.transforms import make_resize_transform
from dinolab.features.extract import extract_features
from dinolab.models import vit_tiny

pytestmark = pytest.mark.distributed


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return vit_tiny(depth=2, img_size=28, init_values=1.0)


def worker(rank: int, port: int, paths: list[str], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    dataset = ImageFileDataset(paths, make_resize_transform(28))
    result = extract_features(
        make_model(), dataset, batch_size=2, num_workers=0, device="cpu", progress=False, distributed=True
    )
    failed = np.array([index for index, _ in result.failures], dtype=np.int64)
    np.savez(f"{out}.{rank}.npz", indices=result.indices, cls=result.features["cls"], failed=failed)
    dist.destroy_process_group()


def test_two_processes_extract_the_same_features_as_one(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(7):
        path = tmp_path / f"{i}.png"
        Image.fromarray((rng.random((30, 30, 3)) * 255).astype("uint8")).save(path)
        paths.append(str(path))
    (tmp_path / "bad.png").write_bytes(b"not an image")
    paths.insert(3, str(tmp_path / "bad.png"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, paths, str(tmp_path / "out")), nprocs=2, join=True)
    single = extract_features(
        make_model(),
        ImageFileDataset(paths, make_resize_transform(28)),
        batch_size=2,
        num_workers=0,
        device="cpu",
        progress=False,
    )
    for rank in range(2):  # every process holds the whole result
        gathered = np.load(tmp_path / f"out.{rank}.npz")
        np.testing.assert_array_equal(gathered["indices"], single.indices)
        np.testing.assert_allclose(gathered["cls"], single.features["cls"], rtol=1e-4, atol=1e-5)
        assert gathered["failed"].tolist() == [3]
