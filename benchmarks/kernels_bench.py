"""Our matrix products vs torch.matmul (cuBLAS) on GPT-2 124M shapes, and end-to-end tokens/s.

  python3 benchmarks/kernels_bench.py [--m 8192,131072] [--e2e] [--profile] [--w2] [--reps 5]

Kernels: ours fp32 (SIMT FFMA, k-slices of 8 and 16) vs torch fp32 with TF32 off; each fp16 tile variant
(mma.sync, wgmma, TMA + wgmma) vs torch fp16.
--e2e: W1 tok/s of one 8,192-prompt chunk computed in-process: fp32 and fp16 with every prompt token computed
(KernelOptions(prefix_share=False), as GPT2JOB_PREFIX_SHARE=0) and by default (shared prompt prefixes computed
once), and the fp16 default of stop 7. Each configuration is a KernelOptions over the environment's.
--profile: device time per kernel kind over one W1 chunk (CUDA events around every launch); --profile-prompts N
its size.
--w2: W2 (2,048 prompts of 32..512 tokens, 256 new), the stop-7 vs the current fp16 default.
--mix: the mixed-settings workload as one chunk (W2's prompts, workloads.py's per-row settings), fp16, against W2's
prompts with 128 new tokens each, greedy with only the per-row max_new_tokens, and sampled without stop strings:
tok/s (median of --reps) and device time per kernel kind and per decode-step size.
Timed with CUDA events after warm-up, median of repeats. PyCUDA runs in torch's primary context.
"""
import argparse
import dataclasses
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import load_seed_prompts  # noqa: E402
from workloads import mixed_settings, w2_prompts  # noqa: E402

SHAPES = [("qkv", 768, 2304), ("attn_out", 768, 768), ("mlp_up", 768, 3072), ("mlp_down", 3072, 768),
          ("lm_head", 768, 50257)]


def median_ms(fn, reps, torch, inner=8):
    """The median over reps of the GPU time of one call of fn: `inner` calls queued behind a sleeping kernel, then
    timed between two events. Without the sleep, a call the GPU finishes sooner than the host launches it (a
    decode-sized product: a few us, against ~10-20 us of Python and launch per call) is timed at the host's pace.
    (Repeated calls find their operands in L2, which the forward pass's other layers would have evicted.)"""
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(inner * 100_000)     # ~50 us of GPU time per call queued behind it
        a.record()
        for _ in range(inner):
            fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / inner)
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
    from gpt2job.backends.cuda.kernels import F16_TILES, Kernels
    from gpt2job.backends.cuda.options import ALL_TILES, KernelOptions
    k = Kernels(KernelOptions(f16_variants=ALL_TILES))
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
                for lab, bk in (("ours_f32", 8), ("ours_f32_k16", 16)):
                    res[lab] = median_ms(lambda: k.gemm_f32(None, A32.data_ptr(), K, W32.data_ptr(), N,
                                                            C32.data_ptr(), N, bias.data_ptr(), M, N, K, 0, bk=bk),
                                         reps, torch)
                err32 = ((C32 - (A32.double() @ W32.double() + bias.double())).norm() /
                         (A32.double() @ W32.double()).norm()).item()
                res["torch_f32"] = median_ms(lambda: torch.matmul(A32, W32, out=C32), reps, torch)
                ref16 = A16.float() @ W16.float() + bias
                err16 = 0.0
                for v in F16_TILES:
                    C16.fill_(float("nan"))
                    res[v] = median_ms(lambda: k.gemm_f16(None, A16.data_ptr(), K, W16t.data_ptr(), K,
                                                          C16.data_ptr(), N, bias.data_ptr(), M, N, K, 0, True,
                                                          variant=v), reps, torch)
                    err16 = max(err16, ((C16.float() - ref16).norm() / ref16.norm()).item())
                res["torch_f16"] = median_ms(lambda: torch.matmul(A16, W16, out=C16), reps, torch)
                tf = {kk: flop / (v * 1e-3) / 1e12 for kk, v in res.items()}
                rows.append((name, M, K, N, tf, err32, err16))
                print(f"{name:9s} M={M:6d} K={K:5d} N={N:6d}  " +
                      "  ".join(f"{kk}={tf[kk]:.0f}TF({res[kk]:.3f}ms)" for kk in res) +
                      f"  err32={err32:.1e} err16max={err16:.1e}", flush=True)
                A32 = W32 = C32 = A16 = W16 = W16t = C16 = None   # (the timed lambdas above have run)
                torch.cuda.empty_cache()
    finally:
        ctx.pop()
    return rows


