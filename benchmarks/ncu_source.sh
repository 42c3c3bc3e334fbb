#!/bin/bash
# On the GPU machine: Nsight Compute's stall samples per SASS instruction of one kernel, in a copy of this tree whose
# kernels are compiled with -lineinfo (the shipped build has none; pycuda compiles from a temporary file, so the
# report has no CUDA source page). Writes $OUT/LABEL-details.txt, $OUT/LABEL-stalls.txt (stall reasons, the
# instructions with the most samples, the hottest loop's SASS) and $OUT/LABEL-sass.tsv (every instruction: address,
# samples, executed, SASS) and prints the head of the stalls.
#   source .device/on-device.sh && OUT=$OUT/ncu bash benchmarks/ncu_source.sh LABEL KERNEL-REGEX python3 SCRIPT ARGS...
# Then, on any machine with nvcc: python3 benchmarks/ncu_lines.py LABEL-sass.tsv KERNEL (samples by source line).
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
rep=/tmp/ncu-$lab   # the report stays on the machine: $OUT takes few files
timeout 240 ncu --clock-control none -k "regex:$re" --launch-skip 1 --launch-count 1 \
    --section SourceCounters --section WarpStateStats --section SpeedOfLight --section InstructionStats \
    -f -o "$rep" "$@" > "$rep-run.txt" 2>&1
echo "=== ncu $lab rc=$? ($(tail -c 300 "$rep-run.txt" | tr '\n' ' ' | cut -c1-200))"
ncu -i "$rep.ncu-rep" --page details > "$OUT/$lab-details.txt" 2>&1
grep -E "Duration|Issue Slots Busy|Warp Cycles Per Issued|Executed Instructions  " "$OUT/$lab-details.txt" | head -6
ncu -i "$rep.ncu-rep" --page source --csv --print-source sass > "$rep-sass.csv" 2>&1
python3 - "$rep-sass.csv" "$OUT/$lab-sass.tsv" > "$OUT/$lab-stalls.txt" <<'PY'
import csv, sys
rows = list(csv.reader(open(sys.argv[1], errors="replace")))
hdr = next(i for i, r in enumerate(rows) if "Warp Stall Sampling (All Samples)" in r)
h, body = rows[hdr], rows[hdr + 1:]
ci, ie = h.index("Warp Stall Sampling (All Samples)"), h.index("Instructions Executed")
stall = [i for i, c in enumerate(h) if c.startswith("stall_") and "Not Issued" not in c]
f = lambda x: float(x.replace(",", "")) if x.replace(",", "").replace(".", "").isdigit() else 0.0  # noqa: E731
tot = sum(f(r[ci]) for r in body) or 1
print(f"stall samples by reason (% of {tot:.0f}):")
for k, v in sorted(((h[i], sum(f(r[i]) for r in body)) for i in stall), key=lambda x: -x[1])[:10]:
    print(f"  {k:28s} {100 * v / tot:5.1f}")
print("instructions with the most samples: % of samples, executed, SASS")
for r in sorted(body, key=lambda r: -f(r[ci]))[:30]:
    print(f"  {100 * f(r[ci]) / tot:5.1f} {f(r[ie]):>12,.0f}  {r[1][:90]}")
with open(sys.argv[2], "w") as out:   # every instruction: the SASS address, samples, executed, text (to map
    for r in body:                    # onto source lines of a local `nvcc -lineinfo` build with nvdisasm -g)
        out.write(f"{r[0]}\t{f(r[ci]):.0f}\t{f(r[ie]):.0f}\t{r[1]}\n")
hot = max(f(r[ie]) for r in body) / 2
print(f"the hottest loop (instructions executed >= {hot:,.0f}): executed, samples, SASS")
for r in body:
    if f(r[ie]) >= hot:
        print(f"  {f(r[ie]):>12,.0f} {f(r[ci]):>6,.0f}  {r[1][:90]}")
PY
head -14 "$OUT/$lab-stalls.txt"
