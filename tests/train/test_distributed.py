"""torch.distributed on CPU (gloo, 2 processes): DDP and FSDP2 equal one process on the same global batch,
checkpoints reshard across process counts, and torchrun restarts a killed worker from the last checkpoint."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dinolab.config import apply_overrides
from dinolab.data.collate import Batch
from dinolab.train import checkpoint as ckpt
from dinolab.train.config import HeadsConfig, LossConfig, ModelConfig, OptimConfig, RunConfig
from dinolab.train.distributed import DistEnv
from dinolab.train.loop import StepContext, train, train_step
from dinolab.train.meta_arch import SSLMetaArch
from dinolab.train.parallel import parallelize
from dinolab.train.param_groups import apply_schedules, get_param_groups
from dinolab.train.recipes import get_recipe

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank))
    os.environ["LOCAL_RANK"] = str(rank)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def leave() -> None:
    """Both ranks reach the teardown before either destroys the group: rank 0 hosts the store, and a worker whose
    peer tore it down mid-operation can abort at exit ("terminate called without an active exception")."""
    dist.barrier()
    dist.destroy_process_group()


def global_batch(step: int) -> Batch:
    """A fixed batch of 4 images (2 global 28 px crops, 2 local 14 px crops), 2 of the 8 global crops masked."""
    g = torch.Generator().manual_seed(step)
    images, grid = 4, 2
    masks = torch.zeros(2 * images, grid * grid, dtype=torch.bool)
    masks[1, :2] = True
    masks[6, 1:] = True
    return batch_from(
        torch.randn(2 * images, 3, 28, 28, generator=g), torch.randn(2 * images, 3, 14, 14, generator=g), masks, images
    )


def batch_from(global_crops, local_crops, masks, images) -> Batch:
    counts = masks.sum(1)
    return Batch(
        global_crops=global_crops,
        local_crops=local_crops,
        masks=masks,
        mask_indices=masks.flatten().nonzero().flatten(),
        mask_weights=(1.0 / counts.clamp(min=1).float()).repeat_interleave(counts),
        num_images=images,
    )


def shard(batch: Batch, rank: int) -> Batch:
    """This rank's images (all their crops), as the distributed sampler would give them."""
    per_rank = batch.num_images // WORLD
    keep = list(range(rank * per_rank, (rank + 1) * per_rank))

    def rows(crops: torch.Tensor) -> torch.Tensor:
        num_crops = crops.shape[0] // batch.num_images
        return torch.cat(
            [crops[c * batch.num_images + i : c * batch.num_images + i + 1] for c in range(num_crops) for i in keep]
        )

    return batch_from(rows(batch.global_crops), rows(batch.local_crops), rows(batch.masks), per_rank)


def make_context(mode: str) -> StepContext:
    torch.manual_seed(0)
    # no stochastic depth and no KoLeo: both are per process by design, the rest must match exactly
    model = SSLMetaArch(
        ModelConfig(arch="vit_tiny", depth=2, drop_path_rate=0.0),
        HeadsConfig(dino_prototypes=32, dino_hidden_dim=32, dino_bottleneck_dim=16, ibot_prototypes=32),
        LossConfig(koleo_weight=0.0),
        img_size=28,
    )
    env = DistEnv(rank=dist.get_rank(), world_size=WORLD) if dist.is_initialized() else DistEnv()
    forward = (
        parallelize(model, env, RunConfig(parallel=mode, activation_checkpointing="none"))
        if mode != "single"
        else model
    )
    optimizer = torch.optim.AdamW(get_param_groups(model.student, num_blocks=2))
    apply_schedules(optimizer, lr=1e-3, wd=0.04, last_layer_lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return StepContext(
        model, forward, optimizer, scaler, "fp32", torch.device("cpu"), OptimConfig(batch_size_per_process=2)
    )


def run_steps(ctx: StepContext, rank: int | None) -> list[float]:
    losses = []
    for step in range(STEPS):
        batch = global_batch(step)
        local = batch if rank is None else shard(batch, rank)
        sums, _ = train_step(ctx, [local], {"teacher_temp": 0.07, "momentum": 0.9})
        total = torch.tensor(sums["total"])
        if rank is not None:
            dist.all_reduce(total)
            total /= WORLD
        losses.append(float(total))
    return losses


def parity_worker(rank: int, port: int, mode: str, out: str) -> None:
    join(rank, port)
    ctx = make_context(mode)
    losses = run_steps(ctx, rank)
    state = ckpt.full_state_dict(ctx.model)
    if rank == 0:
        torch.save({"losses": losses, "state": state}, out)
    leave()


@pytest.fixture(scope="module")
def single_process_reference() -> dict:
    ctx = make_context("single")
    return {"losses": run_steps(ctx, None), "state": ctx.model.state_dict()}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one_process_on_the_same_global_batch(mode, single_process_reference, tmp_path):
    out = tmp_path / "result.pt"
    mp.spawn(parity_worker, args=(free_port(), mode, str(out)), nprocs=WORLD, join=True)
    result = torch.load(out, weights_only=True)
    torch.testing.assert_close(result["losses"], single_process_reference["losses"], rtol=1e-5, atol=1e-5)
    expected = single_process_reference["state"]
    assert set(result["state"]) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(result["state"][key], value, rtol=1e-4, atol=1e-5, msg=key)


# ----------------------------------------------------------------------------------------------- resharding
def save_worker(rank: int, port: int, mode: str, run_dir: str, out: str) -> None:
    join(rank, port)
    ctx = make_context(mode)
    run_steps(ctx, rank)
    ckpt.save_checkpoint(run_dir, STEPS, ctx.model, ctx.optimizer, meta={"config": {}})
    state = ckpt.full_state_dict(ctx.model)
    if rank == 0:
        torch.save(state, out)
    leave()


def load_worker(rank: int, port: int, run_dir: str, out: str) -> None:
    join(rank, port)
    ctx = make_context("fsdp")
    ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir), ctx.model, ctx.optimizer)
    state = ckpt.full_state_dict(ctx.model)
    if rank == 0:
        torch.save(state, out)
    leave()