def _chunk(rows):
    """One chunk holding the prompt token rows (a list of int arrays), in the given order."""
    from gpt2job.chunks import Chunk
    offsets = np.zeros(len(rows) + 1, np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    return Chunk(0, np.arange(len(rows), dtype=np.int64), offsets, np.concatenate(rows).astype(np.int32))


def w1_chunk(n_prompts=8192, plen=16):
    """W1's prompts (the seed workload, or seeded random tokens without it), as workloads.py writes them."""
    toks, _source = load_seed_prompts(n=n_prompts, plen=plen)
    return _chunk(list(toks))


def w2_chunk(n_prompts=2048, lo=32, hi=512):
    """W2's prompts as workloads.py draws them, longest first (as the scheduler hands them out)."""
    rows = w2_prompts(n_prompts, lo, hi)
    return _chunk(sorted(rows, key=len, reverse=True))


def timed_compute(be, chunk, reps):
    """The chunk computed once (warm-up: compiles, allocates), then reps times: (median seconds, last Completions)."""
    from gpt2job.backends.base import compute
    compute(be, chunk)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        c = compute(be, chunk)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)), c


def profile(dtypes, new=8, chunk=None, label="W1"):
    """Device time per kernel kind over one chunk (events around every launch, CUDA graphs off)."""
    import pycuda.driver as drv
    from gpt2job.backends.base import compute
    from gpt2job.backends.cuda.backend import CudaBackend
    from gpt2job.model.config import PRESETS
    from gpt2job.model.weights import random_params
    from gpt2job.settings import GenerationSettings
    params = random_params(PRESETS["gpt2"], 0)
    chunk = w1_chunk() if chunk is None else chunk
    gs = GenerationSettings(max_new_tokens=new, ignore_eos=True)
    for dt in dtypes:
        be = CudaBackend(params, gs, dtype=dt)
        try:
            compute(be, chunk)
            be.runner.graphs = None   # every launch eager: a step replayed as a CUDA graph has no launches to time
            B = len(chunk.rows)       # a product of more rows than prompts is a prefill pass (the last layer's
            # products and attention on the head rows, B of them, count with the decode steps' here)
            recs = []
            k, stream = be.kernels, be.device.compute
            for name in ("gemm_f16", "gemm_f32", "layernorm", "kv_copy", "attention", "attention_prefill", "embed",
                         "argmax", "argmax_partials", "sample", "gather_tokens", "take_rows"):
                orig = getattr(k, name)

                def wrap(*a, _o=orig, _n=name, **kw):
                    e0, e1 = drv.Event(), drv.Event()
                    e0.record(stream)
                    _o(*a, **kw)
                    e1.record(stream)
                    if _n.startswith("gemm"):
                        M, N, K = a[8], a[9], a[10]
                        tile = kw.get("variant") or (k.pick_f16(M, N, a[12], K) if _n == "gemm_f16" else "")
                        lab = f"{_n} N={N} K={K} {'prefill' if M > B else 'decode/head'} {tile}"
                    elif _n == "attention":
                        lab = f"attention {'prefill' if a[9] > B else 'decode'}"
                    elif _n == "attention_prefill":
                        lab = "attention_prefill (tensor cores)"
                    else:
                        lab = _n
                    recs.append((lab, e0, e1))
                setattr(k, name, wrap)
            t = time.perf_counter()
            compute(be, chunk)
            wall = (time.perf_counter() - t) * 1e3
            tot = {}
            for lab, e0, e1 in recs:
                tot[lab] = tot.get(lab, 0.0) + e1.time_since(e0)
            s = sum(tot.values())
            print(f"profile {label} {dt} ({new} new tokens): wall {wall:.1f} ms, kernels {s:.1f} ms, "
                  f"timeline {be.timeline[-1]}")
            for lab, v in sorted(tot.items(), key=lambda x: -x[1]):
                print(f"   {v:8.2f} ms  {lab}")
        finally:
            be.close()


