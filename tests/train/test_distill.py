"""Distillation (``dinolab distill``): frozen teacher, unmasked student without stochastic depth, iBOT on every patch,
the student's EMA exported; resume and multi-process runs exact."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from dinolab.config import ConfigError, apply_overrides
from dinolab.hub import load_backbone
from dinolab.models.vit import DinoVisionTransformer
from dinolab.train import checkpoint as ckpt
from dinolab.train.config import TrainConfig
from dinolab.train.distill import TEACHER_HEADS_DIR, build_teacher, prepare_teacher, student_ema_momentum
from dinolab.train.logger import read_metrics
from dinolab.train.loop import STUDENT_BACKBONE, TEACHER_BACKBONE, load_run_backbone, make_schedules, train
from dinolab.train.meta_arch import SSLMetaArch, select_all_patches
from dinolab.train.recipes import get_recipe

METHOD = ("model.drop_path_rate=0", "masking.sample_probability=0")


def tiny(data: Path, out: Path, *overrides: str) -> TrainConfig:
    return apply_overrides(get_recipe("test_tiny"), [f"run.data={data}", f"run.output_dir={out}", *overrides])


def distill_config(data: Path, out: Path, teacher: Path | str, *overrides: str) -> TrainConfig:
    """A 1-block ViT-S student (wider than the ViT-Ti teacher: heads of its own) of the test_tiny recipe."""
    return tiny(data, out, *METHOD, f"distill.teacher={teacher}", "model.arch=vit_small", "model.depth=1", *overrides)


def checkpoint_tensors(checkpoint: Path, prefix: str = "model.") -> dict[str, torch.Tensor]:
    """Every tensor of a DCP checkpoint under ``prefix``, read without building a model."""
    reader = dcp.FileSystemReader(str(checkpoint))
    metadata = reader.read_metadata()
    state = {
        key: torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and hasattr(meta, "size")
    }
    dcp.load(state, storage_reader=reader)
    return {key[len(prefix) :]: value for key, value in state.items()}


@pytest.fixture(scope="module")
def teacher_run(noise_images, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher_run")
    assert train(tiny(noise_images, out)).finished
    return out


@pytest.fixture(scope="module")
def distilled(noise_images, teacher_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("distilled")
    result = train(distill_config(noise_images, out, teacher_run))
    assert result.finished and result.backbone == out / STUDENT_BACKBONE
    return out


def test_the_teacher_is_bit_identical_before_and_after(teacher_run, distilled):
    teacher = checkpoint_tensors(ckpt.latest_checkpoint(teacher_run), "model.teacher.")
    after = checkpoint_tensors(ckpt.latest_checkpoint(distilled), "model.teacher.")
    assert teacher.keys() == after.keys() and any(k.startswith("dino_head.") for k in after)
    for key, value in teacher.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, msg=key)
    # and the teacher run itself was only read
    assert [p.name for p in ckpt.list_checkpoints(teacher_run)][-1] == "step_00000006"


def test_the_exported_model_is_the_students_ema(distilled):
    state = checkpoint_tensors(ckpt.latest_checkpoint(distilled))
    exported = torch.load(distilled / STUDENT_BACKBONE, weights_only=True)
    assert exported["cls_token"].shape[-1] == 384, "the student (ViT-S), not the teacher (ViT-Ti)"
    moved = 0
    for key, value in exported.items():
        torch.testing.assert_close(value, state[f"student_ema.{key}"], rtol=0, atol=0, msg=key)
        moved += not torch.equal(value, state[f"student.backbone.{key}"])
    assert moved, "the EMA should lag behind the student"
    from_run = load_run_backbone(distilled)
    for key, value in from_run.state_dict().items():
        torch.testing.assert_close(value, exported[key], rtol=0, atol=0, msg=key)
    assert not (distilled / TEACHER_BACKBONE).exists()


def test_the_student_ema_momentum_is_warmed_up_like_tensorflows_ema(distilled):
    """TensorFlow's ExponentialMovingAverage(decay, num_updates): decay = min(decay, (1 + n) / (10 + n))."""
    assert student_ema_momentum(0.996, 0) == pytest.approx(0.1)
    assert student_ema_momentum(0.996, 90) == pytest.approx(0.91)
    assert student_ema_momentum(0.996, 10**6) == 0.996
    assert student_ema_momentum(1.0, 500) == pytest.approx(501 / 510)
    config = TrainConfig.load(distilled / "config.json")
    schedules = make_schedules(config, config.optim.batch_size_per_process)
    logged = [(m["step"], m["momentum"]) for m in read_metrics(distilled)]
    assert logged
    for done, momentum in logged:  # the logged step is the iteration just done
        expected = min(schedules.momentum(done - 1), done / (9 + done))
        assert momentum == pytest.approx(expected, abs=1e-12)


