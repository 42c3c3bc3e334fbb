#!/bin/bash
# The checks of the per-row settings / stops / repetition penalty work on a GPU machine, in one call; a short table
# last. Run from an archived tree beside the old one (see RESULTS.md):
#   source .device/on-device.sh && bash benchmarks/features_gpu.sh
# Stages (each time-boxed, each in its own processes; logs under $OUT/logs):
#   tests     the GPU tests of the new kernels and paths, and the regression subset of the earlier GPU tests
#   vs-hf     benchmarks/features_check.py: our cuda fp32 backend against transformers fp32 generate (GPT-2 124M
#             shapes, seeded weights) on each feature; JSON lines to $OUT/features.jsonl
#   score     benchmarks/score_check.py --backend cuda: `score` jobs against transformers' log_softmax (fp32)
#   ab        benchmarks/ab_trees.py --features against $OLD: W1/W2 speed and tokens with none of the options (the
#             >= 97% check), and the mixed-settings workload against W2 fp16 (>= 85%)
#   profile   the per-kernel profile of one 546-prompt W1 chunk, fp16 (the small-chunk question of issue 14)
#   sampling  benchmarks/sampling_bench.py: device time of token selection per settings case ($SAMPLING_ROWS rows,
#             1,024), in $OLD first as stage sampling-old when SAMPLING_OLD=1
#   step      benchmarks/decode_step_bench.py: one decode step replayed as a graph, per configuration ($STEP_CONFIGS,
#             default picks; $STEP_ROWS, $STEP_CTX)
#   mix       benchmarks/mix_breakdown.py: the mixed-settings workload with one setting taken away at a time
#   mixprof   benchmarks/kernels_bench.py --mix: the mixed workload's chunk in-process, device time per kernel kind and
#             per decode-step size, against W2's prompts with 128 new tokens
#   attn      benchmarks/attention_bench.py in the tree ATTN_TREE (default .): decode attention against its bytes
#   small     benchmarks/small_chunks.py: W3 by chunk size, ragged prompts in 512-prompt chunks (issue 14), busy %
#   load      benchmarks/load_bench.py: time to ready with GPT-2 XL shapes (float32 safetensors, float16), against $OLD
#   products  benchmarks/decode_products.py: decode-sized products, every tile variant against cuBLAS (GPU time)
#   master    benchmarks/master_scale.py (15 and 63 simulated workers, with text) and store_costs.py on this
#             machine's cores (the master's ceiling; issue 15's >= 1M rows/s)
#   writer    benchmarks/writer_ab.py: master_scale.py in $OLD and in this tree in turn (the output writer's rows/s)
#   scale     benchmarks/reliability.py --scale: 10M W1-like rows through mpirun, a master and 15 synthetic workers
#             (clean, killed at half and resumed, full disk), on this machine's cores
# SMALL_FLAGS: small_chunks.py --flags (more job flags for every case, e.g. sampling).
# Knobs: STAGES (tests,vs-hf,score,ab,profile; sampling, step, mix, mixprof, attn, small, load, products, master,
# writer, scale only when named), OLD (../.old), REPEATS (2), ATTN_TREE, TESTS_K (a pytest -k expression), AB_ARGS
# (--features; empty: the A/B cases only), T_<STAGE> (seconds), SMALL_CONFIGS, SMALL_SIZES (small_chunks.py
# --configs, --sizes), PRODUCTS_ARGS (decode_products.py's), PROFILE_PROMPTS (546), WRITER_ARGS (writer_ab.py's:
# "--old . --new-layout flat" compares the output layouts), SCALE_LAYOUT (vlen; flat), SCALE_CLEAN_RUNS (1).
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT/logs"
STAGES=${STAGES:-tests,vs-hf,score,ab,profile}
OLD=${OLD:-../.old}
REPEATS=${REPEATS:-2}
declare -A RC
has() { case ",$STAGES," in *",$1,"*) return 0;; esac; return 1; }
stage() {   # stage NAME SECONDS CMD...
    local name=$1 secs=$2; shift 2
    local t=$(date +%s)
    echo "=== $name (limit ${secs}s) $(date +%T)"
    timeout -k 10 "$secs" "$@" > "$OUT/logs/$name.log" 2>&1
    RC[$name]=$?
    grep -v -e "^PyCUDA WARNING" -e '^Loading weights' "$OUT/logs/$name.log" | tail -n "${TAIL:-12}"
    echo "=== $name rc=${RC[$name]} in $(( $(date +%s) - t ))s"
}
if has tests; then
    TAIL=25 stage tests ${T_TESTS:-300} python3 -m pytest -q -x --maxfail=10 tests/test_cuda_sampling.py \
        tests/test_cuda_kernels.py tests/test_cuda_faults.py \
        -k "${TESTS_K:-sampling or row or stop or penalty or seen or full_sequences or rows_are_the_same or last_logits or test_cuda_faults}"
