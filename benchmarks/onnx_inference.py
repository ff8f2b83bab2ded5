"""Feature-extraction speed of an ONNX export in ONNX Runtime against the same backbone in PyTorch.

    python benchmarks/onnx_inference.py --model dinov2_vits14 --batch-size 8 --image-size 224 --steps 20 --threads 2

The backbone (random weights: the speed does not depend on them; the released 518 px position grid, so both
resize it to 224 px like a released model) is exported with ``dinolab.hub.export_backbone`` (checked against the
source on the way), then timed in fp32 on the CPU: PyTorch's ``forward_features`` under ``torch.inference_mode``
and the ONNX graph in an ``onnxruntime.InferenceSession`` (all graph optimisations), the same number of threads
each, one step of each in turn (interleaved, so a busy machine slows both alike). Prints one JSON line: the
median step times, images/s, the ratio ``onnxruntime_images_per_s / torch_images_per_s`` and the largest
difference between the two outputs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dinolab.hub import RELEASED

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dinov2_vits14", choices=list(RELEASED))
    parser.add_argument("--depth", type=int, help="fewer blocks than the released model (for quick runs)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per runtime")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per runtime first")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads for both runtimes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import onnxruntime

    from dinolab.hub import make_dinov2_model
    from dinolab.hub.export import export_backbone

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    extra = {"depth": args.depth} if args.depth else {}
    model = make_dinov2_model(args.model, pretrained=False, **extra).eval()
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        check = args.image_size
        export_backbone(model, path, check_sizes=[(check, check), (check, check + model.patch_size)])
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {"pixel_values": x.numpy()}

    def run_torch() -> torch.Tensor:
        with torch.inference_mode():
            return model.forward_features(x)["x_norm_patchtokens"]

    def run_onnx() -> torch.Tensor:
        return torch.from_numpy(session.run(None, feed)[-1])

    diff = (run_torch() - run_onnx()).abs().max().item()
    times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
    for step in range(args.warmup + args.steps):
        for name, fn in (("torch", run_torch), ("onnxruntime", run_onnx)):
            start = time.perf_counter()
            fn()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    record = {
        "model": args.model,
        "depth": args.depth or len(model.blocks),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "threads": args.threads,
        "steps": args.steps,
        "torch_step_s": round(median["torch"], 4),
        "onnxruntime_step_s": round(median["onnxruntime"], 4),
        "torch_images_per_s": round(args.batch_size / median["torch"], 2),
        "onnxruntime_images_per_s": round(args.batch_size / median["onnxruntime"], 2),
        "ratio_onnxruntime_vs_torch": round(median["torch"] / median["onnxruntime"], 3),
        "max_abs_diff_patch_tokens": diff,
        "torch_version": torch.__version__,
        "onnxruntime_version": onnxruntime.__version__,
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
