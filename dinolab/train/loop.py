"""The pretraining loop, top to bottom: schedules -> forward/backward -> clip -> step -> EMA -> log -> checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dinolab.config import ConfigError, from_dict
from dinolab.data.collate import Batch
from dinolab.matmul import cpu_matmul, set_cpu_matmul
from dinolab.runtime import phase, reuse_freed_memory
from dinolab.train.checkpoint import (
    full_state_dict,
    latest_checkpoint,
    load_checkpoint,
    load_module_tensors,
    read_meta,
    save_backbone,
    save_checkpoint,
)
from dinolab.train.config import OptimConfig, TrainConfig
from dinolab.train.data import build_training_data
from dinolab.train.distill import (
    TeacherSource,
    build_teacher,
    prepare_teacher,
    student_config,
    student_ema_momentum,
)
from dinolab.train.distributed import DistEnv, all_reduce_mean, init_distributed
from dinolab.train.guard import RunGuard
from dinolab.train.health import HealthMonitor
from dinolab.train.logger import MetricLogger, format_line
from dinolab.train.meta_arch import LossTerms, SSLMetaArch, build_backbone
from dinolab.train.parallel import choose_activation_checkpointing, choose_cpu_linear, parallelize
from dinolab.train.param_groups import apply_schedules, get_param_groups
from dinolab.train.schedules import TrainingSchedules, build_schedules, scale_lr

log = logging.getLogger("dinolab.train")

TEACHER_BACKBONE = "teacher_backbone.pth"
STUDENT_BACKBONE = "student_backbone.pth"
"""What a finished run exports: the teacher of a pretraining run, the student's EMA of a distillation run."""


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stops and keeps its last good checkpoint."""


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    finished: bool
    backbone: Path | None
    """The exported backbone (released format) of a finished run: the teacher, or in distillation the student's
    EMA; None when the run stopped early."""


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


def build_model(
    config: TrainConfig, env: DistEnv, load_init: bool = True, teacher: TeacherSource | None = None
) -> SSLMetaArch:
    """The run's model on its device; ``load_init`` reads the initial weights (``model.init_from``, a
    distillation teacher), skipped when a checkpoint will overwrite them."""
    frozen_teacher = build_teacher(teacher, load_weights=load_init) if teacher is not None else None
    model = SSLMetaArch.from_config(config, distillation_teacher=frozen_teacher)
    if config.model.init_from and load_init:
        init_backbones_from(model, config.model.init_from)
    return model.to(env.device)


def init_backbones_from(model: SSLMetaArch, source: str) -> None:
    """Continue pretraining: student and teacher backbones (in distillation: the student and its EMA) start from a
    released or earlier checkpoint."""
    from dinolab.hub import load_backbone
    from dinolab.hub.convert import load_strict

    pretrained = load_backbone(source)
    state = pretrained.state_dict()
    if "mask_token" in state and not torch.any(state["mask_token"]):
        log.info("the checkpoint's mask token is zero (e.g. converted from timm); it will be learned")
    for backbone in (model.student["backbone"], model.produced_backbone):
        load_strict(backbone, state, source=source)


def train(config: TrainConfig) -> TrainResult:
    """Run (or resume) pretraining as configured; returns where the run is and whether it finished.

    One writer per run directory; SIGTERM / SIGINT end the step, write a checkpoint and return (see guard.py). The
    CPU linear backend selected for the run (``run.cpu_matmul``) is reset to the process's previous one on return."""
    backend = cpu_matmul()
    try:
        with RunGuard(config.run.output_dir) as guard:
            return _train(config, guard)
    finally:
        set_cpu_matmul(backend)