fi
if has vs-hf; then
    TAIL=20 stage vs-hf ${T_HF:-240} python3 benchmarks/features_check.py --backend cuda --results "$OUT/features.jsonl" \
        ${HF_ARGS:-}
fi
if has score; then
    TAIL=12 stage score ${T_SCORE:-150} python3 benchmarks/score_check.py --backend cuda
fi
if has ab; then
    TAIL=16 stage ab ${T_AB:-420} python3 benchmarks/ab_trees.py --old "$OLD" --new . --repeats "$REPEATS" ${AB_ARGS---features} \
        --out "$OUT"
fi
if has profile; then
    TAIL=30 stage profile ${T_PROF:-150} python3 benchmarks/kernels_bench.py --no-kernels --profile \
        --profile-dtypes float16 --profile-prompts ${PROFILE_PROMPTS:-546}
fi
if has sampling; then
    if [ "${SAMPLING_OLD:-0}" = 1 ]; then
        TAIL=20 stage sampling-old ${T_SAMPLING:-150} bash -c "cd '$OLD' && python3 benchmarks/sampling_bench.py \
            --rows ${SAMPLING_ROWS:-1024} --out '$OUT/sampling-old'"
    fi
    TAIL=20 stage sampling ${T_SAMPLING:-150} python3 benchmarks/sampling_bench.py --rows ${SAMPLING_ROWS:-1024} --out "$OUT"
fi
if has step; then
    TAIL=20 stage step ${T_STEP:-200} python3 benchmarks/decode_step_bench.py --configs ${STEP_CONFIGS:-picks} \
        --rows ${STEP_ROWS:-137,546,1024,2048} --ctx ${STEP_CTX:-24,400} --out "$OUT"
fi
if has mix; then
    TAIL=8 stage mix ${T_MIX:-300} python3 benchmarks/mix_breakdown.py --repeats "$REPEATS" --out "$OUT"
fi
if has mixprof; then
    TAIL=70 stage mixprof ${T_MIXPROF:-300} python3 benchmarks/kernels_bench.py --no-kernels --mix --reps "$REPEATS"
fi
if has attn; then
    TAIL=12 stage attn ${T_ATTN:-200} bash -c "cd ${ATTN_TREE:-.} && python3 benchmarks/attention_bench.py --out '$OUT'"
fi
if has small; then
    TAIL=10 stage small ${T_SMALL:-400} python3 benchmarks/small_chunks.py --repeats "$REPEATS" --out "$OUT" \
        ${SMALL_CONFIGS:+--configs "$SMALL_CONFIGS"} ${SMALL_SIZES:+--sizes "$SMALL_SIZES"} ${SMALL_FLAGS:+--flags "$SMALL_FLAGS"}
fi
if has load; then
    TAIL=8 stage load ${T_LOAD:-300} python3 benchmarks/load_bench.py --old "$OLD" --repeats "$REPEATS" --out "$OUT"
fi
if has products; then
    TAIL=40 stage products ${T_PRODUCTS:-240} python3 benchmarks/decode_products.py --out "$OUT" ${PRODUCTS_ARGS:-}
fi
if has master; then
    VOCAB=${GPT2_VOCAB_DIR:-$PWD/.device/gpt2-vocab}
    TAIL=6 stage master ${T_MASTER:-300} python3 benchmarks/master_scale.py --workers 15,63 --rows ${MASTER_ROWS:-2000000} \
        --vocab-dir "$VOCAB" --json "$OUT/master_scale.jsonl"
    TAIL=20 stage store ${T_STORE:-120} env GPT2_VOCAB_DIR="$VOCAB" python3 benchmarks/store_costs.py --json "$OUT/store_costs.jsonl"
fi
if has writer; then
    VOCAB=${GPT2_VOCAB_DIR:-$PWD/.device/gpt2-vocab}
    TAIL=12 stage writer ${T_WRITER:-400} python3 benchmarks/writer_ab.py --old "$OLD" --repeats "$REPEATS" \
        --rows ${MASTER_ROWS:-2000000} --vocab-dir "$VOCAB" --out "$OUT" ${WRITER_ARGS:-}
fi
if has scale; then
    VOCAB=${GPT2_VOCAB_DIR:-$PWD/.device/gpt2-vocab}
    TAIL=30 stage scale ${T_SCALE:-300} env GPT2_VOCAB_DIR="$VOCAB" python3 benchmarks/reliability.py --kills 0 --fuzz 0 \
        --scale ${SCALE_ROWS:-10000000} --scale-ranks ${SCALE_RANKS:-16} --scale-layout ${SCALE_LAYOUT:-vlen} --scale-clean-runs ${SCALE_CLEAN_RUNS:-1} \
        --results "$OUT/scale.jsonl"
fi
echo
echo "stage      rc"
for s in tests vs-hf score ab profile sampling-old sampling step mix mixprof attn small load products master store writer \
    scale; do
    if [ -n "${RC[$s]}" ]; then printf '%-10s %s\n' "$s" "${RC[$s]}"; fi
done
