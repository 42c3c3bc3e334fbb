"""Decode-sized fp16 products (the layer products of GPT-2 124M at a few hundred rows), every tile variant against
cuBLAS, as the forward pass meets them: copies of the weights, each call on the next one, the calls queued behind a
sleeping kernel and timed on the GPU. --copies 0 (the default): as many as make twice the H200's 50 MB L2 (at least
12, one per layer); the figures of RESULTS.md session 15 ran with 12 (then only the MLP weights, 57 MB, exceeded the
L2: QKV's 42 MB and attention-out's 14 MB could stay in it). cuBLAS runs the bare product (fp16 out, no bias, no
epilogue), ours the model's epilogue (QKV excepted: a plain one here, the KV cache writes in the model): the
comparison favours cuBLAS. Picks faster here were slower in whole jobs (RESULTS.md, session 18): check a pick with
decode_step_bench.py (a whole step, as the runner replays it) and in jobs before it lands.

  python3 benchmarks/decode_products.py [--m 137,546,1024,2048] [--variants t64x128k64s4,tma128,...] [--reps 5]
      [--copies N] [--shapes qkv,attn_out,mlp_up,mlp_down,lm_head]

Prints one line per (shape, rows, variant) with the GPU time per call and the relative error against an fp32
product, then a table last: per shape and row count, the fastest variant, the time of the current pick
(picks.py), and cuBLAS (torch.matmul, same operands). JSON lines to OUT/decode_products.jsonl.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels_bench import SHAPES  # noqa: E402

MODES = {"qkv": 0, "attn_out": 3, "mlp_up": 1, "mlp_down": 3, "lm_head": 0}   # each product's epilogue in the model
FLOAT_OUT = ("attn_out", "mlp_down", "lm_head")   # float outputs: the residual adds, the logits (materialised: sampling,
                                                  # per-row settings, --logprobs)
LAYERS = 12
L2_BYTES = 50 << 20      # the H200's L2


def gpu_ms(calls, reps, torch):
    """Median over reps of the GPU time per call of `calls` (a list of functions), queued behind a sleep."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(len(calls) * 100_000)
        a.record()
        for c in calls:
            c()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / len(calls))
    return float(np.median(ts))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="137,546,1024,2048")
    ap.add_argument("--variants", default="t64x128k64s4,tma128,wgmma,t64x64k64s4,t32x64k64s4,t32x64k128s4,"
                                          "t32x32k128s4,t32x32k64s8")
    ap.add_argument("--shapes", default="qkv,attn_out,mlp_up,mlp_down", help="of " + ",".join(MODES))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--copies", type=int, default=0, help="weight copies (0: twice the L2's 50 MB, at least 12)")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    a = ap.parse_args()
    import torch
    torch.zeros(1, device="cuda")
    import pycuda.driver as drv
    drv.init()
    ctx = drv.Device(torch.cuda.current_device()).retain_primary_context()
    ctx.push()
    os.makedirs(a.out, exist_ok=True)
    rows_out = []
    try:
        from gpt2job.backends.cuda.kernels import F16_DEFAULT, F16_TILES, Kernels
        from gpt2job.backends.cuda.options import KernelOptions
        from gpt2job.backends.cuda.picks import TilePicker
        vs = a.variants.split(",")
        k = Kernels(KernelOptions(f16_variants=tuple(vs)))
        picker = TilePicker(F16_TILES, F16_DEFAULT, k.n_sm, KernelOptions())   # the production picks
        g = torch.Generator(device="cuda").manual_seed(0)
        for shape, K, N in SHAPES:
            if shape not in a.shapes.split(","):
                continue
            mode = MODES[shape]
            out_half = shape not in FLOAT_OUT
            copies = a.copies or max(LAYERS, -(-2 * L2_BYTES // (2 * N * K)))
            Ws = [(torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).half() for _ in range(copies)]
            Wts = [W.t() for W in Ws]
            bias = torch.randn(N, device="cuda", generator=g) * (shape != "lm_head")   # the LM head has none
            p_bias = bias.data_ptr() if shape != "lm_head" else 0
            for M in (int(x) for x in a.m.split(",")):
                A = torch.randn(M, K, device="cuda", generator=g).half()
                ldc = -(-N // 128) * 128 if shape == "lm_head" else N   # the logits' rows: Model.Vpad floats
                C = torch.zeros(M, ldc, device="cuda", dtype=torch.half if out_half else torch.float32)
                ref = A.float() @ Ws[0].float().t() + bias
                if mode == 1:
                    ref = torch.nn.functional.gelu(ref, approximate="tanh")
                res = {}
                for v in vs:
                    def call(W, v=v):
                        return lambda: k.gemm_f16(None, A.data_ptr(), K, W.data_ptr(), K, C.data_ptr(), ldc,
                                                  p_bias, M, N, K, mode, out_half, variant=v)
                    C.zero_()
                    call(Ws[0])()
                    torch.cuda.synchronize()
                    err = ((C[:, :N].float() - ref).norm() / ref.norm()).item()
                    ms = gpu_ms([call(W) for W in Ws], a.reps, torch)
                    res[v] = ms
                    print(f"{shape:8s} M={M:5d} {v:14s} {1e3 * ms:7.1f} us  rel.err {err:.1e}", flush=True)
                C16 = torch.empty(M, N, device="cuda", dtype=torch.half)
                res["cublas"] = gpu_ms([lambda Wt=Wt: torch.matmul(A, Wt, out=C16) for Wt in Wts], a.reps, torch)
                print(f"{shape:8s} M={M:5d} {'torch.matmul':14s} {1e3 * res['cublas']:7.1f} us", flush=True)
                pick = picker.pick_f16(M, N, out_half, K)
                rec = {"kind": "decode-product", "shape": shape, "M": M, "N": N, "K": K, "mode": mode, "copies": copies,
                       "us": {v: round(1e3 * t, 2) for v, t in res.items()}, "pick": pick}
                rows_out.append(rec)
                with open(os.path.join(a.out, "decode_products.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
    finally:
        ctx.pop()
    print(f"\n{'shape':8s} {'M':>5s} {'fastest':>14s} {'us':>6s} {'pick':>14s} {'us':>6s} {'cuBLAS us':>9s}")
    for r in rows_out:
        us = {v: t for v, t in r["us"].items() if v != "cublas"}
        best = min(us, key=us.get)
        p = r["pick"]
        print(f"{r['shape']:8s} {r['M']:5d} {best:>14s} {us[best]:6.1f} {p:>14s} "
              f"{us[p] if p in us else float('nan'):6.1f} {r['us']['cublas']:9.1f}")


if __name__ == "__main__":
    main()
