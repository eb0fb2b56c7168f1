#!/bin/bash
# Everything GPU-only, checked and timed in one call (run it when a GPU is available):
#   bash scripts/gpu_check.sh            # sets up .venv if needed, prints a table to paste into benchmarks/RESULTS.md
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || make setup
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
.venv/bin/python scripts/gpu_check.py "$@"
.venv/bin/python benchmarks/plan_accuracy.py  # the memory planner against torch.cuda.max_memory_allocated
