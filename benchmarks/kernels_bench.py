"""Our matrix products vs torch.matmul (cuBLAS) on GPT-2 124M shapes, and end-to-end generate() tokens/s.

  python3 benchmarks/kernels_bench.py [--m 8192,65536,131072] [--e2e] [--reps 5]

Kernels: ours fp32 (SIMT FFMA) vs torch fp32 with TF32 off; ours fp16 (mma.sync) vs torch fp16.
Timed with CUDA events after warm-up, median of repeats. PyCUDA runs in torch's primary context.
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [("qkv", 768, 2304), ("attn_out", 768, 768), ("mlp_up", 768, 3072), ("mlp_down", 3072, 768),
          ("lm_head", 768, 50257)]


def median_ms(fn, reps, torch):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return float(np.median(ts))


def bench_kernels(ms, reps):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    import pycuda.driver as drv
    drv.init()
    ctx = drv.Device(torch.cuda.current_device()).retain_primary_context()
    ctx.push()
    from gpt2job.cuda_kernels import Kernels
    k = Kernels(0)
    rows = []
    try:
        for name, K, N in SHAPES:
            for M in ms:
                if name == "lm_head" and M > 8192:
                    continue
                flop = 2.0 * M * N * K
                g = torch.Generator(device="cuda").manual_seed(0)
                A32 = torch.randn(M, K, device="cuda", generator=g)
                W32 = torch.randn(K, N, device="cuda", generator=g) / K ** 0.5
                bias = torch.randn(N, device="cuda", generator=g)
                C32 = torch.empty(M, N, device="cuda")
                A16, W16 = A32.half(), W32.half()
                W16t = W16.t().contiguous()
                C16 = torch.empty(M, N, device="cuda", dtype=torch.half)
                res = {}
                res["ours_f32"] = median_ms(lambda: k.gemm_f32(None, A32.data_ptr(), K, W32.data_ptr(), N,
                                                               C32.data_ptr(), N, bias.data_ptr(), M, N, K, 0),
                                            reps, torch)
                err32 = ((C32 - (A32.double() @ W32.double() + bias.double())).norm() /
                         (A32.double() @ W32.double()).norm()).item()
                res["torch_f32"] = median_ms(lambda: torch.matmul(A32, W32, out=C32), reps, torch)
                res["ours_f16"] = median_ms(lambda: k.gemm_f16(None, A16.data_ptr(), K, W16t.data_ptr(), K,
                                                               C16.data_ptr(), N, bias.data_ptr(), M, N, K, 0, True),
                                            reps, torch)
                ref16 = A16.float() @ W16.float() + bias
                err16 = ((C16.float() - ref16).norm() / ref16.norm()).item()
                res["torch_f16"] = median_ms(lambda: torch.matmul(A16, W16, out=C16), reps, torch)
                tf = {kk: flop / (v * 1e-3) / 1e12 for kk, v in res.items()}
                rows.append((name, M, K, N, tf, err32, err16))
                print(f"{name:9s} M={M:6d} K={K:5d} N={N:6d}  " +
                      "  ".join(f"{kk}={tf[kk]:7.1f}TF ({res[kk]:.3f}ms)" for kk in res) +
                      f"  err32={err32:.1e} err16={err16:.1e}", flush=True)
                del A32, W32, C32, A16, W16, W16t, C16
                torch.cuda.empty_cache()
    finally:
        ctx.pop()
    return rows


def bench_e2e(dtypes, n_prompts=8192, plen=16, new=8):
    from gpt2job.backend import Chunk, GenerationSettings
    from gpt2job.config import PRESETS
    from gpt2job.cuda_backend import CudaBackend
    from gpt2job.weights import random_params
    seed_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".device", "seed-workload",
                             "input.bin")
    if os.path.exists(seed_file):
        toks = np.fromfile(seed_file, np.int32).reshape(-1, 16)[:n_prompts, :plen]
    else:
        toks = np.random.default_rng(0).integers(0, 50257, (n_prompts, plen)).astype(np.int32)
    params = random_params(PRESETS["gpt2"], 0)
    chunk = Chunk(0, np.arange(n_prompts, dtype=np.int64), np.arange(n_prompts + 1, dtype=np.int64) * plen,
                  toks.reshape(-1).copy())
    gs = GenerationSettings(max_new_tokens=new, ignore_eos=True)
    out = {}
    for dt in dtypes:
        be = CudaBackend(params, gs, dtype=dt)
        try:
            be.generate(chunk)                       # warm-up (compiles, allocates)
            t = time.perf_counter()
            c = be.generate(chunk)
            dt_s = time.perf_counter() - t
            tps = c.n_generated / dt_s
            # two chunks through generate_many: the timeline shows upload(i+1) during compute(i)
            be.timeline.clear()
            t = time.perf_counter()
            res = list(be.generate_many([chunk, chunk]))
            dt2 = time.perf_counter() - t
            tl = be.timeline
            print(f"e2e {dt}: {c.n_generated} tokens in {dt_s * 1e3:.1f} ms = {tps:,.0f} tok/s; "
                  f"generate_many x2: {sum(r.n_generated for r in res) / dt2:,.0f} tok/s", flush=True)
            for e in tl:
                print("   timeline", {kk: (tuple(round(x, 2) for x in v) if isinstance(v, tuple) else v)
                                      for kk, v in e.items()})
            out[dt] = tps
        finally:
            be.close()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="8192,65536,131072")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--no-kernels", action="store_true")
    a = ap.parse_args()
    rows = [] if a.no_kernels else bench_kernels([int(x) for x in a.m.split(",")], a.reps)
    e2e = bench_e2e(["float32", "float16"]) if a.e2e else {}
    if rows:
        print("\nTFLOP/s (ours vs cuBLAS); fp32 = FFMA, TF32 off")
        print(f"{'shape':9s} {'M':>6s} {'ours32':>7s} {'cb32':>7s} {'ours16':>7s} {'cb16':>7s} {'16/cb':>6s}")
        for name, M, K, N, tf, e32, e16 in rows:
            print(f"{name:9s} {M:6d} {tf['ours_f32']:7.1f} {tf['torch_f32']:7.1f} {tf['ours_f16']:7.1f} "
                  f"{tf['torch_f16']:7.1f} {tf['ours_f16'] / tf['torch_f16']:6.0%}")
    for dt, v in e2e.items():
        print(f"e2e generate {dt}: {v:,.0f} generated tok/s (8192 prompts x 16 tokens, 8 new, greedy)")


if __name__ == "__main__":
    main()