MIX_CASES = ("W2 prompts, 128 new", "greedy, per-row max_new_tokens", "sampled, no stop strings", "mixed")


def mix_chunk(case, n=2048):
    """W2's prompts (longest first) with the mixed workload's settings as `case` (MIX_CASES) keeps them."""
    from gpt2job.chunks import RowParams
    rows = w2_prompts(n)
    cols, stop = mixed_settings(n)
    order = np.argsort([-len(r) for r in rows], kind="stable")
    ch = _chunk([rows[i] for i in order])
    if case == MIX_CASES[0]:
        return ch
    temp = np.zeros(n) if case == MIX_CASES[1] else cols["temperature"].astype(np.float64)
    stops = [tuple(x for x in stop[i] if x) for i in order] if case == MIX_CASES[3] else None
    ch.params = RowParams.of(stops=stops, max_new_tokens=cols["max_new_tokens"][order], temperature=temp[order],
                             top_k=cols["top_k"][order], top_p=cols["top_p"][order].astype(np.float64),
                             seed=cols["seed"][order], repetition_penalty=np.ones(n, np.float32))
    return ch


def bucket(n):
    """The label of a forward pass of n rows (-1: a prefill pass) in mix_profile's table."""
    return "prefill" if n < 0 else next(f">={x}" for x in (1536, 1024, 512, 256, 128, 0) if n >= x)


def mix_profile(reps):
    """Each MIX_CASES chunk: tok/s (median of reps, no events), then one run with events around every launch (CUDA
    graphs off): device time per kernel kind, and per decode-step size (rows in the step)."""
    import pycuda.driver as drv
    from gpt2job.backends.base import compute
    from gpt2job.backends.cuda.backend import CudaBackend
    from gpt2job.model.config import PRESETS
    from gpt2job.model.weights import random_params
    from gpt2job.settings import GenerationSettings
    params = random_params(PRESETS["gpt2"], 0)
    gs = GenerationSettings(max_new_tokens=128, ignore_eos=True)
    be = CudaBackend(params, gs, dtype="float16")
    try:
        for case in MIX_CASES:
            chunk = mix_chunk(case)
            wall, c = timed_compute(be, chunk, reps)
            tl = be.timeline[-1]
            print(f"mix {case}: {c.n_generated} tokens in {wall * 1e3:.1f} ms = {c.n_generated / wall:,.0f} tok/s; "
                  f"prefill {tl.get('prefill_ms', 0):.1f} ms, decode {tl.get('decode_ms', 0):.1f} ms (device)",
                  flush=True)
            k, stream, model = be.kernels, be.device.compute, be.model
            recs, cur, saved = [], {"n": 0}, {}
            for name in ("gemm_f16", "layernorm", "kv_copy", "attention", "attention_prefill", "embed", "argmax",
                         "take_rows", "argmax_partials", "sample", "sample_params", "gather_tokens", "mark_seen",
                         "logprobs"):
                if not hasattr(k, name):
                    continue
                saved[name] = orig = getattr(k, name)

                def wrap(*a, _o=orig, _n=name, **kw):
                    e0, e1 = drv.Event(), drv.Event()
                    e0.record(stream)
                    _o(*a, **kw)
                    e1.record(stream)
                    lab = _n
                    if _n == "gemm_f16":
                        lab = f"gemm_f16 N={a[9]} K={a[10]}"
                    recs.append((lab, cur["n"], e0, e1))
                setattr(k, name, wrap)
            fwd, steps = model.forward, {}

            def forward(n, *a, **kw):
                cur["n"] = -1 if kw.get("tiles") is not None else n   # -1: a prefill pass
                b = bucket(cur["n"])
                steps[b] = steps.get(b, 0) + 1
                return fwd(n, *a, **kw)
            model.forward = forward
            graphs, be.runner.graphs = be.runner.graphs, None   # events may not be recorded under a graph capture
            try:
                t = time.perf_counter()
                compute(be, chunk)
                ewall = (time.perf_counter() - t) * 1e3
            finally:
                be.runner.graphs = graphs
                model.forward = fwd
                for name, orig in saved.items():
                    setattr(k, name, orig)
            kinds, sizes = {}, {}
            for lab, n, e0, e1 in recs:
                ms = e1.time_since(e0)
                kinds[lab] = kinds.get(lab, 0.0) + ms
                sizes[bucket(n)] = sizes.get(bucket(n), 0.0) + ms
            print(f"  with events: wall {ewall:.1f} ms, kernels {sum(kinds.values()):.1f} ms")
            for lab, v in sorted(kinds.items(), key=lambda x: -x[1])[:12]:
                print(f"   {v:8.2f} ms  {lab}")
            for b, v in sizes.items():
                print(f"   rows {b:>8s}: {steps.get(b, 0):4d} passes, {v:8.2f} ms of kernels, "
                      f"{v / max(steps.get(b, 1), 1):.3f} ms a pass")
    finally:
        be.close()


