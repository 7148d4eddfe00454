#!/usr/bin/env bash
# The GPU check: one table of tokens/s, MFU, peak memory, decoding speed, host syncs and an FSDP2 step.
#   bash bench/gpu_check.sh            # from the repository root, on a machine with a CUDA GPU
# Sets up .venv with the default torch (pip picks the CUDA build) when there is none, then runs
# bench/gpu_check.py under an 8-minute limit. Copy its table into bench/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q torch
  .venv/bin/pip install -q -e .
fi
.venv/bin/python -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 480 .venv/bin/python bench/gpu_check.py "$@"
