#!/usr/bin/env bash
# GPU check of the WKV7 backends (build, correctness vs the reference, speed, memory).
#   bash scripts/gpu_check.sh [OUT.json]      run from anywhere; writes gpu_check.json by default
# Needs a CUDA build of torch and triton; fla is optional. Exit code 0 = all checks passed.
set -euo pipefail
out="${1:-gpu_check.json}"
case "$out" in /*) ;; *) out="$PWD/$out" ;; esac
cd "$(dirname "$0")/.."
py=python3
[ -x .venv/bin/python ] && py=.venv/bin/python
exec "$py" scripts/gpu_check.py --out "$out"