def bench_e2e(configs, new=8, chunk=None, reps=3, label="W1"):
    """configs: (label, dtype, {KernelOptions field: value}) over the environment's options -- e.g. f16_variants,
    prefill_attn, f32_bk."""
    from gpt2job.backends.cuda.backend import CudaBackend
    from gpt2job.backends.cuda.options import KernelOptions
    from gpt2job.model.config import PRESETS
    from gpt2job.model.weights import random_params
    from gpt2job.settings import GenerationSettings
    params = random_params(PRESETS["gpt2"], 0)
    chunk = w1_chunk() if chunk is None else chunk
    gs = GenerationSettings(max_new_tokens=new, ignore_eos=True)
    out = {}
    for name, dt, opts in configs:
        be = CudaBackend(params, gs, dtype=dt, options=dataclasses.replace(KernelOptions.from_env(), **opts))
        try:
            dt_s, c = timed_compute(be, chunk, reps)
            tps = c.n_generated / dt_s
            tl = be.timeline[-1]
            print(f"e2e {label} {name}: {c.n_generated} tokens in {dt_s * 1e3:.1f} ms (median of {reps}) = "
                  f"{tps:,.0f} tok/s; prefill {tl.get('prefill_ms', 0):.1f} ms, decode {tl.get('decode_ms', 0):.1f} ms "
                  f"(device)", flush=True)
            out[name] = (tps, dt_s * 1e3, c.tokens.copy())
        finally:
            be.close()
    return out


STOP7_F16 = dict(f16_variants=("tma128", "tma192", "tma256", "wgmma", "t128x128k64s3"),
                 fuse_argmax=False, tma_staged=False)   # the default of stop 7 (commit 8a0e470)