def test_student_sees_unmasked_crops_without_stochastic_depth(noise_images, teacher_run, tmp_path, monkeypatch):
    seen = []
    original = DinoVisionTransformer.forward_features_list

    def spy(self, x_list, masks_list=None, packed=True):
        if self.training and torch.is_grad_enabled():  # the student's training forward
            seen.append(([m for m in (masks_list or [])], [block.drop_path for block in self.blocks]))
        return original(self, x_list, masks_list, packed)

    monkeypatch.setattr(DinoVisionTransformer, "forward_features_list", spy)
    config = distill_config(noise_images, tmp_path, teacher_run, "run.stop_after_iters=2")
    train(config)
    assert len(seen) == 2
    for masks, drop_paths in seen:
        assert all(m is None for m in masks)
        assert all(rate == 0.0 for rate in drop_paths)


def distillation_model(config: TrainConfig) -> SSLMetaArch:
    source = prepare_teacher(config)
    img_size = config.crops.global_size
    teacher = build_teacher(source)
    return SSLMetaArch(config.model, source.config.heads, config.loss, img_size=img_size, distillation_teacher=teacher)


def test_the_ibot_loss_covers_every_patch_of_both_global_crops(noise_images, teacher_run):
    torch.manual_seed(0)
    model = distillation_model(distill_config(noise_images, Path("unused"), teacher_run))
    masks = torch.zeros(4, 4, dtype=torch.bool)  # G*B = 2 x 2 global crops of 2 x 2 patches
    masks[0, 1] = True  # whatever the collate drew, distillation selects every patch
    batch = _batch(masks)
    selected = select_all_patches(batch)
    assert selected.mask_indices.tolist() == list(range(16))
    torch.testing.assert_close(selected.mask_weights, torch.full((16,), 0.25))

    terms = model(batch, teacher_temp=0.07)
    # reference: per image, the mean over its patches of CE(teacher target, student prediction); mean over images
    with torch.no_grad():
        targets = model.teacher_targets(selected, teacher_temp=0.07).ibot_targets.view(4, 4, -1)  # [G*B, N, K]
        outs = model.student["backbone"].forward_features_list([batch.global_crops, batch.local_crops])
        logits = model.student["dino_head"](outs[0]["x_norm_patchtokens"])  # [G*B, N, K]
        cross_entropy = -(targets * torch.log_softmax(logits / 0.1, dim=-1)).sum(-1)  # [G*B, N]
    torch.testing.assert_close(terms.ibot, cross_entropy.mean(dim=1).mean(), rtol=1e-5, atol=1e-6)


def test_a_student_with_another_patch_size_gets_targets_on_its_own_grid(noise_images, teacher_run):
    config = distill_config(noise_images, Path("unused"), teacher_run, "model.patch_size=7")
    model = distillation_model(config)
    batch = _batch(torch.zeros(4, 16, dtype=torch.bool))  # 28 px / 7 = 4 x 4 patches
    assert model._teacher_input(batch.global_crops).shape[-1] == 56  # 4 patches of 14 px for the teacher
    assert model(batch, teacher_temp=0.07).ibot.isfinite()


def test_student_heads_copy_the_teachers_when_the_widths_match(noise_images, teacher_run):
    config = distill_config(noise_images, Path("unused"), teacher_run, "model.arch=vit_tiny")
    model = distillation_model(config)
    for key, value in model.teacher["dino_head"].state_dict().items():
        torch.testing.assert_close(model.student["dino_head"].state_dict()[key], value, rtol=0, atol=0)
    wider = distillation_model(distill_config(noise_images, Path("unused"), teacher_run))
    assert wider.student["dino_head"].mlp[0].in_features == 384


def _batch(masks: torch.Tensor):
    from dinolab.data.collate import Batch

    return Batch(
        global_crops=torch.randn(4, 3, 28, 28),
        local_crops=torch.randn(4, 3, 14, 14),
        masks=masks,
        mask_indices=masks.flatten().nonzero().flatten(),
        mask_weights=torch.ones(int(masks.sum())),
        num_images=2,
    )


