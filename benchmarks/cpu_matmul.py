"""The products of a ViT's linear layers on this CPU in torch's BLAS path and in oneDNN, side by side (fp32).

    python benchmarks/cpu_matmul.py --arch vit_small --tokens 7312        # a ViT-S/14 batch-8 step's student tokens

For each layer shape of a block (qkv, proj, fc1, fc2) it times the three products of training: the forward
``x W^T + b``, the input gradient ``g W`` and the weight gradient ``g^T x``, each with ``torch`` (MKL on x86 builds)
and with oneDNN's linear kernel (``torch.ops.mkldnn._linear_pointwise``, what ``dinolab.matmul`` uses), alternating
the two, best of ``--repeats``, and prints GFLOP/s and the largest difference between the two results. This is the
measurement behind ``run.cpu_matmul`` (docs/efficiency.md).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

WIDTHS = {"vit_tiny": 192, "vit_small": 384, "vit_base": 768, "vit_large": 1024}


def best_seconds(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def layer_products(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, grad: torch.Tensor) -> dict:
    """product name -> (torch's version, oneDNN's version) for one linear layer."""
    onednn = torch.ops.mkldnn._linear_pointwise
    grad_t, x_t = grad.t().contiguous(), x.t().contiguous()  # oneDNN reads its inputs row-major
    return {
        "forward": (lambda: torch.addmm(bias, x, weight.t()), lambda: onednn(x, weight, bias, "none", [], "")),
        # the copies of the transposes are timed on the oneDNN side, as dinolab.matmul makes them per call
        "input_grad": (lambda: grad @ weight, lambda: onednn(grad, weight.t().contiguous(), None, "none", [], "")),
        "weight_grad": (lambda: grad.t() @ x, lambda: onednn(grad_t, x_t, None, "none", [], "")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=list(WIDTHS), default="vit_small")
    parser.add_argument("--tokens", type=int, default=7312)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    width = WIDTHS[args.arch]
    generator = torch.Generator().manual_seed(0)
    for name, fan_in, fan_out in [("qkv", width, 3 * width), ("proj", width, width),
                                  ("fc1", width, 4 * width), ("fc2", 4 * width, width)]:  # fmt: skip
        x = torch.randn(args.tokens, fan_in, generator=generator)
        weight = torch.randn(fan_out, fan_in, generator=generator)
        bias = torch.randn(fan_out, generator=generator)
        grad = torch.randn(args.tokens, fan_out, generator=generator)
        flop = 2 * args.tokens * fan_in * fan_out
        products = layer_products(x, weight, bias, grad)
        for product, (torch_fn, onednn_fn) in products.items():
            torch_s, onednn_s = best_seconds(torch_fn, args.repeats), best_seconds(onednn_fn, args.repeats)
            difference = (torch_fn() - onednn_fn()).abs().max().item()
            record = {
                "layer": name,
                "shape": [args.tokens, fan_in, fan_out],
                "product": product,
                "torch_gflops": round(flop / torch_s / 1e9, 1),
                "onednn_gflops": round(flop / onednn_s / 1e9, 1),
                "onednn_speedup": round(torch_s / onednn_s, 2),
                "max_abs_difference": difference,
                "threads": torch.get_num_threads(),
            }
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
