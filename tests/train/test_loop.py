"""End-to-end pretraining on CPU: a few steps, exact resume, non-finite loss, continued pretraining."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dinolab.config import apply_overrides
from dinolab.hub import load_backbone
from dinolab.train import checkpoint as ckpt
from dinolab.train.config import TrainConfig
from dinolab.train.logger import read_metrics
from dinolab.train.loop import NonFiniteLossError, train
from dinolab.train.meta_arch import SSLMetaArch
from dinolab.train.recipes import get_recipe


def tiny_config(data: Path, out: Path, *overrides: str) -> TrainConfig:
    return apply_overrides(get_recipe("test_tiny"), [f"run.data={data}", f"run.output_dir={out}", *overrides])


def load_run_state(run_dir: Path) -> dict[str, torch.Tensor]:
    config = TrainConfig.load(run_dir / "config.json")
    model = SSLMetaArch.from_config(config)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir), model, optimizer=None)
    return model.state_dict()


@pytest.fixture(scope="module")
def uninterrupted(noise_images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted")
    result = train(tiny_config(noise_images, out))
    assert result.finished and result.steps_done == 6
    return out


def test_tiny_run_logs_checkpoints_and_exports(uninterrupted):
    metrics = read_metrics(uninterrupted)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6]
    for m in metrics:
        assert all(torch.isfinite(torch.tensor(m[k])) for k in ("loss/total", "loss/dino", "loss/ibot", "loss/koleo"))
    assert metrics[0]["lr"] == 0.0 and metrics[-1]["momentum"] > metrics[0]["momentum"]
    assert [p.name for p in ckpt.list_checkpoints(uninterrupted)] == ["step_00000002", "step_00000004", "step_00000006"]
    skipped = (uninterrupted / "skipped_images.txt").read_text()
    assert "corrupt.jpg" in skipped
    backbone = load_backbone(uninterrupted / "teacher_backbone.pth")
    assert backbone.n_blocks == 2 and backbone(torch.randn(1, 3, 28, 28)).shape == (1, 192)
    state = load_run_state(uninterrupted)
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, state[f"teacher.backbone.{key}"], rtol=0, atol=0)


def test_resumed_run_ends_with_the_same_parameters(noise_images, uninterrupted, tmp_path):
    first = train(tiny_config(noise_images, tmp_path, "run.stop_after_iters=3"))
    assert not first.finished and first.steps_done == 3
    second = train(tiny_config(noise_images, tmp_path))
    assert second.finished
    expected, resumed = load_run_state(uninterrupted), load_run_state(tmp_path)
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)


def test_killed_run_restarts_from_its_last_checkpoint(noise_images, uninterrupted, tmp_path):
    command = [sys.executable, "-m", "dinolab", "train", "--recipe", "test_tiny", "--data", str(noise_images)]
    command += ["--output", str(tmp_path), "run.checkpoint_every=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "checkpoints" / "step_00000003").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = [int(p.name.split("_")[1]) for p in ckpt.list_checkpoints(tmp_path)]
    assert done and max(done) < 6, "the run was killed before finishing"
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    expected, resumed = load_run_state(uninterrupted), load_run_state(tmp_path)
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], rtol=0, atol=0, msg=key)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(noise_images, tmp_path, monkeypatch):
    original = SSLMetaArch.forward
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(SSLMetaArch, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"iteration 3.*step_00000002"):
        train(tiny_config(noise_images, tmp_path))
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000002"]
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))


def test_continued_pretraining_starts_from_weights_and_freezes_the_backbone(noise_images, uninterrupted, tmp_path):
    source = uninterrupted / "teacher_backbone.pth"
    train(
        tiny_config(
            noise_images,
            tmp_path,
            f"model.init_from={source}",
            "optim.freeze_backbone_iters=2",
            "run.stop_after_iters=2",
        )
    )
    state = load_run_state(tmp_path)
    initial = torch.load(source, weights_only=True)
    for key, value in initial.items():
        # two head-only iterations: the student backbone has not moved, so neither has the teacher's
        torch.testing.assert_close(state[f"student.backbone.{key}"], value, rtol=0, atol=0)
        torch.testing.assert_close(state[f"teacher.backbone.{key}"], value, rtol=0, atol=0)
    config = tiny_config(noise_images, tmp_path)
    torch.manual_seed(config.run.seed)  # as train() does: the heads the run started from
    fresh = SSLMetaArch.from_config(config)
    assert any(
        not torch.equal(state[f"student.{k}"], v) for k, v in fresh.student.state_dict().items() if "head" in k
    ), "the heads should have trained"


def test_resume_with_another_architecture_is_refused(noise_images, uninterrupted, tmp_path):
    import shutil

    from dinolab.config import ConfigError

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    with pytest.raises(ConfigError, match=r"model\.depth: 2 -> 3"):
        train(tiny_config(noise_images, run, "model.depth=3"))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_runs_on_cpu(noise_images, tmp_path, dtype):
    result = train(tiny_config(noise_images, tmp_path, f"run.dtype={dtype}", "optim.epochs=1"))
    assert result.finished
    metrics = read_metrics(tmp_path)
    assert all(torch.isfinite(torch.tensor(m["loss/total"])) for m in metrics)
    if dtype == "fp16":  # the gradient scaler's state travels with the checkpoint
        assert "scaler" in ckpt.read_meta(ckpt.latest_checkpoint(tmp_path))
