#!/bin/bash
# Issue 14's rows on one tree: every figure the median of $REPEATS runs, the baselines in the same call; prints the
# issue's table last (benchmarks/issue14_table.py over $OUT/*.jsonl).
#
#   source .device/on-device.sh && STAGES=a bash benchmarks/issue14.sh     # ~5 min on one H200
#   source .device/on-device.sh && STAGES=b bash benchmarks/issue14.sh     # ~4 min (+ ~2 with COLD=1)
#   STAGES=a,b COLD=1 bash benchmarks/issue14.sh                           # all of it where a call may take longer
#
# Stage a: W1 fp16/fp32 and W2 fp16 with every prompt and prefill token computed (GPT2JOB_PREFIX_SHARE=0,
#          --no-dedup) and W1 with the defaults, $REPEATS runs each (run_workloads.py); transformers and the compact
#          engine (baselines.py via device_all.sh, with its W2 $BASE_W2 more times alone: it spreads 2x run to run);
#          with 2 GPUs: W3 on 1 and 2 GPUs.
# Stage b: W3 by chunk size, ragged prompts in small chunks, W1 as one chunk (small_chunks.py, traced; job_ends.py);
#          with 2 GPUs: ragged prompts on 2 GPUs against 1 (gpus_ragged.py); GPT-2 XL time to ready (load_bench.py);
#          the correctness check (check_vs_transformers.py); COLD=1: cold start of 2 and 16 ranks (cold_start.py).
# $OUT (default ./bench-out/issue14) collects the JSON lines that the table reads; stages may run in separate calls
# into the same $OUT on the same machine kind (a stage run again replaces its own). MODEL (default random:gpt2) and
# SEED_WORKLOAD (W1/W3's prompts) reach every step but the GPT-2 XL load (random XL shapes by design). Work files
# stay under /tmp (they derive from the seed workload).
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
REPO=$PWD
OUT=${OUT:-$REPO/bench-out/issue14}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
W=${BENCH_DIR:-/tmp/gpt2job-issue14}
mkdir -p "$W"
STAGES=${STAGES:-a,b}
REPEATS=${REPEATS:-3}
BASE_W2=${BASE_W2:-2}
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
T0=$(date +%s)
has() { case ",$STAGES," in *",$1,"*) return 0;; esac; return 1; }
step() { echo "=== $1 $(( $(date +%s) - T0 ))s"; }
# device_all.sh's parts into $W/NAME, its JSON lines appended to $OUT/FILE
da() {
    local name=$1 file=$2; shift 2
    rm -rf "${W:?}/$name"   # (its results file is appended to: a second call on this machine counted the first's too)
    env "$@" OUT="$W/$name" TAIL=4 bash benchmarks/device_all.sh > "$W/$name.log" 2>&1
    echo "$name rc=$?"; cat "$W/$name/results.jsonl" >> "$OUT/$file"
}

MODEL=${MODEL:-random:gpt2}   # the weights and the W1/W3 prompts of every step (device_all.sh reads both too)
SEED=(); [ -n "${SEED_WORKLOAD:-}" ] && SEED=(--seed-workload "$SEED_WORKLOAD")
export MODEL
if has a; then   # a stage run again replaces its own figures in $OUT (the other stage's stay)
    rm -f "$OUT"/{lfl,defaults,baselines,w3}.jsonl
    step "stage a: W1 / W2, every prompt and prefill token computed, $REPEATS runs"
    for i in $(seq "$REPEATS"); do da "lfl-$i" lfl.jsonl GPT2JOB_PREFIX_SHARE=0 W1_DEDUP=off PARTS=w1,w2; done
    step "W1 with the defaults, $REPEATS runs"
    for i in $(seq "$REPEATS"); do da "defaults-$i" defaults.jsonl W1_DEDUP=on PARTS=w1; done
    step "baselines"
    da baselines baselines.jsonl PARTS=baselines
    for i in $(seq "$BASE_W2"); do da "compact-w2-$i" baselines.jsonl PARTS=baselines BASELINES=compact:w2:float16; done
    if [ "$NGPU" -ge 2 ]; then
        step "W3 on 1 and 2 GPUs"
        da w3 w3.jsonl PARTS=w3 GPUS="1 2" W3_DTYPES=float16
    fi
fi
if has b; then
    rm -f "$OUT"/{small_chunks,gpus_ragged,load,check,cold_start}.jsonl "$OUT/job_ends.txt"
    rm -rf "${W:?}"/{sc,gr,load,cold}
    step "stage b: chunk sizes, ragged prompts, W1 as one chunk (traced)"
    timeout 400 python3 benchmarks/small_chunks.py --repeats "$REPEATS" --w1 --keep-logs --model "$MODEL" "${SEED[@]}" \
        --configs "cur=$REPO@GPT2JOB_TRACE=1" --out "$W/sc" > "$W/sc.log" 2>&1
    echo "small_chunks rc=$?"; cat "$W/sc/small_chunks.jsonl" >> "$OUT/small_chunks.jsonl"
    python3 benchmarks/job_ends.py --medians "$W"/sc/logs/*.log > "$OUT/job_ends.txt" 2>&1
    if [ "$NGPU" -ge 2 ]; then
        step "ragged prompts, 2 GPUs against 1"
        timeout 400 python3 benchmarks/gpus_ragged.py --repeats "$REPEATS" --model "$MODEL" --out "$W/gr" \
            > "$W/gr.log" 2>&1
        echo "gpus_ragged rc=$?"; cat "$W/gr/gpus_ragged.jsonl" >> "$OUT/gpus_ragged.jsonl"
    fi
    step "GPT-2 XL time to ready"
    timeout 300 python3 benchmarks/load_bench.py --size gpt2-xl --repeats "$REPEATS" --out "$W/load" \
        > "$W/load.log" 2>&1
    echo "load_bench rc=$?"; cat "$W/load/load.jsonl" >> "$OUT/load.jsonl"
    step "correctness check"
    da check check.jsonl PARTS=check
    if [ "${COLD:-0}" = 1 ]; then
        step "cold start"
        timeout 500 python3 benchmarks/cold_start.py --ranks 2,16 --repeats 1 --model "$MODEL" "${SEED[@]}" \
            --out "$W/cold" > "$W/cold.log" 2>&1
        echo "cold_start rc=$?"; cat "$W/cold/cold_start.jsonl" >> "$OUT/cold_start.jsonl"
    fi
fi
step "done: $OUT"
git log -1 --format='tree %h %s' 2>/dev/null | cut -c1-100
python3 benchmarks/issue14_table.py "$OUT"
