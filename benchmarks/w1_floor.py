"""A floor for W1 like for like on this GPU, for a serial engine: the time of its matrix products done by cuBLAS
alone (torch.matmul, fp16, bare: no bias, GELU or residual) in W1's order, back to back as one CUDA graph, plus the
bytes such an engine must still move besides the products' operands (moved_bytes) at this GPU's measured copy
bandwidth. It holds for an engine that computes every prompt and prefill token (issue 14's like-for-like row,
the last layer too for every row) with cuBLAS-class products whose epilogues take the bias, GELU and residual add
(as ours do, at cuBLAS's bare speed), and whose other kernels (layer norms, attention) run one after another, each
needing the one before; host work and launches are not counted. Not covered, and each would lower it: the last
layer computed only for the rows whose next token is chosen (their keys and values aside); layer norms fused into
the residual products (cross-tile row statistics); attention fused into the QKV product; memory-bound kernels
overlapped with products (two streams on halves of the batch); read-mostly kernels (decode attention) run faster
than a copy (~4-10% on HBM3e).

    python3 benchmarks/w1_floor.py [--reps 5] [--json FILE]

W1: 8,192 prompts of 16 tokens, 8 new tokens each (65,536), GPT-2 124M: prefill products at 131,072 rows and the LM
head at 8,192, then 7 decode steps at 8,192 rows (cache positions 17..23) with the LM head each. The run repeats the
whole sequence --reps times after a warm-up (the clocks settle under the power limit as in a job) and prints the
median, the memory part, and 65,536 tokens over their sum against issue 14's 800k.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import append_jsonl, base_record  # noqa: E402

C, L, V, B, P, NEW = 768, 12, 50257, 8192, 16, 8


def moved_bytes():
    """The fewest bytes besides the products' operands for that engine: attention reads q, k, v (decode: the cache's
    keys and values, and q) and writes its output (the keys and values reach the cache from the QKV product's output,
    counted there); each layer norm reads the fp32 residual and writes its fp16 rows (6 bytes an element, twice a
    layer; the residual add itself is in the products' epilogues); ln_f on the rows whose next token is chosen."""
    rows_p = B * P
    prefill = L * rows_p * (3 * C * 2 + C * 2 + 2 * 6 * C) + B * C * (4 + 2)
    decode = sum(L * B * ((P + s) * 2 * C * 2 + 2 * C * 2 + 2 * 6 * C) + B * C * (4 + 2) for s in range(1, NEW))
    return prefill, decode


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    import torch
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    vpad = -(-V // 64) * 64   # the LM head's vocabulary padded to 50,304: cuBLAS is slow on the odd width (2x)
    w = {n: (torch.randn(n_, k, device=dev, generator=g) / k ** 0.5).half()    # [N, K], used transposed
         for n, (k, n_) in {"qkv": (C, 3 * C), "out": (C, C), "up": (C, 4 * C), "down": (4 * C, C),
                            "head": (C, vpad)}.items()}
    bufs = {}

    def mm(name, rows):
        n_, k = w[name].shape
        if (name, rows) not in bufs:
            bufs[name, rows] = (torch.randn(rows, k, device=dev, generator=g).half(),
                                torch.empty(rows, n_, device=dev, dtype=torch.half))
        x, y = bufs[name, rows]
        torch.matmul(x, w[name].t(), out=y)

    def layers(rows):
        for _ in range(L):
            for name in ("qkv", "out", "up", "down"):
                mm(name, rows)

    parts = {"prefill layers": lambda: layers(B * P), "decode step layers": lambda: layers(B),
             "LM head": lambda: mm("head", B)}

    def w1():
        for rows in [B * P] + [B] * (NEW - 1):
            layers(rows)
            mm("head", B)

    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def graph_ms(fn):
        fn()   # buffers made outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        times = []
        for i in range(a.reps + 1):
            ev[0].record()
            graph.replay()
            ev[1].record()
            ev[1].synchronize()
            if i:
                times.append(ev[0].elapsed_time(ev[1]))
        return statistics.median(times), times

    products, times = graph_ms(w1)
    part_ms = {name: graph_ms(fn)[0] for name, fn in parts.items()}
    src = torch.empty(2 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copies = []
    for i in range(a.reps + 1):
        ev[0].record()
        dst.copy_(src)
        ev[1].record()
        ev[1].synchronize()
        if i:
            copies.append(ev[0].elapsed_time(ev[1]))
    bw = 2 * src.numel() / (statistics.median(copies) * 1e-3)   # read + write bytes / s
    pre, dec = moved_bytes()
    memory = 1e3 * (pre + dec) / bw
    flops = 2 * (B * P * L * 12 * C * C + (NEW - 1) * B * L * 12 * C * C + NEW * B * C * V)   # 12 C^2 a layer
    # (the padded head's extra 47 columns are not counted)
    floor = products + memory
    print(f"W1 products by cuBLAS (bare, one graph): {products:.2f} ms ({flops / products / 1e9:.0f} TFLOP/s; runs "
          + " ".join(f"{t:.2f}" for t in times) + "); alone: "
          + ", ".join(f"{name} {ms:.2f}" for name, ms in part_ms.items()))
    print(f"bytes besides the products: {(pre + dec) / 1e9:.2f} GB (prefill {pre / 1e9:.2f}, decode {dec / 1e9:.2f}) "
          f"at the copy bandwidth {bw / 1e12:.2f} TB/s: {memory:.2f} ms")
    print(f"floor: {floor:.2f} ms = {B * NEW / floor * 1e3:,.0f} tok/s (issue 14: 800,000 = {B * NEW / 800:.2f} ms)")
    append_jsonl(a.json, base_record(kind="w1-floor", products_ms=products, runs_ms=times, parts_ms=part_ms,
                                     memory_ms=memory, memory_gb=(pre + dec) / 1e9, copy_tb_s=bw / 1e12, floor_ms=floor,
                                     floor_tok_s=B * NEW / floor * 1e3, tflops=flops / products / 1e9))


if __name__ == "__main__":
    main()
