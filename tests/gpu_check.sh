#!/usr/bin/env bash
# The bench's training rows on one GPU, within a time budget: each script's steady rate against its limit (the
# same model stepped on one batch already on the GPU), its data_time_share, peak memory and input shapes per 100
# iterations (tests/bench.py). The rows come in the bench's order until BUDGET_S seconds (default 190) are
# spent: the fine-tune and every pre-training with Faster R-CNN, then the switches to judge (--cudnn-benchmark,
# --channels-last, torchvision's padding), then the other detectors. Needs the repository, torch, torchvision,
# pycocotools and what the scripts import (numpy, pillow, tqdm, opencv), and a COCO-format folder (images/ +
# annotations.json, e.g. coco128). Writes OUT/bench.md (the tables), OUT/bench.json and OUT/limits.log; stops
# at the first failing row (exit status 1), and the whole check after BUDGET_S + 30 seconds at the latest.
#     tests/gpu_check.sh /data/coco128 /tmp/gpu-check
set -euo pipefail
usage="usage: tests/gpu_check.sh DATA_DIR OUT_DIR (DATA_DIR: images/ + annotations.json)"
data=$(realpath "${1:?$usage}")
out=$(realpath -m "${2:?$usage}")
budget=${BUDGET_S:-190}
python=${PYTHON:-python}
cd "$(dirname "$0")/.."
if [ ! -f "$data/annotations.json" ] || [ ! -d "$data/images" ]; then
    echo "error: $data: expected images/ and annotations.json ($usage)" >&2
    exit 2
fi
mkdir -p "$out"
# seconds, not minutes, to find a missing package or a GPU that cannot run a bf16 convolution
timeout 120 "$python" - <<'EOF'
import torch, torchvision
import finetune, alignDet, montage, predet, direct, tests.bench  # every import the rows need
assert torch.cuda.is_available(), "no CUDA device is visible"
x = torch.randn(2, 3, 64, 64, device="cuda", requires_grad=True)
with torch.autocast("cuda", dtype=torch.bfloat16):
    torch.nn.functional.conv2d(x, torch.randn(8, 3, 3, 3, device="cuda")).sum().backward()
torch.cuda.synchronize()
print(f"preflight: {torch.cuda.get_device_name()}, torch {torch.__version__}, torchvision {torchvision.__version__}")
EOF
cache=$(mktemp -d)  # Montage's sample cache and AlignDet's proposals, off OUT
trap 'rm -rf "$cache"' EXIT
timeout -k 10 $((budget + 30)) "$python" -m tests.bench --device cuda --data "$data" --out "$out" --workers 8 \
    --budget-s "$budget" --fail-fast --data-cache "$cache" --only finetune,aligndet,montage,predet,direct
