"""The official iBOT code's training step, run from a checkout of it: the iBOT row of
``benchmarks/train_step.py --compare --ibot-repo PATH``.

    git clone https://github.com/bytedance/ibot /tmp/ibot      # not vendored, not a dependency
    python benchmarks/peer_ibot.py --ibot-repo /tmp/ibot --arch vit_small --batch-size 4 --device cpu

The step is ``main_ibot.py``'s ``train_one_epoch`` body on the repository's own modules: ``models.vit_*``
(``return_all_tokens``, ``masked_im_modeling`` on the student), ``utils.MultiCropWrapper`` with ``models.head.iBOTHead``
(one pass per crop size, the head on every token of every crop), ``main_ibot.iBOTLoss``, AdamW on
``utils.get_params_groups``, ``utils.clip_gradients`` (3.0) and the teacher EMA written as in the loop. The crops,
prototypes (``out_dim`` = ``patch_out_dim``), stochastic depth, masks and random data are those of train_step.py.
fp32; the loss's centre all-reduce runs on a one-process gloo group. ``main_ibot.py`` imports its data loader and
evaluation modules at the top; their optional dependencies (tensorboardX, munkres) are replaced by empty modules
when missing, since the step never calls them. Prints one JSON line like train_step.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import numpy as np
import torch
import torch.distributed as dist
from step_timer import (  # benchmarks/: the script's own folder is on sys.path
    PEER_WIDTHS,
    peer_step_arguments,
    print_peer_record,
    time_steps,
)


def parse_args() -> argparse.Namespace:
    parser = peer_step_arguments(__doc__)
    parser.add_argument("--ibot-repo", required=True, help="a checkout of github.com/bytedance/ibot")
    return parser.parse_known_args()[0]  # train_step.py's other flags do not apply here


def import_ibot(repo: str) -> types.SimpleNamespace:
    """The repository's modules, imported from ``repo`` (its top-level modules are named models, utils, ...)."""
    for name in ("tensorboardX", "munkres"):
        try:
            __import__(name)
        except ImportError:
            stub = types.ModuleType(name)
            stub.SummaryWriter = stub.Munkres = object
            sys.modules[name] = stub
    sys.path.insert(0, os.path.abspath(repo))
    import main_ibot
    import models
    import utils
    from models.head import iBOTHead

    return types.SimpleNamespace(models=models, utils=utils, iBOTHead=iBOTHead, iBOTLoss=main_ibot.iBOTLoss)


def build(args: argparse.Namespace, ibot: types.SimpleNamespace):
    device = torch.device(args.device)
    dim, depth, heads = PEER_WIDTHS[args.arch]  # as the repository's models.vit_* functions build them
    vit = dict(
        patch_size=args.patch_size, embed_dim=dim, depth=args.depth or depth, num_heads=heads, mlp_ratio=4,
        qkv_bias=True, return_all_tokens=True,
    )  # fmt: skip
    student = ibot.models.VisionTransformer(drop_path_rate=args.drop_path, masked_im_modeling=True, **vit)
    teacher = ibot.models.VisionTransformer(**vit)
    embed_dim = student.embed_dim
    head = dict(patch_out_dim=args.prototypes, norm=None, act="gelu", shared_head=False)
    student = ibot.utils.MultiCropWrapper(
        student, ibot.iBOTHead(embed_dim, args.prototypes, norm_last_layer=True, **head)
    )
    teacher = ibot.utils.MultiCropWrapper(teacher, ibot.iBOTHead(embed_dim, args.prototypes, **head))
    student, teacher = student.to(device), teacher.to(device)
    teacher.load_state_dict(student.state_dict(), strict=False)  # as main_ibot.py: the student's mask token extra
    for p in teacher.parameters():
        p.requires_grad = False
    loss = ibot.iBOTLoss(args.prototypes, args.prototypes, 2, args.local_crops, 0.04, 0.07, 0.04, 0.07, 30, 100).to(
        device
    )  # the defaults of main_ibot.py: teacher temperatures 0.04 -> 0.07 over 30 of 100 epochs
    optimizer = torch.optim.AdamW(ibot.utils.get_params_groups(student))
    return student, teacher, loss, optimizer


def random_inputs(args: argparse.Namespace, device: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """2 global and ``local_crops`` local crops of ``batch_size`` images, and one ``[B, h, w]`` patch mask per
    global crop with a masking ratio drawn from iBOT's 0.1-0.5 in half of the images."""
    g = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    b, grid = args.batch_size, args.global_size // args.patch_size
    images = [torch.randn(b, 3, args.global_size, args.global_size, generator=g) for _ in range(2)]
    images += [torch.randn(b, 3, args.local_size, args.local_size, generator=g) for _ in range(args.local_crops)]
    masks = []
    for _ in range(2):
        mask = np.zeros((b, grid * grid), dtype=bool)
        for row in range(0, b, 2):
            mask[row, rng.choice(grid * grid, int(grid * grid * rng.uniform(0.1, 0.5)), replace=False)] = True
        masks.append(torch.from_numpy(mask.reshape(b, grid, grid)))
    return [i.to(device) for i in images], [m.to(device) for m in masks]


def step(student, teacher, loss_fn, optimizer, images, masks, ibot) -> None:
    """One iteration of main_ibot.py's train_one_epoch (fp32, no DDP)."""
    teacher_output = teacher(images[:2])
    student_output = student(images[:2], mask=masks[:2])
    student.backbone.masked_im_modeling = False
    student_local_cls = student(images[2:])[0]
    student.backbone.masked_im_modeling = True
    loss = loss_fn(student_output, teacher_output, student_local_cls, masks, epoch=0)["loss"]
    optimizer.zero_grad()
    loss.backward()
    ibot.utils.clip_gradients(student, 3.0)
    optimizer.step()
    with torch.no_grad():  # the EMA over the parameters both have, as the loop pairs them by name
        teacher_params = dict(teacher.named_parameters())
        for name, param_q in student.named_parameters():
            if name in teacher_params:
                teacher_params[name].data.mul_(0.994).add_((1 - 0.994) * param_q.detach().data)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)  # iBOTLoss all-reduces its centres
    ibot = import_ibot(args.ibot_repo)
    torch.manual_seed(0)
    student, teacher, loss_fn, optimizer = build(args, ibot)
    device = torch.device(args.device)
    images, masks = random_inputs(args, device)
    step_time, peak_mb = time_steps(
        lambda index: step(student, teacher, loss_fn, optimizer, images, masks, ibot), device, args.warmup, args.steps
    )
    print_peer_record(args, step_time, peak_mb, f"iBOT code ({os.path.abspath(args.ibot_repo)})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
