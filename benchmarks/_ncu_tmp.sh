P="python3 benchmarks/product_probe.py"
SECT="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section ComputeWorkloadAnalysis --section Occupancy"
one() { lab=$1; shift
  timeout 100 ncu --clock-control none -k "regex:gemm_f16" --launch-skip 2 --launch-count 1 $SECT $P "$@" > $OUT/$lab.txt 2>&1
  echo "=== $lab rc=$?"
  grep -E "Duration|Compute \(SM\) Throughput|L2 Cache Throughput|DRAM Throughput|Executed Ipc Active|Warp Cycles Per Issued|No Eligible|Issue Slots Busy|Stall|Tensor|L1/TEX Hit|L2 Hit|Achieved Occupancy" $OUT/$lab.txt | head -24
}
one tma192s_qkv8k --shape qkv --mode 0 --m 8192 --variants tma192s --reps 1
one tma128c_mlpdown8k --shape mlp_down --mode 3 --m 8192 --variants tma128c --reps 1
one tma128s_mlpdown8k --shape mlp_down --mode 3 --m 8192 --variants tma128s --reps 1
