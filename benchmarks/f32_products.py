"""fp32 matrix products on GPT-2 124M's shapes as the forward pass launches them (gemm_f32, plain FP32 FMA, with the
split-K workspace that decode-sized products get: the launcher's choice of K slices) against torch.matmul fp32
(cuBLAS, TF32 off), and each one's error against float64.

  python3 benchmarks/f32_products.py [--m 131072,8192,2048,546,137] [--reps 7] [--out DIR]

FLOPs: 2 M N K a product. Error: ||C - C64|| / ||C64||, C64 the float64 product of the same fp32 operands. Timed with
CUDA events after warm-up (kernels_bench.median_ms), median of --reps. JSON lines to OUT/f32_products.jsonl; a table
last. (Session 48's 3xTF32 form of this script is in experiments/f32-3xtf32.patch.)
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import append_jsonl, torch_kernels  # noqa: E402
from kernels_bench import SHAPES, median_ms  # noqa: E402

SPLIT_ROWS = 8192   # a W1 job's head rows: products of up to this many rows get the split-K workspace (N < 4096)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="131072,8192,2048,546,137")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    table = []
    with torch_kernels(("t64x64k64s4",)) as (torch, k):
        torch.backends.cuda.matmul.allow_tf32 = False
        for M in (int(x) for x in a.m.split(",")):
            for name, K, N in SHAPES:
                if name == "lm_head" and M > 8192:
                    continue
                g = torch.Generator(device="cuda").manual_seed(0)
                A = torch.randn(M, K, device="cuda", generator=g)
                W = torch.randn(K, N, device="cuda", generator=g) / K ** 0.5
                C = torch.empty(M, N, device="cuda")
                ref = A.double() @ W.double()
                ws = torch.empty(8 * M * N, device="cuda") if M <= SPLIT_ROWS and N < 4096 else None

                def ours():
                    k.gemm_f32(None, A.data_ptr(), K, W.data_ptr(), N, C.data_ptr(), N, None, M, N, K, 0,
                               ws=ws.data_ptr() if ws is not None else None, ws_slices=8)
                ms = {"ours": median_ms(ours, a.reps, torch)}
                ours()
                torch.cuda.synchronize()
                err = {"ours": ((C.double() - ref).norm() / ref.norm()).item()}
                ms["cublas"] = median_ms(lambda: torch.matmul(A, W, out=C), a.reps, torch)
                err["cublas"] = ((C.double() - ref).norm() / ref.norm()).item()
                tf = {lab: 2.0 * M * N * K / (v * 1e-3) / 1e12 for lab, v in ms.items()}
                rec = {"bench": "f32_products", "shape": name, "M": M, "K": K, "N": N,
                       "split_workspace": ws is not None, "ms": ms, "tflops": tf, "rel_err": err}
                append_jsonl(os.path.join(a.out, "f32_products.jsonl"), rec)
                table.append(rec)
                del A, W, C, ref, ws
                torch.cuda.empty_cache()
    print("| product | M | ours TFLOP/s | cuBLAS fp32 | ours / cuBLAS | error ours / cuBLAS |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in table:
        t, e = r["tflops"], r["rel_err"]
        print(f"| {r['shape']} | {r['M']:,} | {t['ours']:.1f} | {t['cublas']:.1f} | {t['ours'] / t['cublas']:.2f} | "
              f"{e['ours']:.1e} / {e['cublas']:.1e} |")


if __name__ == "__main__":
    main()
