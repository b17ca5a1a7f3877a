#!/usr/bin/env bash
# The one command to run on a GPU machine: WKV7 kernels (build, correctness vs the reference, speed vs fla),
# 0.1B state tuning / LoRA through the real trainer (peak VRAM, tokens/s), `rwkv-peft doctor`; one summary table.
#   bash scripts/gpu_check.sh [OUT.json]      run from anywhere; writes gpu_check.json by default
# Needs a CUDA build of torch and triton; fla is optional. Exit code 0 = every correctness check passed,
# 1 = something computes wrong or crashed, 2 = no CUDA device. About 5 minutes on an H200.
set -euo pipefail
out="${1:-gpu_check.json}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
cd "$(dirname "$0")/.."
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
exec "$py" scripts/gpu_check.py --out "$out"