NO_SHARE = dict(prefix_share=False)   # every prompt token computed (no shared-prefix plan)
NO_STAGED = dict(tma_staged=False)    # no product on the staged-epilogue TMA kernels (the stop-8 picks)
ARGMAX_MMA = dict(argmax_variant="t128x128k64s3")   # greedy LM head on the mma.sync tiles (the stop-9 pick)
E2E_CONFIGS = [("float32-no-prefix-share", "float32", NO_SHARE),
               ("float32", "float32", {}),
               ("float16-stop7", "float16", STOP7_F16),
               ("float16-no-prefix-share", "float16", NO_SHARE),
               ("float16", "float16", {}),
               ("float16-no-staged", "float16", NO_STAGED),
               ("float16-argmax-mma", "float16", ARGMAX_MMA)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", default="8192,131072")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--e2e", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-dtypes", default="float16,float32")
    ap.add_argument("--profile-prompts", type=int, default=8192,
                    help="--profile: W1 prompts in the chunk (546: what each of 15 workers gets)")
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--configs", default="", help="--e2e configurations to run, comma-separated (default: all): "
                    + ", ".join(c[0] for c in E2E_CONFIGS))
    ap.add_argument("--mix", action="store_true", help="the mixed-settings workload's costs (see above)")
    ap.add_argument("--w2", action="store_true", help="also W2-like in-process timing (2,048 prompts of 32..512, "
                    "256 new tokens), the stop-7 vs the current fp16 default, and a short W2 profile")
    a = ap.parse_args()
    rows = [] if a.no_kernels else bench_kernels([int(x) for x in a.m.split(",")], a.reps)
    if a.profile:
        profile(a.profile_dtypes.split(","), chunk=w1_chunk(a.profile_prompts), label=f"W1 {a.profile_prompts}")
    want = set(a.configs.split(",")) if a.configs else None
    e2e = bench_e2e([c for c in E2E_CONFIGS if want is None or c[0] in want]) if a.e2e else {}
    if a.mix:
        mix_profile(a.reps)
    if a.w2:
        w2 = w2_chunk()
        if a.profile:
            profile(["float16"], new=16, chunk=w2, label="W2 (16 new tokens)")
        bench_e2e([("float16-stop7", "float16", STOP7_F16), ("float16", "float16", {})], new=256, chunk=w2, reps=1,
                  label="W2")
    if rows:
        from gpt2job.backends.cuda.kernels import F16_TILES
        print("\nTFLOP/s (ours vs cuBLAS); fp32 = FFMA, TF32 off; fp16 per tile variant, best/cuBLAS")
        print(f"{'shape':9s} {'M':>6s} {'ours32':>6s} {'k16':>6s} {'cb32':>6s} "
              + " ".join(f"{v[:13]:>13s}" for v in F16_TILES) + f" {'cb16':>6s} {'best/cb':>7s}")
        for name, M, K, N, tf, e32, e16 in rows:
            best = max(tf[v] for v in F16_TILES)
            print(f"{name:9s} {M:6d} {tf['ours_f32']:6.1f} {tf['ours_f32_k16']:6.1f} {tf['torch_f32']:6.1f} "
                  + " ".join(f"{tf[v]:13.1f}" for v in F16_TILES) + f" {tf['torch_f16']:6.1f} "
                  f"{best / tf['torch_f16']:7.0%}")
    for label, (v, ms, _) in e2e.items():
        print(f"e2e generate {label}: {v:,.0f} generated tok/s, {ms:.1f} ms/chunk (8192 prompts x 16 tokens, 8 new)")
    if "float16" in e2e and "float32" in e2e:
        a16, a32 = e2e["float16"][2], e2e["float32"][2]
        n = min(len(a16), len(a32))
        print(f"fp16 vs fp32 greedy token agreement: {(a16[:n] == a32[:n]).mean():.3f}")
    for cur, other in (("float16", "float16-stop7"), ("float16", "float16-no-prefix-share"),
                       ("float16", "float16-no-staged"), ("float16", "float16-argmax-mma"),
                       ("float32", "float32-no-prefix-share")):
        if cur in e2e and other in e2e:
            a, b = e2e[cur][2], e2e[other][2]
            print(f"{cur} (current) vs {other} token agreement: {(a == b).mean():.4f}")


if __name__ == "__main__":
    main()
