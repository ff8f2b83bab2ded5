#!/usr/bin/env bash
# One short pass of the GPU checks, from the repository root of a CUDA machine (nothing is downloaded):
#   1. the chunked prototype cross-entropy and the efficient training forward against the plain ones, on CUDA,
#   2. an FSDP2 training run on CUDA in bf16 under torchrun (a tiny recipe),
#   3. the training-step ladder (benchmarks/train_step.py --compare) for ViT-S/14, 2x224 + 8x98, 65536 prototypes,
#      then the bf16 rows again with torch.compile of the blocks,
#   4. inference against timm (fp32, bf16; and bf16 with a 518 px position embedding, as the released models).
# Results go to $OUT (default /tmp/dinolab_gpu).
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/dinolab_gpu}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"

echo "== CUDA correctness: chunked cross-entropy and the efficient forward"
timeout 120 python3 - <<'PY'
import torch
import torch.nn.functional as F

from dinolab.losses import prototype_cross_entropy

g = torch.Generator(device="cuda").manual_seed(0)
z = F.normalize(torch.randn(700, 256, device="cuda", generator=g), dim=-1).requires_grad_()
w = torch.randn(65536, 256, device="cuda", generator=g).requires_grad_()
t = torch.randn(700, 65536, device="cuda", generator=g).softmax(-1)
for dtype in (None, torch.bfloat16):
    with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        ours = prototype_cross_entropy(z, w, t, 0.1)
        logits = z @ w.T
    ref = F.cross_entropy(logits.float() / 0.1, t, reduction="none")
    go = torch.autograd.grad(ours.sum(), [z, w])
    gr = torch.autograd.grad(ref.sum(), [z, w])
    print(dtype, "loss max diff", (ours - ref).abs().max().item(),
          "grad rel diff", [((a - b).abs().max() / b.abs().max()).item() for a, b in zip(go, gr)])

import sys

import numpy as np
from dinolab.data.augmentation import MultiCropViews
from dinolab.data.collate import collate_views
from dinolab.data.masking import MaskingGenerator
from dinolab.train.config import HeadsConfig, LossConfig, ModelConfig
from dinolab.train.meta_arch import SSLMetaArch
sys.path.insert(0, "benchmarks")
from naive_meta_arch import IBOTStyleMetaArch

views = [MultiCropViews(global_crops=[torch.randn(3, 224, 224) for _ in range(2)],
                        local_crops=[torch.randn(3, 98, 98) for _ in range(8)], local_size=98) for _ in range(4)]
batch = collate_views(views, MaskingGenerator(16), mask_sample_probability=1.0, rng=np.random.default_rng(0)).to("cuda")

def run(naive: bool):
    torch.manual_seed(0)
    model = ModelConfig(arch="vit_small", depth=4, drop_path_rate=0.0, packed_sequences=not naive)
    meta_arch = IBOTStyleMetaArch if naive else SSLMetaArch
    arch = meta_arch(model, HeadsConfig(), LossConfig(chunked_cross_entropy=not naive), img_size=224).cuda()
    terms = arch(batch, teacher_temp=0.07)
    terms.total.backward()
    return terms.detached(), {k: p.grad for k, p in arch.student.named_parameters() if p.grad is not None}

naive, fast = run(True), run(False)
print("losses naive", naive[0], "\nlosses fast ", fast[0])
print("max grad rel diff", max(((fast[1][k] - v).abs().max() / v.abs().max().clamp(min=1e-12)).item() for k, v in naive[1].items()))
PY

python3 - "$OUT/images" <<'PY'
import sys, pathlib, numpy as np
from PIL import Image
out = pathlib.Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)
for i in range(128):
    Image.fromarray((rng.random((256, 320, 3)) * 255).astype("uint8")).save(out / f"{i:04d}.jpg")
PY
echo "== FSDP2 bf16, tiny recipe"
timeout 90 torchrun --standalone --nproc-per-node=1 -m dinolab train --recipe cpu_small --data "$OUT/images" \
  --output "$OUT/fsdp_tiny" run.parallel=fsdp run.dtype=bf16 run.device=cuda optim.epochs=1 run.num_workers=8 \
  run.tensorboard=false run.progress=false run.log_every=25 2>&1 | grep -E "^\[|finished|Error|error" | tail -6

echo "== training-step ladder"
timeout 240 python3 benchmarks/train_step.py --compare --device cuda --batch-size 32 --steps 5 --warmup 2 \
  | tee "$OUT/train_step_cuda.txt"
echo "== + torch.compile of the blocks (no, selective, full activation checkpointing)"
for extra in none selective full; do
  timeout 150 python3 benchmarks/train_step.py --device cuda --batch-size 32 --steps 5 --warmup 3 \
    --dtype bf16 --compile --activation-checkpointing $extra | tee -a "$OUT/train_step_cuda.txt"
done

echo "== inference vs timm"
for args in "--dtype fp32 --batch-size 32" "--dtype bf16 --batch-size 256" "--dtype bf16 --batch-size 256 --pos-embed-size 518"; do
  timeout 60 python3 benchmarks/inference.py --model vit_small --image-size 224 --steps 20 --warmup 5 $args \
    | tee -a "$OUT/inference_cuda.txt"
done