def test_killed_distillation_resumes_to_the_parameters_of_an_uninterrupted_run(
    noise_images, teacher_run, distilled, tmp_path
):
    command = [sys.executable, "-m", "dinolab", "distill", "--recipe", "test_tiny", "--teacher", str(teacher_run)]
    command += ["--student", "vit_small", "--data", str(noise_images), "--output", str(tmp_path)]
    command += ["model.depth=1", "run.checkpoint_every=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (tmp_path / "checkpoints" / "step_00000003").exists():
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = [int(p.name.split("_")[1]) for p in ckpt.list_checkpoints(tmp_path)]
    assert done and max(done) < 6, "the run was killed before finishing"
    finished = subprocess.run(command, env=env, capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr[-2000:]
    expected = checkpoint_tensors(ckpt.latest_checkpoint(distilled))
    resumed = checkpoint_tensors(ckpt.latest_checkpoint(tmp_path))
    assert expected.keys() == resumed.keys()
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=0, msg=key)
    assert load_backbone(tmp_path / STUDENT_BACKBONE).embed_dim == 384


def distill_worker(rank: int, port: int, config: TrainConfig) -> None:
    from test_distributed import join, leave

    join(rank, port)
    train(config)
    leave()


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_on_the_same_global_batch(noise_images, teacher_run, tmp_path, parallel):
    """No masks and no stochastic depth: 2 x 2 images under DDP or FSDP2 (teacher, student and the student's EMA
    sharded) make the same steps as 1 x 4 (KoLeo off: it is computed per process, over each process's own images,
    as in the official code)."""
    from test_distributed import WORLD, free_port

    common = ("loss.koleo_weight=0", "run.num_workers=0")
    single = distill_config(noise_images, tmp_path / "one", teacher_run, *common)
    train(single)
    double = distill_config(
        noise_images,
        tmp_path / "two",
        teacher_run,
        *common,
        "optim.batch_size_per_process=2",
        f"run.parallel={parallel}",
    )
    mp.spawn(distill_worker, args=(free_port(), double), nprocs=WORLD, join=True)
    one = checkpoint_tensors(ckpt.latest_checkpoint(tmp_path / "one"))
    two = checkpoint_tensors(ckpt.latest_checkpoint(tmp_path / "two"))
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5, msg=key)
    exported = [torch.load(run / STUDENT_BACKBONE, weights_only=True) for run in (tmp_path / "one", tmp_path / "two")]
    for key, value in exported[0].items():
        torch.testing.assert_close(exported[1][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_a_backbone_only_teacher_gets_its_heads_by_a_warm_up(noise_images, teacher_run, tmp_path):
    backbone_file = teacher_run / TEACHER_BACKBONE
    config = distill_config(noise_images, tmp_path, backbone_file, "distill.heads_warmup_iters=2", "optim.epochs=1")
    result = train(config)
    assert result.finished
    warmup = tmp_path / TEACHER_HEADS_DIR
    assert ckpt.read_meta(ckpt.latest_checkpoint(warmup))["step"] == 2
    # the warm-up trained heads only: the distillation teacher's backbone is the given file, bit for bit
    teacher = checkpoint_tensors(ckpt.latest_checkpoint(tmp_path), "model.teacher.backbone.")
    for key, value in torch.load(backbone_file, weights_only=True).items():
        torch.testing.assert_close(teacher[key], value, rtol=0, atol=0, msg=key)
    fresh_heads = checkpoint_tensors(ckpt.latest_checkpoint(teacher_run), "model.teacher.dino_head.")
    warmed = checkpoint_tensors(ckpt.latest_checkpoint(tmp_path), "model.teacher.dino_head.")
    assert any(not torch.equal(warmed[k], v) for k, v in fresh_heads.items()), "heads of their own, not the run's"


def test_the_method_settings_are_checked_not_assumed(noise_images, teacher_run, tmp_path):
    with pytest.raises(ConfigError, match="drop_path_rate=0"):
        tiny(noise_images, tmp_path, f"distill.teacher={teacher_run}", "masking.sample_probability=0")
    with pytest.raises(ConfigError, match="sample_probability=0"):
        tiny(noise_images, tmp_path, f"distill.teacher={teacher_run}", "model.drop_path_rate=0")
    missing = subprocess.run(
        [sys.executable, "-m", "dinolab", "distill", "--data", str(noise_images), "--output", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "no teacher" in missing.stderr
