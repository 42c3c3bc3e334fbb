"""One fp16 matrix product of a GPT-2 shape, repeated: for Nsight Compute (ncu) and for A/B timing of variants
with the epilogue the forward pass really uses (EPI_RESID adds into an fp32 residual, EPI_GELU_TANH, EPI_QKV not
covered).

  python3 benchmarks/product_probe.py --shape qkv --m 131072 --variants tma128,tma256 [--mode 0|1|3] [--torch]
  ncu --clock-control none -k regex:gemm --launch-skip 2 --launch-count 1 --section SpeedOfLight \
      python3 benchmarks/product_probe.py --shape qkv --variants tma128 --reps 3

Prints TFLOP/s per variant (CUDA events, median of --reps after a warm-up). mode 3 (EPI_RESID) writes fp32; mode 5
(--shape lm_head) times the product with its (max, argmax) epilogue plus the reduction of the partials.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import torch_kernels  # noqa: E402
from kernels_bench import SHAPES, median_ms  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qkv", choices=[s[0] for s in SHAPES])
    ap.add_argument("--m", type=int, default=131072)
    ap.add_argument("--variants", default="tma128")
    ap.add_argument("--mode", type=int, default=0,
                    help="0 bias, 1 bias + GELU (tanh), 3 add into fp32 residual, 5 greedy LM head (argmax epilogue)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--torch", action="store_true", help="also torch.matmul (cuBLAS) on the same operands")
    a = ap.parse_args()
    vs = a.variants.split(",")
    with torch_kernels(vs) as (torch, k):
        from gpt2job.backends.cuda.kernels import F16_TILES
        _, K, N = next(s for s in SHAPES if s[0] == a.shape)
        M = a.m
        g = torch.Generator(device="cuda").manual_seed(0)
        A = torch.randn(M, K, device="cuda", generator=g).half()
        W = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).half()   # [N, K]
        bias = torch.randn(N, device="cuda", generator=g)
        out_half = a.mode != 3
        C = torch.zeros(M, N, device="cuda", dtype=torch.half if out_half else torch.float32)
        flop = 2.0 * M * N * K
        ref = A.float() @ W.float().t() + bias
        if a.mode == 5:   # the greedy LM head: (max, argmax) partials per tile column, then their argmax
            want = torch.argmax(A.float() @ W.float().t(), dim=1)
            for v in vs:
                nch = (N + F16_TILES[v].wn - 1) // F16_TILES[v].wn
                part = torch.empty(M, nch, 2, device="cuda", dtype=torch.float32)
                out = torch.empty(M, device="cuda", dtype=torch.int32)

                def head():
                    k.gemm_f16(None, A.data_ptr(), K, W.data_ptr(), K, part.data_ptr(), nch, None, M, N, K, 5, False,
                               variant=v)
                    k.argmax_partials(None, part.data_ptr(), nch, nch, out.data_ptr(), M)
                head()
                torch.cuda.synchronize()
                agree = (out.long() == want).float().mean().item()
                ms = median_ms(head, a.reps, torch)
                print(f"probe {a.shape} M={M} K={K} N={N} mode=5 {v:8s} {flop / ms / 1e9:6.0f} TFLOP/s "
                      f"({ms:.3f} ms) argmax = fp32 argmax on {100 * agree:.2f}% of rows", flush=True)
            vs = []
        for v in vs:
            C.zero_()
            k.gemm_f16(None, A.data_ptr(), K, W.data_ptr(), K, C.data_ptr(), N, bias.data_ptr(), M, N, K, a.mode,
                       out_half, variant=v)
            torch.cuda.synchronize()
            want = ref if a.mode != 1 else torch.nn.functional.gelu(ref, approximate="tanh")
            err = ((C.float() - want).norm() / want.norm()).item()
            ms = median_ms(lambda: k.gemm_f16(None, A.data_ptr(), K, W.data_ptr(), K, C.data_ptr(), N,
                                              bias.data_ptr(), M, N, K, a.mode, out_half, variant=v), a.reps, torch)
            print(f"probe {a.shape} M={M} K={K} N={N} mode={a.mode} {v:8s} {flop / ms / 1e9:6.0f} TFLOP/s "
                  f"({ms:.3f} ms) rel.err {err:.1e}", flush=True)
        if a.torch:
            Wt = W.t()
            C16 = torch.empty(M, N, device="cuda", dtype=torch.half)
            ms = median_ms(lambda: torch.matmul(A, Wt, out=C16), a.reps, torch)
            print(f"probe {a.shape} M={M} K={K} N={N} torch.matmul {flop / ms / 1e9:6.0f} TFLOP/s ({ms:.3f} ms)")
            if a.mode in (1, 3):   # the same work in torch: the product with bias, then the GELU or residual add
                C32 = torch.zeros(M, N, device="cuda", dtype=torch.float32) if a.mode == 3 else None
                b16 = bias.half()
                work = ((lambda: torch.nn.functional.gelu(torch.addmm(b16, A, Wt), approximate="tanh"))
                        if a.mode == 1 else (lambda: C32.add_(torch.addmm(b16, A, Wt))))
                ms = median_ms(work, a.reps, torch)
                what = "addmm + gelu" if a.mode == 1 else "addmm + residual add_ (fp32)"
                print(f"probe {a.shape} M={M} K={K} N={N} torch {what} {flop / ms / 1e9:6.0f} TFLOP/s ({ms:.3f} ms)")
            if N % 64:   # cuBLAS on the same product with N padded to a multiple of 64 (FLOPs counted for N)
                Np = (N + 63) // 64 * 64
                Wp = torch.zeros(Np, K, device="cuda", dtype=torch.half)
                Wp[:N] = W
                Wpt, Cp = Wp.t(), torch.empty(M, Np, device="cuda", dtype=torch.half)
                ms = median_ms(lambda: torch.matmul(A, Wpt, out=Cp), a.reps, torch)
                print(f"probe {a.shape} M={M} K={K} N={N} torch.matmul, N padded to {Np} {flop / ms / 1e9:6.0f} TFLOP/s "
                      f"({ms:.3f} ms)")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
