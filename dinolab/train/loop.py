"""The pretraining loop, top to bottom: schedules -> forward/backward -> clip -> step -> EMA -> log -> checkpoint."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dinolab.data.collate import Batch
from dinolab.train.checkpoint import (
    full_state_dict,
    latest_checkpoint,
    load_checkpoint,
    read_meta,
    save_backbone,
    save_checkpoint,
)
from dinolab.train.config import ConfigError, OptimConfig, TrainConfig, from_dict
from dinolab.train.data import build_training_data
from dinolab.train.distributed import DistEnv, all_reduce_mean, init_distributed
from dinolab.train.logger import MetricLogger, format_line
from dinolab.train.meta_arch import LossTerms, SSLMetaArch
from dinolab.train.parallel import parallelize
from dinolab.train.param_groups import apply_schedules, get_param_groups
from dinolab.train.schedules import TrainingSchedules, build_schedules, scale_lr

log = logging.getLogger("dinolab.train")

TEACHER_BACKBONE = "teacher_backbone.pth"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    finished: bool
    teacher_backbone: Path | None


def make_schedules(config: TrainConfig, global_batch: int) -> TrainingSchedules:
    optim, loss = config.optim, config.loss
    per_epoch = optim.iters_per_epoch
    if optim.lr_scaling == "sqrt":
        base_lr = scale_lr(optim.base_lr, global_batch)
    elif optim.lr_scaling == "linear":
        base_lr = optim.base_lr * global_batch / 1024
    else:
        base_lr = optim.base_lr
    return build_schedules(
        base_lr=base_lr,
        min_lr=optim.min_lr,
        total_iters=optim.total_iters,
        warmup_iters=round(optim.warmup_epochs * per_epoch),
        wd=optim.weight_decay,
        wd_end=optim.weight_decay_end,
        momentum=optim.momentum_teacher,
        momentum_end=optim.final_momentum_teacher,
        teacher_temp=loss.teacher_temp,
        warmup_teacher_temp=loss.warmup_teacher_temp,
        teacher_temp_warmup_iters=round(loss.warmup_teacher_temp_epochs * per_epoch),
        freeze_last_layer_iters=round(optim.freeze_last_layer_epochs * per_epoch),
    )


def step_seed(seed: int, step: int, rank: int) -> int:
    """Randomness of the model (stochastic depth) is a function of (seed, step, rank): resume is exact."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1)


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if dtype == "bf16" else torch.float16)


def build_model(config: TrainConfig, env: DistEnv, load_init: bool = True) -> SSLMetaArch:
    img_size = config.model.img_size or config.crops.global_size
    model = SSLMetaArch(config.model, config.heads, config.loss, img_size=img_size)
    if config.model.init_from and load_init:
        init_backbones_from(model, config.model.init_from)
    return model.to(env.device)