def _train(config: TrainConfig, guard: RunGuard) -> TrainResult:
    env = init_distributed(config.run.device)
    if env.device.type == "cpu":
        reuse_freed_memory()  # on a busy CPU ~20 % of a step went to page faults on fresh activations
    run_dir = Path(config.run.output_dir)
    teacher = None
    if config.distill.enabled:  # may first warm up a backbone-only teacher's heads (a run of its own)
        teacher = prepare_teacher(config)
        config = student_config(config, teacher.config)
    optim_cfg, run_cfg = config.optim, config.run
    resume_from = latest_checkpoint(run_dir)
    if resume_from is not None:  # checked before config.json is written: a refused resume changes nothing
        check_resumable(config, read_meta(resume_from), resume_from)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        guard.save_config(config)
    torch.manual_seed(run_cfg.seed)

    # when resuming, the weights come from the checkpoint: skip reading init_from weights that would be overwritten
    model = build_model(config, env, load_init=resume_from is None, teacher=teacher)
    num_blocks = model.student["backbone"].n_blocks
    may_skip = optim_cfg.freeze_backbone_iters > 0 or config.heads.ibot_separate_head
    checkpointing = choose_activation_checkpointing(config, model, env.device)
    choose_cpu_linear(config, model, env.device)  # logs the timings behind an 'auto' choice
    if env.is_main and run_cfg.activation_checkpointing == "auto":
        log.info("activation checkpointing: %s (run.activation_checkpointing=auto)", checkpointing)
    run_cfg = dataclasses.replace(run_cfg, activation_checkpointing=checkpointing)
    wrapped = parallelize(model, env, run_cfg, may_skip_parameters=may_skip)
    groups = get_param_groups(
        model.student,
        num_blocks=num_blocks,
        layer_decay=optim_cfg.layer_decay,
        patch_embed_lr_mult=optim_cfg.patch_embed_lr_mult,
    )
    # fused on CPUs too: as fast as foreach there, without its parameter-sized temporaries (-100 MB at ViT-S/14)
    optimizer = torch.optim.AdamW(groups, betas=optim_cfg.adamw_betas, fused=True)
    scaler = torch.amp.GradScaler(env.device.type, enabled=run_cfg.dtype == "fp16")

    start_step, stream_state = 0, None
    if resume_from is not None:
        meta = load_checkpoint(resume_from, model, optimizer)
        start_step, stream_state = int(meta["step"]), meta.get("data_stream")
        if "scaler" in meta and run_cfg.dtype == "fp16":
            scaler.load_state_dict(meta["scaler"])
        if env.is_main:
            log.info(
                "resumed from %s (iteration %d, written by %d processes)", resume_from, start_step, meta["world_size"]
            )
    guard.forget_after(start_step)  # the iterations after the checkpoint run (and are logged) again

    global_batch = optim_cfg.batch_size_per_process * optim_cfg.accumulation_steps * env.world_size
    schedules = make_schedules(config, global_batch)
    total = optim_cfg.total_iters
    data = build_training_data(config, env, start_sample=start_step * global_batch, stream_state=stream_state)
    logger = MetricLogger(run_dir, enabled=env.is_main, tensorboard=run_cfg.tensorboard)
    stop_at = min(total, start_step + run_cfg.stop_after_iters) if run_cfg.stop_after_iters else total

    step_ctx = StepContext(model, wrapped, optimizer, scaler, run_cfg.dtype, env.device, optim_cfg)
    health = HealthMonitor(enabled=env.is_main and run_cfg.health_warnings)
    window_start, window_images = time.perf_counter(), 0
    progress = tqdm(total=total, initial=start_step, disable=not (run_cfg.progress and env.is_main), unit="it")
    try:
        for step in range(start_step, stop_at):
            # 1. schedules: every value is a function of the iteration
            values = schedules.values(step)
            if config.distill.enabled:  # the momentum moves the exported student EMA (the teacher is frozen)
                values["momentum"] = student_ema_momentum(values["momentum"], step)
            apply_schedules(optimizer, lr=values["lr"], wd=values["wd"], last_layer_lr=values["last_layer_lr"])
            torch.manual_seed(step_seed(run_cfg.seed, step, env.rank))
            freeze_backbone = step < optim_cfg.freeze_backbone_iters
            done = step + 1
            logging_step = done % run_cfg.log_every == 0 or done == stop_at  # also computes the target health

            # 2-3. forward/backward over the micro-batches, clip, step, EMA
            micro_batches = data.next_batches(optim_cfg.accumulation_steps, env.device)
            try:
                sums, step_stats = train_step(step_ctx, micro_batches, values, freeze_backbone, logging_step)
            except NonFiniteLossError as error:
                raise NonFiniteLossError(_non_finite_message(step, error.args[0], run_dir)) from None

            # 4. log
            window_images += global_batch
            progress.update(1)
            if logging_step:
                elapsed = time.perf_counter() - window_start
                losses = {
                    f"loss/{k}": float(all_reduce_mean(torch.tensor(v, device=env.device))) for k, v in sums.items()
                }
                metrics = {
                    **losses,
                    **values,
                    **step_stats,
                    "images_per_s": window_images / max(elapsed, 1e-9),
                    "skipped_images": data.skipped_total,
                }
                seconds_left = (total - done) * elapsed / max(window_images / global_batch, 1)
                logger.log(done, metrics)
                warning = health.update(done, metrics)
                if env.is_main:
                    progress.write(format_line(done, total, metrics, seconds_left))
                    if warning:
                        progress.write(f"WARNING: {warning}")
                window_start, window_images = time.perf_counter(), 0

            # 5. checkpoint (also when a signal asked to stop: SIGTERM is how clusters pre-empt)
            signalled = guard.stop_requested(env)
            if done % run_cfg.checkpoint_every == 0 or done == stop_at or signalled:
                _checkpoint(
                    run_dir, done, model, optimizer, scaler, config, run_cfg.keep_checkpoints, data.stream_state()
                )
            if signalled and done < stop_at:
                log.warning(
                    "stopped by %s after iteration %d; checkpoint saved in %s: run the same command to resume",
                    guard.stop.signal_name or "a signal to another process",
                    done,
                    run_dir / "checkpoints",
                )
                stop_at = done
                break
    finally:
        progress.close()
        logger.close()
        data.close()

    finished = stop_at == total
    exported = None
    if finished:
        name = STUDENT_BACKBONE if model.distillation else TEACHER_BACKBONE
        exported = export_backbone(model, run_dir / name, env)
    return TrainResult(run_dir=run_dir, steps_done=stop_at, finished=finished, backbone=exported)


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
    # the position embedding is sized for model.img_size, or crops.global_size when that is unset
    before, after = (_image_size(c) for c in (saved, current))
    if before is not None and before != after:
        changed.append(f"image size (model.img_size, or crops.global_size when unset): {before} -> {after}")
    if changed:
        raise ConfigError(
            f"{checkpoint} was written with another architecture ({'; '.join(changed)}); "
            "use a new run.output_dir, or restore these values to resume"
        )


