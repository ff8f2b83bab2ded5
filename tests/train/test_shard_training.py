"""Pretraining from a tar-shard stream: the stream cursor is saved in checkpoints and resume is exact."""

import json

import torch

from dinolab.config import apply_overrides
from dinolab.data.shard_writer import write_shards
from dinolab.train import checkpoint as ckpt
from dinolab.train.config import TrainConfig
from dinolab.train.loop import train
from dinolab.train.meta_arch import SSLMetaArch
from dinolab.train.recipes import get_recipe


def run(shards, out, *overrides):
    config = apply_overrides(
        get_recipe("test_tiny"), [f"run.data={shards}", f"run.output_dir={out}", "run.data_mode=stream", *overrides]
    )
    return train(config)


def state(run_dir):
    config = TrainConfig.load(run_dir / "config.json")
    model = SSLMetaArch.from_config(config)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir), model, optimizer=None)
    return model.state_dict()


def test_stream_training_resumes_exactly_mid_shard(noise_images, tmp_path):
    shards = tmp_path / "shards"
    write_shards(noise_images, shards, shard_size=5)  # 13 samples (one corrupt): shards of 5, 5, 3
    assert run(shards, tmp_path / "whole").finished
    first = run(shards, tmp_path / "resumed", "run.stop_after_iters=2")
    assert not first.finished
    meta = json.loads((ckpt.latest_checkpoint(tmp_path / "resumed") / "meta.json").read_text())
    assert meta["data_stream"]["consumers"] == 1 and meta["data_stream"]["next"]["0"][1] not in (0, 3, 5)  # mid-shard
    assert run(shards, tmp_path / "resumed").finished
    expected, resumed = state(tmp_path / "whole"), state(tmp_path / "resumed")
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)
