#!/bin/bash
# Everything GPU-only, checked and timed in one call (run it when a GPU is available):
#   bash scripts/gpu_check.sh            # prints tables to paste into benchmarks/RESULTS.md
# It uses .venv (make setup) when there is one, else the machine's python3 with src/ on the path. Where python3
# lacks a package (jsonargparse, on the lent GPU machines), install its wheels first: see benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then python=.venv/bin/python; else python=python3; export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$python" scripts/gpu_check.py "$@"
"$python" benchmarks/plan_accuracy.py  # the memory planner against torch.cuda.max_memory_allocated
# Training throughput on the GPU: ResNet-50 in bf16 with channels_last, eager and compiled, against the hand-written loop.
"$python" benchmarks/data_pipeline.py --repeats 1 --per_run 200  # also writes data/bench_jpegs
for compiled in "" --compile; do
  "$python" benchmarks/train_throughput.py --root data/bench_jpegs --backbone resnet50 --crop_size 224 \
    --batch_size 128 --precision bf16-mixed --channels_last $compiled --accelerator cuda --workers 8 \
    --epochs 6 --batches 15
done
