#!/bin/bash
# A change to the shipped GPU path proven on the GPU machine: the GPU tests of what it touched, then the old tree
# against this one through the real pipeline (benchmarks/ab_trees.py: token-identical outputs, no speed loss), the
# A/B's table last. Prepare the old tree on your own machine and carry it:
#   git archive OLD | (mkdir -p .Y && tar -x -C .Y)
#   run(command="source .device/on-device.sh && STAGES=tests bash benchmarks/refactor_check.sh .Y", carry=[..., ".Y"])
#   run(command="source .device/on-device.sh && STAGES=ab bash benchmarks/refactor_check.sh .Y", ...)   (then shared)
# STAGES: tests (the CUDA backend's test files and those of score and logprobs, the long product sweeps aside), ab
# (W1 / W2 in fp16 and fp32, every prompt and prefill token computed, REPEATS runs each interleaved), shared (one run
# of each with shared prefixes on), quick (a subset of both in one call); each stage is time-boxed to fit one call.
# How long each stage took: benchmarks/RESULTS.md, "Session 57 on the GPU". CASES overrides the A/B's cases.
export PYTHONUNBUFFERED=1
OLD=${1:?usage: refactor_check.sh OLD_TREE}
cd "$(dirname "$0")/.." || exit 1
STAGES=${STAGES:-tests,ab}
REPEATS=${REPEATS:-3}
CASES=${CASES:-W1 fp16,W1 fp32,W2 fp16,W2 fp32}
OUT=${OUT:-bench-out/refactor}
mkdir -p "$OUT"
has() { case ",$STAGES," in *",$1,"*) return 0;; esac; return 1; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
git log --oneline -1 2>/dev/null
if has tests; then
    # (tests/test_cuda_compile.py needs nvcc, not a GPU: CI runs it)
    timeout -k 5 260 python3 -m pytest -q -x tests/test_cuda_host.py tests/test_cuda_oom.py tests/test_score.py \
        tests/test_logprobs.py tests/test_cuda_faults.py 2>&1 | tail -n 4
    echo "=== GPU host, memory, fault, score and logprobs tests rc=${PIPESTATUS[0]}"
    timeout -k 5 320 python3 -m pytest -q tests/test_cuda_kernels.py tests/test_cuda_sampling.py \
        -k "not test_gemm_f16 and not rows_are_the_same" 2>&1 | tail -n 4
    echo "=== kernel and selection tests (not the product sweeps) rc=${PIPESTATUS[0]}"
fi
if has quick; then   # one call's worth where device time is short: the tests of the seams, then one run a case
    seams="host or oom or score or take_rows or last_layer or shared or last_logits or graph or step or backend"
    timeout -k 5 240 python3 -m pytest -q -x tests/test_cuda_host.py tests/test_cuda_oom.py tests/test_score.py \
        tests/test_cuda_kernels.py tests/test_cuda_sampling.py \
        -k "not test_gemm_f16 and not rows_are_the_same and ($seams or logprob)" 2>&1 | tail -n 4
    echo "=== the seams' GPU tests rc=${PIPESTATUS[0]}"
    GPT2JOB_PREFIX_SHARE=0 timeout -k 5 300 python3 benchmarks/ab_trees.py --old "$OLD" --new . --repeats 1 \
        --cases "W1 fp16,W1 fp32,W2 fp16" --out "$OUT/quick" > "$OUT/quick.log" 2>&1
    echo "=== A/B, one run a case, every prompt and prefill token computed rc=$?"
    tail -n 12 "$OUT/quick.log"
fi
if has ab; then
    GPT2JOB_PREFIX_SHARE=0 timeout -k 5 480 python3 benchmarks/ab_trees.py --old "$OLD" --new . \
        --repeats "$REPEATS" --cases "$CASES" --out "$OUT/like-for-like" > "$OUT/like-for-like.log" 2>&1
    echo "=== A/B, every prompt and prefill token computed rc=$?"
    tail -n 14 "$OUT/like-for-like.log"
fi
if has shared; then
    timeout -k 5 300 python3 benchmarks/ab_trees.py --old "$OLD" --new . --repeats 1 --cases "$CASES" \
        --out "$OUT/shared" > "$OUT/shared.log" 2>&1
    echo "=== A/B, shared prefixes on (--no-dedup as above) rc=$?"
    tail -n 14 "$OUT/shared.log"
fi
