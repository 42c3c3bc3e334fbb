#!/bin/bash
# On the GPU machine: each kernel's GPU time in one decode step (137 / 546 / 2,048 rows) under Nsight Compute, the
# graph-replayed step times beside them, then the stall profile of the mixed workload's token selection.
#   source .device/on-device.sh && OUT=$OUT/ncu bash benchmarks/ncu_step.sh
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ncu}; mkdir -p "$OUT"
CASES=${CASES:-"137:24 546:24 2048:400"}
python3 benchmarks/decode_step_bench.py --configs picks --rows 137,546,2048 --ctx 24,400 --reps 30 --out "$OUT" 2>&1 | grep -v "^$"
for c in $CASES; do
    r=${c%%:*}; x=${c##*:}
    timeout 240 ncu --csv --metrics gpu__time_duration.sum --cache-control none --clock-control none \
        python3 benchmarks/decode_step_bench.py --configs picks --rows "$r" --ctx "$x" --reps 1 --out /tmp/ncu-x \
        > "$OUT/step-$r-$x.csv" 2> "$OUT/step-$r-$x.err"
    echo "ncu rc=$?"
    python3 benchmarks/ncu_step.py "$OUT/step-$r-$x.csv" --steps 5 --label "$r rows ctx $x" > "$OUT/step-$r-$x.txt"
    cat "$OUT/step-$r-$x.txt" >> "$OUT/ncu_step.txt"
    head -30 "$OUT/step-$r-$x.txt"
done
SECT="--section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section InstructionStats --section MemoryWorkloadAnalysis"
timeout 200 ncu --clock-control none -k regex:sample_rows_params --launch-count 1 $SECT \
    python3 benchmarks/sampling_bench.py --rows 2048 --repeats 1 --only "w2mix mix" --out /tmp/ncu-x > "$OUT/sampling-w2mix.txt" 2>&1
echo "=== ncu sampling rc=$?"
grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|DRAM Throughput|Executed Ipc|Issue Slots Busy|Warp Cycles Per Issued|No Eligible|Stall|Pipe|Achieved Occupancy|shared|Shared" "$OUT/sampling-w2mix.txt" | head -40
