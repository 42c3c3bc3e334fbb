#!/bin/bash
# On the GPU machine: CUDA kernel tests, then the kernel benchmark (every fp16 tile variant vs cuBLAS), a
# per-kernel profile of one W1 generate(), end-to-end generate() timing (W1; W2 with CHECK_W2=1).
#   source .device/on-device.sh && bash benchmarks/gpu_check.sh [pytest args...]
# Each stage is time-boxed (a kernel that never finishes must not eat the whole call) and runs in its own
# process (a kernel fault ends its CUDA context, not the later stages).
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader
set -o pipefail
stage() {   # stage NAME SECONDS CMD...
    local name=$1 secs=$2; shift 2
    timeout -k 5 "$secs" "$@" 2>&1 | grep -v -e "^PyCUDA WARNING" -e "^cuMem.*failed" | tail -n "${TAIL:-40}"
    echo "=== $name rc=${PIPESTATUS[0]}"   # the command's status (124: ran out of time), not the filter's
}
# smoke tests first (each compiles every kernel variant, ~50 s with a cold cache): one shape per TMA variant,
# the prefill attention kernel, one small fp16 generate() with synchronous launches (a faulting kernel is
# named in the traceback)
if [ "${SMOKE:-1}" = 1 ]; then   # SMOKE=0: straight to the full tests
TAIL=8 stage "tma smoke" 180 python3 -m pytest tests/test_cuda_kernels.py -q -k "test_gemm_f16 and tma and shape3 and 0-True"
TAIL=8 stage "prefill attention" 180 python3 -m pytest tests/test_cuda_kernels.py -q -k "attention_prefill or prefill_attention"
TAIL=12 stage "generate, blocking launches" 120 env CUDA_LAUNCH_BLOCKING=1 python3 -c "
import numpy as np, sys; sys.path.insert(0, 'benchmarks')
from kernels_bench import w1_chunk
from gpt2job.backends.base import compute
from gpt2job.backends.cuda.backend import CudaBackend
from gpt2job.model.config import PRESETS
from gpt2job.model.weights import random_params
from gpt2job.settings import GenerationSettings
be = CudaBackend(random_params(PRESETS['gpt2'], 0), GenerationSettings(max_new_tokens=4, ignore_eos=True), dtype='float16')
c = compute(be, w1_chunk(512)); print('generate ok', c.tokens[:8]); be.close()"
fi
stage tests ${T_TESTS:-420} python3 -m pytest tests/test_cuda_kernels.py -q --maxfail=30 "$@"
W2=""
[ "${CHECK_W2:-0}" = 1 ] && W2=--w2
TAIL=400 stage bench ${T_BENCH:-420} python3 benchmarks/kernels_bench.py --e2e --profile $W2 ${BENCH_ARGS:-}
