"""One whole decode step on the GPU (the layers, ln_f and the greedy fp16 LM head, as the runner launches it),
replayed as a CUDA graph as the runner replays it, under different product picks: what a pick change does to a step,
where each product waits for the one before it (decode_products.py times one product at a time; RESULTS.md, session
18: picks it measured faster made whole jobs slower).

    python3 benchmarks/decode_step_bench.py [--rows 137,546,1024,1536,2048] [--ctx 24,400] [--reps 30] [--out DIR]
                                            [--configs picks,...]

Configurations: "picks" (picks.py as it is); "pp-from-N" (the ping-pong kernel tma128pp for the layer products from
N rows instead of picks.PINGPONG_FROM: 256 and 512); "attn-keys-1" (decode attention never with 8 key steps a round:
3 (fp16; 1 fp32) under ATTENTION_LONG_FROM positions, 4 from there; the name predates the 3) / "attn-keys-8" (always
8) / "attn-ahead" (always 8 with the next 8 in flight); "ln-plain" / "ln-prefetch" (layer norm always without / with
its weights loaded with the row); "k64" (the narrow decode tiles on 64-wide k slices, as
picked until session 25: compile t32x32k64s8 too, with GPT2JOB_F16_VARIANTS); "tiles:WIDE:NARROW:lo:hi" (the layer
products of lo..hi-1 rows on the tiles WIDE (N > K: QKV, MLP up) and NARROW (the others), "-" and all other
products no-swap's pick; compile them with GPT2JOB_F16_VARIANTS where they are not by default); "no-swap" (the picks without the swapped tiles of
gemm_swap.cu); "swap:lo:hi" (no-swap, with the narrow layer products (N <= K) of lo..hi-1 rows on the swapped
tiles); "swap-all:lo:hi" (the same for every layer product); a name ending in "+carve100" also sets every kernel's
preferred shared-memory carveout to 100% (the others: the default); a name ending in "+nopdl" replays the step
without programmatic edges between its kernels (graphs.Graph pdl=False; the others: with them where the runner
replays steps with them, on Hopper unless GPT2JOB_GRAPH_PDL=0). GPT-2 124M shapes, seeded weights, fp16; each
row at position ctx - 1 of its own KV slot. Prints ms per step (median of --reps graph replays) and the ratio to the
first of --configs; JSON lines to OUT/decode_step.jsonl.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiles(orig, spec):
    """orig, with the layer products of lo <= M < hi rows on named tiles: spec "tiles:WIDE:NARROW:lo:hi", WIDE for
    N > K (QKV, MLP up), NARROW for the others; "-" keeps orig's pick."""
    _, wide, narrow, lo, hi = spec.split(":")

    def pick(M, N, out_half=True, K=768):
        v = wide if N > K else narrow
        if int(lo) <= M < int(hi) and N <= 16384 and v != "-":
            return v
        return orig(M, N, out_half, K)
    return pick


def swap_rows(orig, swap, spec):
    """orig, with the narrow layer products (N <= K) of lo <= M < hi rows on the swapped tiles (picks.TilePicker.
    pick_swap, where compiled): spec "swap:lo:hi"; "swap-all:lo:hi": every layer product."""
    kind, lo, hi = spec.split(":")

    def pick(M, N, out_half=True, K=768):
        v = swap(M, N) if int(lo) <= M < int(hi) and N <= (K if kind == "swap" else 16384) else None
        return v or orig(M, N, out_half, K)
    return pick


def config(orig, name, swap=None):
    if name.startswith("tiles:"):
        return tiles(orig, name)
    if name.startswith(("swap:", "swap-all:")):
        return swap_rows(orig, swap, name)
    raise SystemExit(f"unknown configuration {name}")


