"""The DINOv2 training step assembled from the ``lightly`` library's components on timm's ViT: the peer row of
``benchmarks/train_step.py --compare``.

    pip install lightly            # dev-only: never a dependency of dinolab
    python benchmarks/peer_lightly.py --arch vit_small --batch-size 8 --device cpu

The step follows lightly's own DINOv2 example (``examples/pytorch/dinov2.py``): ``MaskedVisionTransformerTIMM``
over a timm ``VisionTransformer`` (learned position embedding resized per crop size, layer scale 1e-5), one
``DINOv2ProjectionHead`` shared by the DINO and iBOT losses, ``DINOLoss``, ``IBOTPatchLoss``, ``KoLeoLoss`` (weight
0.1 on each global crop's CLS tokens), block masks from ``random_block_mask``, AdamW and ``update_momentum``. The
crops, prototypes, stochastic depth (uniform) and data are the ones train_step.py uses, and it clips gradients at
3.0 as dinolab's step does, so both rows time the same work: teacher forward, student forward on the global
(masked) and local crops, the three losses, backward, clipping, AdamW, the EMA of backbone and head. Prints one
JSON line like train_step.py (median step time after warm-up, the process's peak resident set on CPU,
``max_memory_allocated`` on CUDA).
"""

from __future__ import annotations

import argparse
import copy

import torch
from step_timer import (  # benchmarks/: the script's own folder is on sys.path
    PEER_WIDTHS,
    peer_step_arguments,
    print_peer_record,
    time_steps,
)
from torch import nn


def parse_args() -> argparse.Namespace:
    parser = peer_step_arguments(__doc__)
    return parser.parse_known_args()[0]  # train_step.py's other flags do not apply here


class LightlyDINOv2(nn.Module):
    def __init__(self, args: argparse.Namespace) -> None:
        from lightly.models.modules import DINOv2ProjectionHead, MaskedVisionTransformerTIMM
        from lightly.models.utils import update_drop_path_rate
        from timm.models.vision_transformer import VisionTransformer

        super().__init__()
        dim, depth, heads = PEER_WIDTHS[args.arch]
        vit = VisionTransformer(
            img_size=args.global_size,
            patch_size=args.patch_size,
            embed_dim=dim,
            depth=args.depth or depth,
            num_heads=heads,
            init_values=1e-5,
            pos_embed="learn",
            dynamic_img_size=True,
            num_classes=0,
        )
        self.teacher_backbone = MaskedVisionTransformerTIMM(vit=vit, antialias=False, pos_embed_initialization="skip")
        self.student_backbone = copy.deepcopy(self.teacher_backbone)
        update_drop_path_rate(self.student_backbone.vit, drop_path_rate=args.drop_path, mode="uniform")
        self.student_head = DINOv2ProjectionHead(input_dim=dim, output_dim=args.prototypes)
        self.teacher_head = DINOv2ProjectionHead(input_dim=dim, output_dim=args.prototypes)  # weight norm: no deepcopy
        self.teacher_head.load_state_dict(self.student_head.state_dict())
        for module in (self.teacher_backbone, self.teacher_head):
            module.requires_grad_(False)


def build(args: argparse.Namespace):
    from lightly.loss import DINOLoss, IBOTPatchLoss, KoLeoLoss

    device = torch.device(args.device)
    model = LightlyDINOv2(args).to(device)
    losses = (
        DINOLoss(output_dim=args.prototypes).to(device),
        IBOTPatchLoss(output_dim=args.prototypes).to(device),
        KoLeoLoss().to(device),
    )
    params = [*model.student_backbone.parameters(), *model.student_head.parameters()]
    return model, losses, torch.optim.AdamW(params, lr=1e-4, weight_decay=0.04, fused=device.type == "cuda" or None)


def step(model: LightlyDINOv2, losses, optimizer, global_views, local_views, args) -> None:
    from lightly.models.utils import random_block_mask, update_momentum

    dino_criterion, ibot_criterion, koleo_criterion = losses
    grid = args.global_size // args.patch_size
    block_mask = random_block_mask(size=(global_views.shape[0], grid, grid), device=global_views.device)
    mask = torch.zeros(global_views.shape[0], grid * grid + 1, dtype=torch.bool, device=global_views.device)
    mask[:, 1:] = block_mask.flatten(start_dim=1)
    with torch.no_grad():
        teacher_features = model.teacher_backbone.encode(global_views)
        teacher_cls_out = model.teacher_head(teacher_features[:, 0])
        teacher_masked_out = model.teacher_head(teacher_features[mask])
    student_global = model.student_backbone.encode(global_views, mask=mask)
    student_global_cls = student_global[:, 0]
    student_masked_out = model.student_head(student_global[mask])
    student_local_cls = model.student_backbone.encode(local_views)[:, 0]
    student_cls_out = model.student_head(torch.cat([student_global_cls, student_local_cls]))
    num_views = 2 + args.local_crops
    dino = dino_criterion(
        teacher_out=list(teacher_cls_out.chunk(2)),
        student_out=list(student_cls_out.chunk(num_views)),
        teacher_temp=0.07,
    )
    ibot = ibot_criterion(
        teacher_out=teacher_masked_out, student_out=student_masked_out, mask=block_mask, teacher_temp=0.07
    )
    koleo = 0.1 * sum(koleo_criterion(t) for t in student_global_cls.chunk(2))
    (dino + ibot + koleo).backward()
    for module in (model.student_backbone, model.student_head):
        nn.utils.clip_grad_norm_(module.parameters(), 3.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    update_momentum(model.student_backbone, model.teacher_backbone, m=0.994)
    update_momentum(model.student_head, model.teacher_head, m=0.994)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, losses, optimizer = build(args)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    global_views = torch.randn(2 * args.batch_size, 3, args.global_size, args.global_size, generator=g).to(device)
    local_views = torch.randn(args.local_crops * args.batch_size, 3, args.local_size, args.local_size, generator=g).to(
        device
    )
    step_time, peak_mb = time_steps(
        lambda index: step(model, losses, optimizer, global_views, local_views, args), device, args.warmup, args.steps
    )
    import lightly
    import timm

    print_peer_record(args, step_time, peak_mb, f"lightly {lightly.__version__} + timm {timm.__version__}")


if __name__ == "__main__":
    main()