def init_backbones_from(model: SSLMetaArch, source: str) -> None:
    """Continue pretraining: student and teacher backbones start from a released or earlier checkpoint."""
    from dinolab.hub import load_backbone
    from dinolab.hub.convert import load_strict

    pretrained = load_backbone(source)
    state = pretrained.state_dict()
    if "mask_token" in state and not torch.any(state["mask_token"]):
        log.info("the checkpoint's mask token is zero (e.g. converted from timm); it will be learned")
    for net in (model.student, model.teacher):
        load_strict(net["backbone"], state, source=source)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) pretraining as configured; returns where the run is and whether it finished."""
    env = init_distributed(config.run.device)
    run_dir = Path(config.run.output_dir)
    optim_cfg, run_cfg = config.optim, config.run
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.json")
    resume_from = latest_checkpoint(run_dir)
    torch.manual_seed(run_cfg.seed)

    # when resuming, the weights come from the checkpoint: skip reading init_from weights that would be overwritten
    model = build_model(config, env, load_init=resume_from is None)
    num_blocks = model.student["backbone"].n_blocks
    may_skip = optim_cfg.freeze_backbone_iters > 0 or config.heads.ibot_separate_head
    wrapped = parallelize(model, env, run_cfg, may_skip_parameters=may_skip)
    groups = get_param_groups(
        model.student,
        num_blocks=num_blocks,
        layer_decay=optim_cfg.layer_decay,
        patch_embed_lr_mult=optim_cfg.patch_embed_lr_mult,
    )
    optimizer = torch.optim.AdamW(groups, betas=optim_cfg.adamw_betas, fused=env.device.type == "cuda" or None)
    scaler = torch.amp.GradScaler(env.device.type, enabled=run_cfg.dtype == "fp16")

    start_step = 0
    if resume_from is not None:
        check_resumable(config, read_meta(resume_from), resume_from)
        meta = load_checkpoint(resume_from, model, optimizer)
        start_step = int(meta["step"])
        if "scaler" in meta and run_cfg.dtype == "fp16":
            scaler.load_state_dict(meta["scaler"])
        if env.is_main:
            log.info(
                "resumed from %s (iteration %d, written by %d processes)", resume_from, start_step, meta["world_size"]
            )

    global_batch = optim_cfg.batch_size_per_process * optim_cfg.accumulation_steps * env.world_size
    schedules = make_schedules(config, global_batch)
    total = optim_cfg.total_iters
    data = build_training_data(config, env, start_sample=start_step * global_batch)
    logger = MetricLogger(run_dir, enabled=env.is_main, tensorboard=run_cfg.tensorboard)
    stop_at = min(total, start_step + run_cfg.stop_after_iters) if run_cfg.stop_after_iters else total

    step_ctx = StepContext(model, wrapped, optimizer, scaler, run_cfg.dtype, env.device, optim_cfg)
    window_start, window_images = time.perf_counter(), 0
    progress = tqdm(total=total, initial=start_step, disable=not (run_cfg.progress and env.is_main), unit="it")
    try:
        for step in range(start_step, stop_at):
            # 1. schedules: every value is a function of the iteration
            values = schedules.values(step)
            apply_schedules(optimizer, lr=values["lr"], wd=values["wd"], last_layer_lr=values["last_layer_lr"])
            torch.manual_seed(step_seed(run_cfg.seed, step, env.rank))
            freeze_backbone = step < optim_cfg.freeze_backbone_iters

            # 2-3. forward/backward over the micro-batches, clip, step, EMA
            micro_batches = data.next_batches(optim_cfg.accumulation_steps, env.device)
            try:
                sums, grad_norm = train_step(step_ctx, micro_batches, values, freeze_backbone)
            except NonFiniteLossError as error:
                raise NonFiniteLossError(_non_finite_message(step, error.args[0], run_dir)) from None

            # 4. log
            window_images += global_batch
            done = step + 1
            progress.update(1)
            if done % run_cfg.log_every == 0 or done == stop_at:
                elapsed = time.perf_counter() - window_start
                losses = {
                    f"loss/{k}": float(all_reduce_mean(torch.tensor(v, device=env.device))) for k, v in sums.items()
                }
                metrics = {
                    **losses,
                    **values,
                    "grad_norm": grad_norm,
                    "images_per_s": window_images / max(elapsed, 1e-9),
                    "skipped_images": data.skipped_total,
                }
                seconds_left = (total - done) * elapsed / max(window_images / global_batch, 1)
                logger.log(done, metrics)
                if env.is_main:
                    progress.write(format_line(done, total, metrics, seconds_left))
                window_start, window_images = time.perf_counter(), 0

            # 5. checkpoint
            if done % run_cfg.checkpoint_every == 0 or done == stop_at:
                _checkpoint(run_dir, done, model, optimizer, scaler, config, keep=run_cfg.keep_checkpoints)
    finally:
        progress.close()
        logger.close()
        data.close()

    finished = stop_at == total
    teacher_path = export_teacher(model, run_dir / TEACHER_BACKBONE, env) if finished else None
    return TrainResult(run_dir=run_dir, steps_done=stop_at, finished=finished, teacher_backbone=teacher_path)


def check_resumable(config: TrainConfig, meta: dict, checkpoint: Path) -> None:
    """The architecture of a run cannot change on resume; say which keys differ instead of a shape error."""
    saved = meta.get("config", {})
    current = json.loads(json.dumps(config.to_dict()))  # tuples -> lists, as saved
    changed = [
        f"{section}.{key}: {saved[section][key]!r} -> {value!r}"
        for section in ("model", "heads")
        for key, value in current[section].items()
        if key in saved.get(section, {}) and saved[section][key] != value and key not in ("init_from",)
    ]
    if changed:
        raise ConfigError(
            f"{checkpoint} was written with another architecture ({'; '.join(changed)}); "
            "use a new run.output_dir, or restore these values to resume"
        )


@dataclass
class StepContext:
    """What one optimisation step works on."""

    model: SSLMetaArch
    forward: Callable[..., LossTerms]
    """The model, or its DDP wrapper: what the forward goes through."""
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dtype: str
    device: torch.device
    optim: OptimConfig


def train_step(
    ctx: StepContext, micro_batches: Iterable[Batch], values: dict[str, float], freeze_backbone: bool = False
) -> tuple[dict[str, float], float]:
    """One iteration: forward/backward over ``accumulation_steps`` micro-batches, clip, AdamW, teacher EMA.

    Returns the mean loss terms of this process and the gradient norm before clipping. Gradients are
    synchronised (DDP all-reduce / FSDP reduce-scatter) only on the last micro-batch.
    """
    steps = ctx.optim.accumulation_steps
    ctx.optimizer.zero_grad(set_to_none=True)
    sums = {"total": 0.0, "dino": 0.0, "ibot": 0.0, "koleo": 0.0}
    for index, batch in enumerate(micro_batches):
        last = index == steps - 1
        with _gradient_sync(ctx, enabled=last), autocast(ctx.device, ctx.dtype):
            terms = ctx.forward(batch, values["teacher_temp"], freeze_backbone)
            if not torch.isfinite(terms.total):
                raise NonFiniteLossError(terms.detached())
            ctx.scaler.scale(terms.total / steps).backward()
        for name, value in terms.detached().items():
            sums[name] += value / steps
    ctx.scaler.unscale_(ctx.optimizer)
    grad_norm = _clip(ctx.model, ctx.optim.clip_grad)
    ctx.scaler.step(ctx.optimizer)
    ctx.scaler.update()
    ctx.model.update_teacher(values["momentum"])
    return sums, grad_norm


def _gradient_sync(ctx: StepContext, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient communication of all but the last micro-batch of an accumulated step."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(ctx.forward, "no_sync"):  # DDP
        return ctx.forward.no_sync()
    if hasattr(ctx.model, "set_requires_gradient_sync"):  # FSDP2
        return _fsdp_no_sync(ctx.model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model: torch.nn.Module) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _clip(model: SSLMetaArch, max_norm: float) -> float:
    params = [p for p in model.student.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def _checkpoint(run_dir, step, model, optimizer, scaler, config: TrainConfig, keep: int) -> None:
    meta = {"config": config.to_dict()}
    if config.run.dtype == "fp16":
        meta["scaler"] = scaler.state_dict()
    save_checkpoint(run_dir, step, model, optimizer, meta, keep=keep)


def _non_finite_message(step: int, terms: dict[str, float], run_dir: Path) -> str:
    last = latest_checkpoint(run_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
    return (
        f"the loss is not finite at iteration {step} ({terms}); the run stops and {kept}. "
        "Lower optim.base_lr, raise optim.warmup_epochs, or use run.dtype=bf16 instead of fp16, then rerun "
        "(it resumes from the last checkpoint)."
    )


def export_teacher(model: SSLMetaArch, path: Path, env: DistEnv) -> Path:
    """The teacher backbone in the released format, loadable by ``dinolab.hub`` and ``dinolab embed``."""
    state = full_state_dict(model.teacher["backbone"])
    if env.is_main:
        save_backbone(state, path)
    return path


def export_run(run_dir: str | Path, output: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Export the teacher backbone of a run's checkpoint (latest by default) to a released-format file."""
    checkpoint = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint under {Path(run_dir) / 'checkpoints'}")
    config = from_dict(TrainConfig, read_meta(checkpoint)["config"])
    img_size = config.model.img_size or config.crops.global_size
    model = SSLMetaArch(config.model, config.heads, config.loss, img_size=img_size)
    load_checkpoint(checkpoint, model, optimizer=None)
    return save_backbone(model.teacher["backbone"].state_dict(), output)