def _image_size(config: dict) -> int | None:
    return config.get("model", {}).get("img_size") or config.get("crops", {}).get("global_size")


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
    ctx: StepContext,
    micro_batches: Iterable[Batch],
    values: dict[str, float],
    freeze_backbone: bool = False,
    with_health: bool = False,
) -> tuple[dict[str, float], dict[str, float]]:
    """One iteration: forward/backward over ``accumulation_steps`` micro-batches, clip, AdamW, teacher EMA.

    Returns the mean loss terms of this process, and the step's statistics: the gradient norms before clipping
    and, ``with_health``, the target-health statistics of the last micro-batch (``health/…``, global batch).
    Gradients are synchronised (DDP all-reduce / FSDP reduce-scatter) only on the last micro-batch.
    """
    steps = ctx.optim.accumulation_steps
    ctx.optimizer.zero_grad(set_to_none=True)
    sums = {"total": 0.0, "dino": 0.0, "ibot": 0.0, "koleo": 0.0}
    health: dict[str, float] = {}
    for index, batch in enumerate(micro_batches):
        last = index == steps - 1
        with _gradient_sync(ctx, enabled=last), autocast(ctx.device, ctx.dtype):
            terms = ctx.forward(batch, values["teacher_temp"], freeze_backbone, with_health and last)
            if not torch.isfinite(terms.total):
                raise NonFiniteLossError(terms.detached())
            with phase("backward"):
                ctx.scaler.scale(terms.total / steps).backward()
        for name, value in terms.detached().items():
            sums[name] += value / steps
        health = terms.health or health
    with phase("clip"):
        ctx.scaler.unscale_(ctx.optimizer)
        grad_norms = clip_gradients(ctx.model.student, ctx.optim.clip_grad, ctx.optim.clip_grad_mode)
    with phase("optimizer"):
        ctx.scaler.step(ctx.optimizer)
        ctx.scaler.update()
    with phase("ema"):
        ctx.model.update_teacher(values["momentum"])
    return sums, {**grad_norms, **{f"health/{k}": v for k, v in health.items()}}


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


