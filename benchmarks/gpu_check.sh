#!/bin/bash
# On the GPU machine: CUDA kernel tests, then the kernel benchmark (every fp16 tile variant vs cuBLAS), a
# per-kernel profile of one W1 generate(), end-to-end generate() timing (W1; W2 with CHECK_W2=1).
#   source .device/on-device.sh && bash benchmarks/gpu_check.sh [pytest args...]
# Each stage is time-boxed (a kernel that never finishes must not eat the whole call).
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
set -o pipefail
# smoke test of the Hopper TMA products first: one shape per variant, 60 s at most
timeout -k 5 60 python3 -m pytest tests/test_cuda_kernels.py -x -q -k "test_gemm_f16 and tma and shape3 and 0-True" 2>&1 | tail -5
echo "tma smoke rc=$?"
timeout -k 5 ${T_TESTS:-420} python3 -m pytest tests/test_cuda_kernels.py -q --maxfail=30 "$@" 2>&1 | tail -40
echo "tests rc=$?"
W2=""
[ "${CHECK_W2:-0}" = 1 ] && W2=--w2
timeout -k 5 ${T_BENCH:-420} python3 benchmarks/kernels_bench.py --e2e --profile $W2 ${BENCH_ARGS:-} 2>&1
echo "bench rc=$?"
