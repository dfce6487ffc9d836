#!/usr/bin/env bash
# The GPU path of `recu binarize` in a few minutes, on the GPUs present (see gpu_check.py):
# step img/s of timm resnet18 (float vs ReCU, AMP bf16 and fp16), end-to-end runs on
# generated 224 px images (one GPU, then torchrun over all), a deterministic resume.
#
#   bash bench/gpu_check.sh [OUT]        # default OUT: bench/out/gpu_check (or $OUT)
#
# Exit 0: all checks passed; 1: a check failed (see the table); 2: no usable GPU here.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out="${1:-${OUT:-$repo/bench/out/gpu_check}}"
python="${PYTHON:-python}"

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi not found); run it on a GPU machine" >&2
    exit 2
fi
if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: nvidia-smi finds no usable GPU (driver not loaded?)" >&2
    exit 2
fi
if ! "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA device (CPU-only torch build, or CUDA_VISIBLE_DEVICES empty)" >&2
    exit 2
fi
if ! "$python" -c "import recu_cli, timm" 2>/dev/null; then
    echo "gpu_check: recu_cli or timm not importable; pip install -e . in $repo first" >&2
    exit 2
fi

nvidia-smi --query-gpu=index,name,compute_cap,memory.total,driver_version --format=csv
mkdir -p "$out"
cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
"$python" bench/gpu_check.py "$out" "${@:2}"
