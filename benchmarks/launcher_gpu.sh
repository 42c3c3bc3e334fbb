#!/bin/bash
# run_inference.sh as a user runs it on a GPU machine, started by hand (it starts mpirun itself), a table last:
#   1. W1 fp16 with the defaults (one worker per GPU plus the master);
#   2. the same with NP=16 --share-gpus (15 workers): tokens identical to 1;
#   3. W3 (65,536 prompts, --no-dedup) with 64 new tokens each, SIGTERM to the launcher once a progress line counts
#      rows done and rows left (exit 143 and its one line), the same command again (resumes the kept rows), and the
#      job uninterrupted: tokens identical. (One worker computes the chunks it holds as one batch, up to its efficient
#      size: a job no bigger than that, W2 for one, completes every row at its last step, and a stop keeps none.)
#   3d. the same with SIGUSR1 in place of SIGTERM: exit 5, the rows of the chunks out kept (none lost), the same command
#      resumes, tokens identical to the uninterrupted job's.
#   3f. the same with the worker rank killed (kill -9): mpirun's banner as one line, the same command resumes, tokens
#      identical to the uninterrupted job's.
#   4. export and show of the resumed output.
#   source .device/on-device.sh && bash benchmarks/launcher_gpu.sh          # ~2 min on one GPU, kernels cached
# Work files under $BENCH_DIR (default /tmp/gpt2job-launcher: they derive from the seed workload; a folder under /tmp
# is emptied first). A dry run on a CPU (~3 min on 2 cores):
#   FLAGS="--backend numpy --model random:n_layer=1,n_head=2,n_embd=32" WL_ARGS="--n-w1 256 --w3-repeat 4" \
#       bash benchmarks/launcher_gpu.sh
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
W=${BENCH_DIR:-/tmp/gpt2job-launcher}
case "$W" in /tmp/?*) rm -rf "$W";; *) [ ! -e "$W" ] || { echo "BENCH_DIR=$W exists and is not under /tmp"; exit 2; };; esac
mkdir -p "$W"
python3 benchmarks/workloads.py "$W" --which w1,w3 $WL_ARGS > "$W/workloads.log" 2>&1 || { tail -3 "$W/workloads.log"; exit 1; }
: > "$W/table"
row() { printf '| %s | %s |\n' "$1" "$2" >> "$W/table"; }
tps() { grep -o 'throughput [0-9,]* generated tokens/s' "$1" | head -1; }
same() {   # same NAME_A NAME_B: do the two outputs hold the same tokens in every row?
    python3 - "$W/$1.h5" "$W/$2.h5" <<'PY'
import sys, h5py
sys.path.insert(0, "benchmarks")
from bench_common import same_tokens, tokens_of
a, b = sys.argv[1:3]
done = [int(h5py.File(p, "r")["done"][()].sum()) for p in (a, b)]
print(f"{same_tokens(a, b)[1]} of {len(tokens_of(a))} rows differ; done {done[0]} / {done[1]}")
PY
}
read -r -a F16 <<< "${FLAGS:---backend cuda --dtype float16}"   # FLAGS: see the dry run above

echo "=== 1. W1, NP unset"
./run_inference.sh "$W/w1.h5" "$W/a.h5" "${F16[@]}" --max-new-tokens 8 > "$W/a.log" 2>&1
rc=$?; tail -n 4 "$W/a.log"; row "1. W1, NP unset" "rc=$rc; $(tps "$W/a.log"); $(grep -o '[0-9]* workers\? ([0-9]* ranks)' "$W/a.log" | head -1)"

echo "=== 2. W1, NP=16 --share-gpus"
NP=16 ./run_inference.sh "$W/w1.h5" "$W/b.h5" "${F16[@]}" --max-new-tokens 8 --share-gpus > "$W/b.log" 2>&1
rc=$?; tail -n 4 "$W/b.log"; row "2. W1, NP=16 --share-gpus" "rc=$rc; $(tps "$W/b.log"); $(grep -o '[0-9]* workers ready' "$W/b.log" | head -1); against 1: $(same a b)"

