#!/usr/bin/env bash
# The one command to run on a GPU machine: WKV7 kernels (build, correctness vs the reference, speed vs fla),
# 0.1B state tuning / LoRA through the real trainer at ctx 1024 batch 1 and ctx 512 batch 16 (peak VRAM,
# tokens/s, beside RWKV-PEFT's and RWKV-LM's published figures), `rwkv-peft doctor`; one summary table.
#   bash scripts/gpu_check.sh [OUT.json] [--dry-run] [--skip PART]   run from anywhere; default gpu_check.json
# Needs a CUDA build of torch and triton; fla is optional. Exit code 0 = every correctness check passed,
# 1 = something computes wrong or crashed, 2 = no CUDA device. About 3 minutes on an H200, capped to stay
# under 5 (see scripts/gpu_check.py); --dry-run runs every part on the CPU at tiny shapes, without a GPU.
# In the same session, also run: python -m pytest -q tests/test_cuda_paths.py (the GPU-only paths; ~1 min).
set -euo pipefail
out=gpu_check.json
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then out="$1"; shift; fi
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
cd "$(dirname "$0")/.."
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
exec "$py" scripts/gpu_check.py --out "$out" "$@"
