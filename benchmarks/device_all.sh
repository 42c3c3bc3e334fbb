#!/bin/bash
# Every benchmark deliverable of the performance issue in ONE call on a GPU machine; prints a short table last.
#
#   source .device/on-device.sh && bash benchmarks/device_all.sh
#   PARTS=w1,w2 bash benchmarks/device_all.sh                      # only some parts
#   GPUS="1 2 3 4" bash benchmarks/device_all.sh                   # + W3 scaling over 1..4 GPUs
#   TINY=1 bash benchmarks/device_all.sh                           # CPU smoke test: tiny model, numpy backend
#
# Steps: (a) export the random:gpt2 weights as an HF dir ($BENCH_DIR/hf-gpt2), so our engine, transformers and
# the compact engine all read the same file; (b) write the workloads ($BENCH_DIR/workloads, from the seed
# workload when present); warm the PyCUDA compile cache (a tiny job per dtype); then the PARTS:
#   check      check_vs_transformers.py: (i) W1 fp32 tokens vs transformers fp32 (bar 99.95%), (ii) fp16 vs fp32
#              logits, (iii) tiny checkpoints cuda = numpy
#   w1         our engine, W1, fp16 + fp32, 1 GPU (mpirun -np 2); with repeated prompts computed once (the
#              default) and with --no-dedup (every prompt computed, as the baselines do)
#   w2         our engine, W2, fp16, 1 GPU
#   w3         our engine, W3, $W3_DTYPES, each GPU count in $GPUS (added by default when GPUS has a count > 1),
#              --no-dedup (W3 is W1 eight times over: computing each distinct prompt once would not measure scaling)
#   baselines  transformers + compact engine: W1 fp16/fp32, W2 fp16 (both in length-sorted batches; transformers W2
#              last)
# (f) results: $OUT/results.jsonl (one JSON line per run/check), $OUT/bench.png, logs in $OUT/logs; $OUT is
# ./bench-out when unset. Output HDF5 files and token files stay under $BENCH_DIR (/tmp): they derive from the
# seed workload. Each part is time-boxed (T_CHECK, T_W1, ... seconds). About 5-6 minutes on one H100.
#
# Knobs: PARTS, GPUS, W1_DTYPES (float16,float32), W2_DTYPES (float16), W3_DTYPES (float16,float32), W1_DEDUP (on,off),
# BASELINES (ENGINE:WORKLOAD:DTYPE list), MODEL (random:gpt2), BENCH_DIR (/tmp/gpt2job-bench), SEED_WORKLOAD.
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
OUT=${OUT:-$REPO/bench-out}
mkdir -p "$OUT/logs/jobs"
OUT=$(cd "$OUT" && pwd)
RES=$OUT/results.jsonl
BENCH_DIR=${BENCH_DIR:-/tmp/gpt2job-bench}
GPUS=${GPUS:-1}
MODEL=${MODEL:-random:gpt2}
BACKEND=cuda
LOGITS_BACKEND=cuda
W1_DTYPES=${W1_DTYPES:-float16,float32}
W2_DTYPES=${W2_DTYPES:-float16}
W3_DTYPES=${W3_DTYPES:-float16,float32}
W1_DEDUP=${W1_DEDUP:-on,off}   # W1 with repeated prompts computed once (the default) and with every prompt computed
BASELINES=${BASELINES:-compact:w1:float16,compact:w1:float32,transformers:w1:float16,transformers:w1:float32,compact:w2:float16,transformers:w2:float16}
WL_ARGS=()
BASE_ARGS=(--hf-sort-w2)   # transformers' W2 in length-sorted batches too (left padding wastes less), as the compact engine's
CHECK_ARGS=()
if [ "${TINY:-0}" = 1 ]; then      # CPU smoke test of the whole script
    MODEL='random:n_layer=2,n_head=2,n_embd=32,n_positions=1024,vocab_size=50257:1'
    BACKEND=numpy; LOGITS_BACKEND=reference
    W1_DTYPES=float32; W2_DTYPES=float32; W3_DTYPES=float32
    BASELINES=compact:w1:float16,compact:w1:float32,transformers:w1:float32,compact:w2:float32,transformers:w2:float32
    WL_ARGS=(--n-w1 32 --n-w2 8 --w2-min 4 --w2-max 24 --w3-repeat 2)
    BASE_ARGS+=(--hf-batch-w2 4 --compact-batch-w2 4)
    CHECK_ARGS=(--n-logit-prompts 16)
    BENCH_DIR=${BENCH_DIR}-tiny
