#!/bin/bash
# On the GPU machine: CUDA kernel tests, then the kernel benchmark (every fp16 tile variant vs cuBLAS), a
# per-kernel profile of one W1 generate(), and end-to-end generate() timing.
#   source .device/on-device.sh && bash benchmarks/gpu_check.sh [pytest args...]
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
set -o pipefail
python3 -m pytest tests/test_cuda_kernels.py -x -q "$@" 2>&1 | tail -40
echo "tests rc=$?"
python3 benchmarks/kernels_bench.py --e2e --profile ${BENCH_ARGS:-} 2>&1
