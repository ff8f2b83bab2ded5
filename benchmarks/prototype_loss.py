"""The prototype cross-entropy's forward and backward at several tile shapes, side by side (one process, alternating).

    python benchmarks/prototype_loss.py --rows 706 --columns 65536 8192 4096   # a ViT-S/14 batch-8 step's student rows

``dinolab.losses.prototype_cross_entropy`` computes ``[rows, K]`` logits tile by tile. ``--columns`` lists the
prototypes per tile to compare (K = all of them: the row chunks of earlier versions); rows per tile follow from the
16 MB budget (``--chunk-elements``). Prints one JSON line per tile shape and round with the best time of
``--repeats``, and the four products' FLOPs over that time (GFLOP/s, soft-max passes included). fp32 (or ``--dtype bf16`` under autocast), random data, the fp32
CPU linear backend the trainer would choose here (``--cpu-matmul``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from dinolab.losses.prototypes import default_chunk_elements, prototype_cross_entropy
from dinolab.matmul import choose_cpu_matmul


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=706, help="student rows: CLS tokens and masked patches")
    parser.add_argument("--prototypes", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=256, help="the head's bottleneck width")
    parser.add_argument("--columns", type=int, nargs="+", default=[65536, 8192], help="prototypes per tile")
    parser.add_argument("--chunk-elements", type=int, default=0, help="logits per tile (0: the device's default)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--cpu-matmul", choices=["auto", "blas", "onednn"], default="auto")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and args.dtype == "fp32":
        choose_cpu_matmul(args.cpu_matmul, [(4096, args.dim, args.columns[-1])])
    generator = torch.Generator().manual_seed(0)
    features = F.normalize(torch.randn(args.rows, args.dim, generator=generator), dim=-1).to(device)
    features.requires_grad_()
    directions = torch.randn(args.prototypes, args.dim, generator=generator).to(device).requires_grad_()
    magnitudes = torch.ones(args.prototypes, 1, device=device, requires_grad=True)
    targets = torch.randn(args.rows, args.prototypes, generator=generator).softmax(-1).to(device)
    chunk_elements = args.chunk_elements or default_chunk_elements(device)

    def step(columns: int) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            losses = prototype_cross_entropy(
                features, directions, targets, 0.1, chunk_elements, magnitudes=magnitudes, chunk_columns=columns
            )
            losses.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    flop = 4 * 2 * args.rows * args.prototypes * args.dim  # logits, recomputed logits, two gradients
    for round_index in range(args.rounds):
        for columns in args.columns:
            step(columns)
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                step(columns)
                best = min(best, time.perf_counter() - start)
            rows_per_tile = max(1, chunk_elements // min(columns, args.prototypes))
            record = {
                "round": round_index,
                "tile": [min(rows_per_tile, args.rows), min(columns, args.prototypes)],
                "seconds": round(best, 4),
                "gflop_per_s": round(flop / best / 1e9, 1),
                "rows": args.rows,
                "prototypes": args.prototypes,
                "dtype": args.dtype,
                "threads": torch.get_num_threads(),
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
