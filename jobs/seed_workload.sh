#!/usr/bin/env bash
# The old system's benchmark: 8,192 prompts x 16 tokens, 8 new tokens, greedy, GPT-2 124M.
#   MODEL=/path/to/gpt2 DTYPE=float32 NP=5 jobs/seed_workload.sh [OUT.h5]
# With the real weights (MODEL = a Hugging Face gpt2 folder or the old flat .bin), the result is checked
# against answer.bin (0.05% tolerance, as the old system did). Default MODEL=random:gpt2 just runs.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
seed="${SEED_DIR:-$here/../shared/seed-workload}"
out="${1:-/tmp/seed_out.h5}"
work="$(mktemp -d)"
python3 -m gpt2job prompts "$seed/input.bin" "$work/in.h5" --tokens-per-row 16
validate=()
if [ "${MODEL:-random:gpt2}" != "random:gpt2" ] && [ -f "$seed/answer.bin" ]; then
    validate=(--validate "$seed/answer.bin")
fi
"$here/run_inference.sh" "$work/in.h5" "$out" --model "${MODEL:-random:gpt2}" --max-new-tokens 8 \
    --ignore-eos --dtype "${DTYPE:-float32}" --overwrite "${validate[@]}"
