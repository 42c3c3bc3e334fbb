#!/bin/bash
# On the GPU machine: Nsight Compute's stall samples per CUDA source line of one kernel, in a copy of this tree whose
# kernels are compiled with -lineinfo (the shipped build has none). Prints the lines with the most samples; the
# whole source page (CSV) and the details page go to $OUT.
#   source .device/on-device.sh && OUT=$OUT/ncu bash benchmarks/ncu_source.sh LABEL KERNEL-REGEX python3 SCRIPT ARGS...
# e.g. ... ncu_source.sh sampling sample_rows_params python3 benchmarks/sampling_bench.py --rows 2048 --repeats 1 \
#          --only "params w2mix mix"
set -u
lab=$1 re=$2; shift 2
OUT=${OUT:-/tmp/ncu}; mkdir -p "$OUT"
src=$(cd "$(dirname "$0")/.." && pwd)
tree=/tmp/ncu-lineinfo-tree
rm -rf "$tree" && mkdir -p "$tree" && (cd "$src" && tar --exclude=./.device --exclude='./.[A-Z]' -cf - .) | tar -xf - -C "$tree"
sed -i 's/("-std=c++17", \*defs)/("-std=c++17", "-lineinfo", *defs)/' "$tree/gpt2job/backends/cuda/kernels.py"
grep -q '"-lineinfo"' "$tree/gpt2job/backends/cuda/kernels.py" || { echo "ncu_source: could not add -lineinfo"; exit 1; }
export GPT2JOB_PYCUDA_CACHE=/tmp/ncu-lineinfo-cache
cd "$tree" || exit 1
timeout 240 ncu --clock-control none --import-source yes -k "regex:$re" --launch-skip 1 --launch-count 1 \
    --section SourceCounters --section WarpStateStats --section SpeedOfLight --section InstructionStats \
    -f -o "$OUT/$lab" "$@" > "$OUT/$lab-run.txt" 2>&1
echo "=== ncu $lab rc=$? ($(tail -c 300 "$OUT/$lab-run.txt" | tr '\n' ' ' | cut -c1-200))"
ncu -i "$OUT/$lab.ncu-rep" --page details > "$OUT/$lab-details.txt" 2>&1
grep -E "Duration|Issue Slots Busy|Warp Cycles Per Issued|Executed Instructions  " "$OUT/$lab-details.txt" | head -6
ncu -i "$OUT/$lab.ncu-rep" --page source --csv --print-source cuda > "$OUT/$lab-source-cuda.csv" 2>&1
ncu -i "$OUT/$lab.ncu-rep" --page source --csv --print-source sass > "$OUT/$lab-source-sass.csv" 2>&1
python3 - "$OUT/$lab-source-cuda.csv" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1], errors="replace")))
hdr = next((i for i, r in enumerate(rows) if any("Sampling" in c for c in r)), None)
if hdr is None:
    print("no source table:", " | ".join(" ".join(r) for r in rows[:3])[:300]); sys.exit()
h = rows[hdr]
col = next(i for i, c in enumerate(h) if "Warp Stall Sampling (All" in c)
ins = next((i for i, c in enumerate(h) if c.startswith("Instructions Executed")), None)
body = [r for r in rows[hdr + 1:] if len(r) > col and r[col].replace(",", "").replace(".", "").isdigit()]
tot = sum(float(r[col].replace(",", "")) for r in body) or 1
print(f"{'samples %':>9} {'inst':>12}  line")
for r in sorted(body, key=lambda r: -float(r[col].replace(",", "")))[:30]:
    print(f"{100 * float(r[col].replace(',', '')) / tot:9.1f} {r[ins] if ins is not None else '':>12}  {r[0][:6]} {r[1].strip()[:110]}")
PY
