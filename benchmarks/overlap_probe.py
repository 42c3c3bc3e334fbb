"""Do a decode step's memory-bound attention and its compute-bound products overlap when run on two streams? The
one lever for issue 14's W1 fp16 row (like for like) that changes no arithmetic (RESULTS.md sessions 50-51: a W1
decode step of 8,192 rows is ~32% attention at ~79% of the memory's peak, ~44% layer products at the tensor cores'
rate). Measured here before any engine is built for it:

  P: one layer's decode products (QKV, attention out + residual, MLP up + GELU, MLP down + residual; GPT-2 124M,
     fp16, the production tile picks) x 12 layers on stream 1;
  A: decode attention over W1's caches (positions 16..23, S 24, the runner's kernel pick) x 12 on stream 2;
  each alone, then both at once (launches interleaved layer by layer, attention or products issued first), at each
  --rows. GPU ms from an event on stream 1 to the join of both streams, median of --reps after a warm-up.
  overlap = (P + A - together) / min(P, A): 0 when the two run one after the other, 1 when the shorter one hides
  entirely in the longer.

  python3 benchmarks/overlap_probe.py [--rows 8192,4096] [--reps 9] [--out DIR]

A two-micro-batch engine (half the rows' attention beside the other half's products) would see the --rows 4096 line
at best, less its halves' lower product efficiency. Launches are queued from Python, not replayed as a graph: at a
few thousand rows a product takes about as long as its launch, and gaps in the alone runs can pass for overlap. The
12 layers reuse one layer's weights (they stay in the L2). JSON lines to OUT/overlap_probe.jsonl, a table last.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import append_jsonl, base_record, print_table, torch_kernels  # noqa: E402

LAYERS, H, D, S = 12, 12, 64, 24
C = H * D
# (name, K, N, epilogue (kernels.py EPI_*: 0 bias, 1 bias + GELU tanh, 3 bias + fp32 residual add), fp16 output)
PRODUCTS = (("qkv", C, 3 * C, 0, True), ("attn_out", C, C, 3, False), ("mlp_up", C, 4 * C, 1, True),
            ("mlp_down", 4 * C, C, 3, False))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="8192,4096")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    a = ap.parse_args()
    table = []
    with torch_kernels() as (torch, k):
        import pycuda.driver as drv
        s1, s2 = drv.Stream(), drv.Stream()
        for R in (int(x) for x in a.rows.split(",")):
            g = torch.Generator(device="cuda").manual_seed(0)
            prods = []
            for name, K, N, mode, half in PRODUCTS:
                A = torch.randn(R, K, device="cuda", generator=g).half()
                W = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).half()
                bias = torch.randn(N, device="cuda", generator=g)
                out = torch.zeros(R, N, device="cuda", dtype=torch.half if half else torch.float32)
                prods.append((A, W, bias, out, K, N, mode, half))
            kc, vc = ((torch.rand(R * S * C, device="cuda", generator=g) * 2 - 1).half() for _ in range(2))
            qkv = (torch.rand(R * 3 * C, device="cuda", generator=g) * 2 - 1).half()
            slot = torch.arange(R, dtype=torch.int32, device="cuda")
            pos = torch.randint(16, S, (R,), dtype=torch.int32, device="cuda", generator=g)
            att = torch.empty(R * C, dtype=torch.half, device="cuda")

            def products(stream):
                for A, W, bias, out, K, N, mode, half in prods:
                    k.gemm_f16(stream, A.data_ptr(), K, W.data_ptr(), K, out.data_ptr(), N, bias.data_ptr(), R, N, K,
                               mode, half)

            def attention(stream):
                k.attention(stream, True, qkv.data_ptr(), kc.data_ptr(), vc.data_ptr(), slot.data_ptr(), 0,
                            pos.data_ptr(), att.data_ptr(), R, H, D, S, 0.125)

            def timed(order):
                e0, e1, e2 = drv.Event(), drv.Event(), drv.Event()
                e0.record(s1)
                s2.wait_for_event(e0)
                for _ in range(LAYERS):
                    for part in order:
                        attention(s2) if part == "a" else products(s1)
                e2.record(s2)
                s1.wait_for_event(e2)
                e1.record(s1)
                e1.synchronize()
                return e1.time_since(e0)

            ms = {}
            for order in ("p", "a", "ap", "pa"):
                timed(order)   # warm-up (and the kernels' first loads)
                ms[order] = statistics.median(timed(order) for _ in range(a.reps))
            p, at = ms["p"], ms["a"]
            over = {o: (p + at - ms[o]) / min(p, at) for o in ("ap", "pa")}
            kv_gb = float((pos.long() + 1).sum()) * H * D * 2 * 2 * LAYERS / 1e9
            append_jsonl(os.path.join(a.out, "overlap_probe.jsonl"), base_record(
                bench="overlap_probe", rows=R, layers=LAYERS, ms=ms, overlap=over, attention_kv_gb=kv_gb,
                attention_tb_s=kv_gb / ms["a"]))
            table.append([R, f"{p:.3f}", f"{at:.3f}", f"{p + at:.3f}", f"{ms['ap']:.3f}", f"{ms['pa']:.3f}",
                          f"{over['ap']:.2f}", f"{over['pa']:.2f}"])
            print(f"rows {R}: {ms}", flush=True)
    print()
    print_table(["rows", "P ms", "A ms", "P + A", "together (A first)", "(P first)", "overlap", "(P first)"], table)


if __name__ == "__main__":
    main()
