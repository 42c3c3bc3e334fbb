"""What cuBLAS runs for the decode-sized layer products of GPT-2 124M: torch.matmul (fp16, the weight as [N, K]
transposed, as decode_products.py calls it) on each shape and row count, a few calls each, so that Nsight Compute
can name the kernel, its grid, block, cluster and time:

  ncu --section LaunchStats --section SpeedOfLight --section MemoryWorkloadAnalysis -k regex:'nvjet|gemm|sm90|cutlass' \
      python3 benchmarks/cublas_probe.py --m 546,1024

It also prints each product's median GPU time (us): each call queued behind a sleeping kernel (kernels_bench.median_ms),
so that a call shorter than its launch is not timed at the host's pace.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_bench import SHAPES, median_ms  # noqa: E402


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
            us = 1e3 * median_ms(lambda: torch.matmul(A, W.t(), out=C), a.calls, torch, inner=1)
            print(f"cublas-probe {shape} M={M} N={N} K={K} us={us:.1f}", flush=True)


if __name__ == "__main__":
    main()