fi
[ -n "${SEED_WORKLOAD:-}" ] && WL_ARGS+=(--seed-workload "$SEED_WORKLOAD")
KMAX=$(echo "$GPUS" | tr ', ' '\n\n' | sort -n | tail -1)
if [ -z "${PARTS:-}" ]; then
    PARTS=check,w1,w2,baselines
    [ "${KMAX:-1}" -gt 1 ] && PARTS=$PARTS,w3
fi
HF=$BENCH_DIR/hf-$(echo "$MODEL" | tr -c 'a-zA-Z0-9\n' '_')
WL=$BENCH_DIR/workloads
JOBS=$BENCH_DIR/out
TOK=$BENCH_DIR/tokens-${HF##*/hf-}   # per model: another MODEL's transformers tokens were read back as this one's
rm -f "$JOBS"/*.log "$BENCH_DIR"/check/*.log     # logs of earlier calls on this machine
RW=(python3 benchmarks/run_workloads.py --workloads-dir "$WL" --model "$HF" --backend "$BACKEND" --results "$RES"
    --out-dir "$JOBS" --no-warmup)
has() { case ",$PARTS," in *",$1,"*) return 0;; esac; return 1; }
T0=$(date +%s)
STATUS=()
# part NAME SECONDS CMD...: time-boxed, full output in $OUT/logs/NAME.log, the last lines on the console
part() {
    local name=$1 secs=$2; shift 2
    local t=$(date +%s)
    echo "=== $name (limit ${secs}s) $(date +%T)"
    timeout -k 15 "$secs" "$@" > "$OUT/logs/$name.log" 2>&1
    local rc=$?
    grep -v -e '^Loading weights' -e '^\[transformers\]' -e '^You may ignore' "$OUT/logs/$name.log" | tail -n "${TAIL:-14}"
    echo "=== $name: rc=$rc in $(( $(date +%s) - t ))s"
    STATUS+=("$name rc=$rc $(( $(date +%s) - t ))s")
}

{
    date -Is; nvidia-smi --query-gpu=index,name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1
    python3 -c "import sys, torch, transformers, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'numpy', numpy.__version__)" 2>&1
    git log -1 --oneline 2>/dev/null; git status --short 2>/dev/null | head -20
    echo "PARTS=$PARTS GPUS=$GPUS MODEL=$MODEL BACKEND=$BACKEND"
} > "$OUT/env.txt"
head -4 "$OUT/env.txt"

part prepare "${T_PREP:-180}" bash -c "python3 benchmarks/export_weights.py '$HF' --model '$MODEL' && python3 benchmarks/workloads.py '$WL' ${WL_ARGS[*]}"
part warmup "${T_WARM:-300}" python3 benchmarks/run_workloads.py --workloads-dir "$WL" --model "$HF" --backend "$BACKEND" \
    --results "$RES" --out-dir "$JOBS" --warmup-only --gpus "$(has w3 && echo "$KMAX" || echo 1)" \
    --dtype "$(echo "$W1_DTYPES,$W2_DTYPES$(has w3 && echo ",$W3_DTYPES")" | tr ',' '\n' | sort -u | paste -sd,)"
has check && part check "${T_CHECK:-300}" python3 benchmarks/check_vs_transformers.py --model "$HF" --workloads-dir "$WL" \
    --backend "$BACKEND" --logits-backend "$LOGITS_BACKEND" --hf-tokens "$TOK/transformers-w1-float32.i32" \
    --results "$RES" --out-dir "$BENCH_DIR/check" "${CHECK_ARGS[@]}"
has w1 && part w1 "${T_W1:-240}" "${RW[@]}" --workload w1 --dtype "$W1_DTYPES" --gpus 1 --dedup "$W1_DEDUP"
has w2 && part w2 "${T_W2:-240}" "${RW[@]}" --workload w2 --dtype "$W2_DTYPES" --gpus 1
has w3 && part w3 "${T_W3:-420}" "${RW[@]}" --workload w3 --dtype "$W3_DTYPES" --gpus "$GPUS" --dedup off
has baselines && part baselines "${T_BASE:-360}" python3 benchmarks/baselines.py --model "$HF" --workloads-dir "$WL" \
    --only "$BASELINES" --results "$RES" --tokens-dir "$TOK" "${BASE_ARGS[@]}"

cp "$JOBS"/*.log "$BENCH_DIR"/check/*.log "$OUT/logs/jobs/" 2>/dev/null
echo "=== parts: ${STATUS[*]}; total $(( $(date +%s) - T0 ))s"
python3 benchmarks/plot.py "$RES" --png "$OUT/bench.png" 2>&1 | tail -n 60
for s in "${STATUS[@]}"; do   # a part that failed fails the script (its callers printed rc=0 and an empty table)
    case "$s" in *" rc=0 "*) ;; *) exit 1;; esac
done
