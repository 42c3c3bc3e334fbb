"""What cuBLAS runs for the decode-sized layer products of GPT-2 124M: torch.matmul (fp16, the weight as [N, K]
transposed, as decode_products.py calls it) on each shape and row count, a few calls each, so that Nsight Compute
can name the kernel, its grid, block, cluster and time:

  ncu --section LaunchStats --section SpeedOfLight --section MemoryWorkloadAnalysis -k regex:'nvjet|gemm|sm90|cutlass' \
      python3 benchmarks/cublas_probe.py --m 546,1024

Without ncu it prints each product's median GPU time (us) as torch's events measure it.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_bench import SHAPES  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="546,1024")
    ap.add_argument("--shapes", default="qkv,attn_out,mlp_up,mlp_down")
    ap.add_argument("--calls", type=int, default=3)
    a = ap.parse_args()
    import torch
    g = torch.Generator(device="cuda").manual_seed(0)
    for shape, K, N in SHAPES:
        if shape not in a.shapes.split(","):
            continue
        W = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).half()
        for M in (int(x) for x in a.m.split(",")):
            A = torch.randn(M, K, device="cuda", generator=g).half()
            C = torch.empty(M, N, device="cuda", dtype=torch.half)
            ts = []
            for _ in range(a.calls):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                torch.matmul(A, W.t(), out=C)
                e1.record()
                e1.synchronize()
                ts.append(e0.elapsed_time(e1) * 1e3)
            print(f"cublas-probe {shape} M={M} N={N} K={K} us={sorted(ts)[len(ts) // 2]:.1f}", flush=True)


if __name__ == "__main__":
    main()