def test_checkpoint_written_by_two_processes_loads_in_one(tmp_path):
    saved = tmp_path / "saved.pt"
    mp.spawn(save_worker, args=(free_port(), "fsdp", str(tmp_path / "run"), str(saved)), nprocs=WORLD, join=True)
    ctx = make_context("single")
    meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "run"), ctx.model, ctx.optimizer)
    assert meta["world_size"] == WORLD and meta["step"] == STEPS
    expected = torch.load(saved, weights_only=True)
    for key, value in ctx.model.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    assert ctx.optimizer.state, "the optimizer state was restored too"


def test_checkpoint_written_by_one_process_loads_in_two(tmp_path):
    ctx = make_context("single")
    run_steps(ctx, None)
    ckpt.save_checkpoint(tmp_path / "run", STEPS, ctx.model, ctx.optimizer, meta={"config": {}})
    out = tmp_path / "loaded.pt"
    mp.spawn(load_worker, args=(free_port(), str(tmp_path / "run"), str(out)), nprocs=WORLD, join=True)
    loaded = torch.load(out, weights_only=True)
    for key, value in ctx.model.state_dict().items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


# ----------------------------------------------------------------------------------------------- whole runs
def tiny_run(data: Path, out: Path, *overrides: str):
    return apply_overrides(get_recipe("test_tiny"), [f"run.data={data}", f"run.output_dir={out}", *overrides])


def train_worker(rank: int, port: int, config) -> None:
    join(rank, port)
    train(config)
    leave()


def test_a_run_moves_between_process_counts(noise_images, tmp_path):
    """2 processes (DDP) -> 1 process -> 2 processes (FSDP2): each stage resumes where the last one stopped."""
    mp.spawn(train_worker, args=(free_port(), tiny_run(noise_images, tmp_path, "run.stop_after_iters=2")), nprocs=WORLD)
    train(tiny_run(noise_images, tmp_path, "run.stop_after_iters=2"))
    mp.spawn(train_worker, args=(free_port(), tiny_run(noise_images, tmp_path, "run.parallel=fsdp")), nprocs=WORLD)
    metas = [ckpt.read_meta(p) for p in ckpt.list_checkpoints(tmp_path)]
    assert [(m["step"], m["world_size"]) for m in metas] == [(2, 2), (4, 1), (6, 2)]
    assert (tmp_path / "teacher_backbone.pth").is_file()
    steps = [
        int(line.split('"step": ')[1].split(",")[0]) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def worker_pids(marker: str) -> list[int]:
    """Training workers (LOCAL_RANK set) whose command line mentions ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in cmdline and b"LOCAL_RANK=" in environ and "torch.distributed.run" not in cmdline:
            pids.append(int(entry.name))
    return pids


def test_torchrun_restarts_a_killed_worker_from_the_last_checkpoint(noise_images, tmp_path):
    run_dir = tmp_path / "elastic_run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--max-restarts=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "-m", "dinolab", "train", "--recipe", "test_tiny", "--data", str(noise_images), "--output", str(run_dir),
        "run.checkpoint_every=1", "optim.epochs=6",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (run_dir / "checkpoints" / "step_00000003").exists():
        time.sleep(0.1)
    victims = worker_pids(str(run_dir))
    assert victims, "no training worker found to kill"
    os.kill(victims[-1], signal.SIGKILL)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    metas = [ckpt.read_meta(p) for p in ckpt.list_checkpoints(run_dir)]
    assert metas[-1]["step"] == 18
    assert (run_dir / "teacher_backbone.pth").is_file()
    logged = [
        int(line.split('"step": ')[1].split(",")[0]) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
    assert logged[-1] == 18 and sorted(set(logged)) == list(range(1, 19))
    assert "resumed from" in stderr, "the restarted workers should resume from the last checkpoint"
