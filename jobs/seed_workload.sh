#!/usr/bin/env bash
# The old system's benchmark: 8,192 prompts x 16 tokens, 8 new tokens, greedy, GPT-2 124M.
#   MODEL=/path/to/gpt2 DTYPE=float32 NP=5 SEED_DIR=/path/to/seed-workload jobs/seed_workload.sh [OUT.h5]
# SEED_DIR holds input.bin (and answer.bin); default ../shared/seed-workload beside this checkout. With real weights
# (MODEL = a Hugging Face gpt2 folder or the old flat .bin), the result is checked against answer.bin (0.05%
# tolerance, as the old system did). A random: MODEL (default random:gpt2) just runs.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
seed="${SEED_DIR:-$here/../shared/seed-workload}"
out="${1:-/tmp/seed_out.h5}"
model="${MODEL:-random:gpt2}"
if ! [ -f "$seed/input.bin" ]; then
    echo "seed_workload.sh: error: $seed/input.bin: no such file (fix: set SEED_DIR to the folder holding the seed" \
        "workload's input.bin)" >&2
    exit 2
fi
inp="$out.input.h5"   # beside the output, which records it (show and export read the prompts there)
python3 -m gpt2job prompts "$seed/input.bin" "$inp" --tokens-per-row 16 --overwrite
validate=()
case "$model" in
    random:*) ;;   # random weights: answer.bin holds the real model's tokens
    *) if [ -f "$seed/answer.bin" ]; then validate=(--validate "$seed/answer.bin"); fi ;;
esac
# A finished OUT is computed again (a benchmark: --overwrite); one a stopped run left (its journal) is resumed.
# exec: a signal to this script is run_inference.sh's, which passes it on
again=(--overwrite)
if [ -e "$out.journal" ]; then again=(); fi
exec "$here/run_inference.sh" "$inp" "$out" --model "$model" --max-new-tokens 8 \
    --ignore-eos --dtype "${DTYPE:-float32}" "${again[@]}" "${validate[@]}"
