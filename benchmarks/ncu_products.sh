#!/bin/bash
# On the GPU machine: event timings of the TMA product variants vs cuBLAS with the epilogues the forward pass uses,
# then Nsight Compute sections of a few of them (stall reasons, L2/DRAM throughput) and the SASS of tma128.
#   source .device/on-device.sh && OUT=$OUT/ncu bash benchmarks/ncu_products.sh
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ncu}; mkdir -p "$OUT"
VARS=${VARS:-tma128,tma192,tma256,tma128p,tma192p,tma256p}
P="python3 benchmarks/product_probe.py"
for s in "qkv 0" "attn_out 3" "mlp_up 1" "mlp_down 3"; do
    set -- $s
    for m in 131072 8192; do timeout 120 $P --shape $1 --mode $2 --m $m --variants $VARS --torch 2>&1 | grep probe; done
done
SECT="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis"
ncu_one() {   # ncu_one LABEL KERNEL-REGEX probe-args...
    local lab=$1 re=$2; shift 2
    timeout 150 ncu --clock-control none -k "regex:$re" --launch-skip 2 --launch-count 1 $SECT $P "$@" \
        > "$OUT/$lab.txt" 2>&1
    echo "=== ncu $lab rc=$?"; grep -E "Duration|Compute \(SM\) Throughput|L2 Cache Throughput|DRAM Throughput|Memory Throughput|Executed Ipc Active|Warp Cycles Per Issued|No Eligible|Registers|Block Limit|L1/TEX Hit|L2 Hit|Mem Busy|Max Bandwidth|One or More" "$OUT/$lab.txt" | head -20
}
ncu_one tma128_qkv gemm_f16 --shape qkv --variants tma128 --reps 1
ncu_one tma256_qkv gemm_f16 --shape qkv --variants tma256 --reps 1
ncu_one tma256p_qkv gemm_f16 --shape qkv --variants tma256p --reps 1
ncu_one cublas_qkv 'nvjet|sm90|cutlass|gemm' --shape qkv --variants tma128 --reps 1 --torch
ncu_one tma128_attnout_resid gemm_f16 --shape attn_out --mode 3 --variants tma128 --reps 1
grep -h -i -E "^\s+(nvjet|sm90|cutlass)|void|\[[0-9]+\]" "$OUT/cublas_qkv.txt" | head -5
nvcc -gencode=arch=compute_90a,code=sm_90a -cubin -DGEMM_TMA_BN=128 -DGEMM_TMA_PERSIST=0 -o "$OUT/tma128.cubin" \
    cuda_src/gemm_tma.cu && cuobjdump -sass "$OUT/tma128.cubin" > "$OUT/tma128.sass" && echo "sass: $(grep -c HGMMA "$OUT/tma128.sass") HGMMA"