echo "=== 3. W3 with 64 new tokens, SIGTERM mid-job, the same command again, and uninterrupted"
W3=("$W/w3.h5" "$W/c.h5" "${F16[@]}" --max-new-tokens 64 --ignore-eos --no-dedup --progress-interval 0.1)
midway() {   # LOG: until a progress line (every 0.1 s here) counts rows kept and rows left, at most 120 s
    for _ in $(seq 2400); do
        grep -oE '^progress: [0-9,]+/[0-9,]+' "$1" | tr -d , | tail -n 1 | awk -F'[ /]' '$2 > 0 && $2 < $3 {f = 1} END {exit !f}' \
            && return
        sleep 0.05
    done
}
./run_inference.sh "${W3[@]}" > "$W/c.log" 2>&1 &
pid=$!
midway "$W/c.log"
kill -TERM "$pid"; wait "$pid"; rc=$?
tail -n 3 "$W/c.log"
row "3a. W3, SIGTERM" "rc=$rc (143 expected); at $(grep -oE '^progress: [0-9,/]+' "$W/c.log" | tail -1); $(grep 'run_inference.sh: ' "$W/c.log" | tail -1 | cut -c1-150)"
./run_inference.sh "${W3[@]}" > "$W/c2.log" 2>&1
rc=$?; tail -n 4 "$W/c2.log"
row "3b. the same command again" "rc=$rc; $(grep -oE 'resuming .*|already complete.*|starting: [0-9,]+ prompts' "$W/c2.log" | head -n 1 | cut -c1-90)"
./run_inference.sh "$W/w3.h5" "$W/d.h5" "${F16[@]}" --max-new-tokens 64 --ignore-eos --no-dedup > "$W/d.log" 2>&1
rc=$?; row "3c. W3 uninterrupted" "rc=$rc; $(tps "$W/d.log"); resumed against it: $(same c d)"

started_midway() {   # NAME: W3 into $W/NAME.h5 in the background ($pid), until midway ($at: the progress then)
    ./run_inference.sh "$W/w3.h5" "$W/$1.h5" "${W3[@]:2}" > "$W/$1.log" 2>&1 &
    pid=$!
    midway "$W/$1.log"
    at=$(grep -oE '^progress: [0-9,/]+' "$W/$1.log" | tail -1)
}
resumed() {   # NAME STEP: the same command again; resumed against the uninterrupted job
    ./run_inference.sh "$W/w3.h5" "$W/$1.h5" "${W3[@]:2}" > "$W/${1}2.log" 2>&1
    local rc=$?
    row "$2. the same command again" "rc=$rc; $(grep -oE 'resuming .*' "$W/${1}2.log" | head -n 1 | cut -c1-90); against 3c: $(same "$1" d)"
}

echo "=== 3d. W3 again, SIGUSR1 mid-job (the chunks out finished and kept), the same command again"
started_midway u
kill -USR1 "$pid"; wait "$pid"; rc=$?
tail -n 3 "$W/u.log"
row "3d. W3, SIGUSR1" "rc=$rc (5 expected); at $at; $(grep -o 'stopped (SIGUSR1).*' "$W/u.log" | tail -1 | cut -c1-150); $(grep -c '^gpt2job:   rank ' "$W/u.log") worker summary line(s)"
resumed u 3e

echo "=== 3f. W3 again, the worker rank killed (kill -9) mid-job, the same command again"
started_midway k
for p in $(pgrep -f -- "-m gpt2job run .*/k.h5"); do   # rank 1: a worker
    tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx OMPI_COMM_WORLD_RANK=1 && kill -9 "$p"
done
wait "$pid"; rc=$?
tail -n 3 "$W/k.log"
row "3f. W3, worker killed" "rc=$rc; at $at; $(grep -c -e '^------' "$W/k.log") banner line(s); $(grep 'run_inference.sh: mpirun: ' "$W/k.log" | tail -1 | cut -c1-150)"
resumed k 3g

echo "=== 4. export and show"
python3 -m gpt2job export "$W/c.h5" "$W/c.jsonl" > "$W/e.log" 2>&1
rc=$?; row "4. export" "rc=$rc; $(tail -n 1 "$W/e.log" | cut -c1-80); $(wc -l < "$W/c.jsonl") lines"
python3 -m gpt2job show "$W/c.h5" --limit 1 > "$W/s.log" 2>&1
rc=$?; row "4. show --limit 1" "rc=$rc; $(wc -l < "$W/s.log") lines"
echo
echo "| step | result |"
echo "| --- | --- |"
cat "$W/table"
