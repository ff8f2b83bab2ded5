#!/usr/bin/env bash
# One short pass of the GPU checks, from the repository root of a CUDA machine (nothing is downloaded):
#   1. two FSDP2 training runs on CUDA in bf16 under torchrun (a tiny recipe; then a ViT-S/14 at 224 px),
#   2. the training-step ladder (benchmarks/train_step.py --compare) for ViT-S/14, 2x224 + 8x98, 65536 prototypes.
# Results go to $OUT (default /tmp/dinolab_gpu).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/dinolab_gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
python3 - "$OUT/images" <<'PY'
import sys, pathlib, numpy as np
from PIL import Image
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(256):
    Image.fromarray((rng.random((256, 320, 3)) * 255).astype("uint8")).save(out / f"{i:04d}.jpg")
PY
echo "== FSDP2 bf16, tiny recipe"
timeout 90 torchrun --standalone --nproc-per-node=1 -m dinolab train --recipe cpu_small --data "$OUT/images" \
  --output "$OUT/fsdp_tiny" run.parallel=fsdp run.dtype=bf16 run.device=cuda optim.epochs=1 run.num_workers=8 \
  run.tensorboard=false run.progress=false run.log_every=25 2>&1 | grep -E "^\[|finished|Error|error" | tail -6
echo "== FSDP2 bf16, ViT-S/14 224px, batch 64, 2x224 + 8x98, 65536 prototypes"
timeout 120 torchrun --standalone --nproc-per-node=1 -m dinolab train --recipe vits14_lvd142m --data "$OUT/images" \
  --output "$OUT/fsdp_vits" run.parallel=fsdp run.dtype=bf16 run.device=cuda optim.epochs=1 optim.iters_per_epoch=30 \
  optim.warmup_epochs=0.5 run.num_workers=12 run.tensorboard=false run.progress=false run.log_every=10 2>&1 \
  | grep -E "^\[|finished|Error|error" | tail -6
echo "== training-step ladder"
timeout 200 python3 benchmarks/train_step.py --compare --device cuda --batch-size 32 --steps 5 --warmup 2 \
  | tee "$OUT/train_step_cuda.txt"