def clip_gradients(student: torch.nn.ModuleDict, max_norm: float, mode: str = "per_module") -> dict[str, float]:
    """Clip the student's gradients; returns the norms before clipping: ``grad_norm`` over all parameters and
    ``grad_norm/<module>`` for each sub-module (backbone, dino_head, ibot_head).

    ``per_module`` clips each sub-module to ``max_norm`` on its own, as the official trainer does
    (``for v in student.values(): v.clip_grad_norm_(3.0)``); ``global`` clips one norm over all of them.
    ``max_norm = 0`` only measures.
    """
    grads = {name: [p for p in module.parameters() if p.grad is not None] for name, module in student.items()}
    grads = {name: params for name, params in grads.items() if params}
    if not grads:
        return {"grad_norm": 0.0}
    # the norms stay DTensors under FSDP2 for clipping (sharded gradients); plain floats only for the log
    norms = {name: torch.nn.utils.get_total_norm([p.grad for p in params]) for name, params in grads.items()}
    if max_norm > 0 and mode == "per_module":
        for name, params in grads.items():
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, norms[name])
    elif max_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for params in grads.values() for p in params], max_norm)
    values = {f"grad_norm/{name}": _to_float(norm) for name, norm in norms.items()}
    return {"grad_norm": math.sqrt(sum(v * v for v in values.values())), **values}


def _to_float(norm: torch.Tensor) -> float:
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def _checkpoint(
    run_dir, step, model, optimizer, scaler, config: TrainConfig, keep: int, stream_state: dict | None = None
) -> None:
    meta = {"config": config.to_dict()}
    if stream_state is not None:  # a streamed dataset's position is not a function of the step: saved with it
        meta["data_stream"] = stream_state
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


def export_backbone(model: SSLMetaArch, path: Path, env: DistEnv) -> Path:
    """The run's backbone (teacher, or the student's EMA in distillation) in the released format, loadable by
    ``dinolab.hub`` and ``dinolab embed``."""
    state = full_state_dict(model.produced_backbone)
    if env.is_main:
        save_backbone(state, path)
    return path


def load_run_backbone(run_dir: str | Path, checkpoint: str | Path | None = None) -> torch.nn.Module:
    """The backbone a run produces, read from a checkpoint (the latest by default): the teacher of a pretraining
    run, the student's EMA of a distillation run. Returned on CPU in eval mode; only its tensors are read."""
    checkpoint = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint under {Path(run_dir) / 'checkpoints'}")
    config = from_dict(TrainConfig, read_meta(checkpoint)["config"])
    img_size = config.model.img_size or config.crops.global_size
    backbone = build_backbone(config.model, img_size, drop_path_rate=0.0)
    prefix = "student_ema." if config.distill.enabled else "teacher.backbone."
    load_module_tensors(checkpoint, backbone, prefix)
    return backbone.eval()


def export_run(run_dir: str | Path, output: str | Path, checkpoint: str | Path | None = None) -> Path:
    """Export the backbone of a run's checkpoint (latest by default) to a released-format file."""
    return save_backbone(load_run_backbone(run_dir, checkpoint).state_dict(), output)