def swapped(orig, swaps):
    """orig (the picker's pick_f16), with each pick named in swaps replaced by its value."""
    def pick(M, N, out_half=True, K=768):
        v = orig(M, N, out_half, K)
        return swaps.get(v, v)
    return pick


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="137,546,1024,1536,2048")
    ap.add_argument("--ctx", default="24,400")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--configs", default="picks,pp-from-256,pp-from-512", help="which of the configurations to run")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    a = ap.parse_args()
    from gpt2job.backends.cuda.backend import CudaBackend
    from gpt2job.backends.cuda.graphs import Graph
    from gpt2job.model.config import PRESETS
    from gpt2job.model.weights import random_params
    from gpt2job.settings import GenerationSettings, SamplingSettings
    os.makedirs(a.out, exist_ok=True)
    be = CudaBackend(random_params(PRESETS["gpt2"], 0), GenerationSettings(max_new_tokens=8, ignore_eos=True),
                     dtype="float16")
    dev, model, k = be.device, be.model, be.kernels
    drv, st = dev.drv, dev.compute
    pdl = getattr(be.runner.graphs, "pdl", False)   # programmatic edges as the runner replays steps (the backend's)
    orig = k.pick_f16
    from gpt2job.backends.cuda.kernels import F16_TILES
    from gpt2job.backends.cuda.picks import PINGPONG_FROM, TilePicker
    unswapped = TilePicker(F16_TILES, [v for v in k.f16_variants if F16_TILES[v].family != "swap"], k.n_sm,
                           k.options)
    pp_from = {f"pp-from-{lo}": tiles(orig, f"tiles:tma128pp:tma128pp:{lo}:{PINGPONG_FROM}") for lo in (256, 512)}
    configs = {"picks": orig, **pp_from,
               "no-swap": unswapped.pick_f16,
               "attn-keys-1": orig, "attn-keys-8": orig, "attn-ahead": orig, "ln-plain": orig, "ln-prefetch": orig,
               "k64": swapped(orig, {"t32x32k128s4": "t32x32k64s8", "t32x64k128s4": "t32x64k64s4"})}
    base_of = {name: name.split("+")[0] for name in a.configs.split(",")}   # "+carve100": see below
    configs = {name: configs[b] if b in configs else config(unswapped.pick_f16, b, orig.__self__.pick_swap)
               for name, b in base_of.items()}
    kernel_attrs = {"attn-keys-1": {"ATTENTION_SHORT_WARPS": 0, "ATTENTION_AHEAD_WARPS": 0},
                    "attn-keys-8": {"ATTENTION_SHORT_WARPS": 1 << 20, "ATTENTION_AHEAD_WARPS": 0},
                    "attn-ahead": {"ATTENTION_AHEAD_WARPS": 1 << 20},
                    "ln-plain": {"LN_PREFETCH_ROWS": -1}, "ln-prefetch": {"LN_PREFETCH_ROWS": 1 << 30}}
    greedy = SamplingSettings()
    rng = np.random.default_rng(0)
    res = []
    try:
        for ctx in (int(c) for c in a.ctx.split(",")):
            for n in (int(r) for r in a.rows.split(",")):
                S = ctx + 1
                kv = be.runner.kv_cache(n, S)
                drv.memset_d8(int(dev.buf("kv", 1)), 0, 2 * model.cfg.n_layer * n * S * model.cfg.n_embd * model.elt)
                tok, pos, seq, rows, out = (int(dev.upload(v, t)) for v, t in (
                    (rng.integers(0, model.V, n), np.int32), (np.full(n, ctx - 1), np.int32),
                    (np.arange(n), np.int32), (np.arange(n), np.int64), (np.zeros(n), np.int32)))
                base = None
                for name, pick in configs.items():
                    k.pick_f16 = pick
                    for attr in ("ATTENTION_SHORT_WARPS", "ATTENTION_AHEAD_WARPS", "LN_PREFETCH_ROWS"):
                        k.__dict__.pop(attr, None)        # the class's value
                    k.__dict__.update(kernel_attrs.get(base_of[name], {}))
                    if any(c.endswith("+carve100") for c in configs):   # every kernel asks for the largest shared
                        carve = 100 if name.endswith("+carve100") else -1  # memory; -1: the driver's choice (default)
                        for f in k.funcs.values():
                            f.set_attribute(drv.function_attribute.PREFERRED_SHARED_MEMORY_CARVEOUT, carve)

                    def step():
                        x, _, _ = model.forward(n, tok, pos, seq, 0, S, kv)
                        model.select(x, n, None, 0, seq, rows, 1, out, greedy)
                    step()                      # grows the buffers, fills the TMA descriptor cache
                    st.synchronize()
                    g = Graph(st, step, pdl=pdl and not name.endswith("+nopdl"))
                    times = []
                    for _ in range(a.reps + 3):
                        e0, e1 = drv.Event(), drv.Event()
                        e0.record(st)
                        g.launch()
                        e1.record(st)
                        e1.synchronize()
                        times.append(e1.time_since(e0))
                    g.close()
                    ms = float(np.median(times[3:]))
                    base = base or ms
                    rec = {"bench": "decode_step", "config": name, "rows": n, "ctx": ctx, "ms": round(ms, 4),
                           "vs_picks": round(ms / base, 3)}
                    res.append(rec)
                    print(f"ctx {ctx:4d} rows {n:5d} {name:18s} {ms:7.3f} ms  {ms / base:.3f}", flush=True)
                    with open(os.path.join(a.out, "decode_step.jsonl"), "a") as f:
                        f.write(json.dumps(rec) + "\n")
                k.pick_f16 = orig
    finally:
        k.pick_f16 = orig
        be.close()


if __name__ == "__main__":
    main()
