"""The four layer products of GPT-2 124M (QKV, attention out, MLP up with GELU, MLP down; and MLP up without GELU,
to see the epilogue's share) at a few row counts, each fp16 tile variant named against cuBLAS, with the epilogue the
forward pass uses (QKV here with the plain bias epilogue, not the KV-cache writes). One product repeated: one warm-up
call, then CUDA events around 20 back-to-back calls, us per call; the operands stay in the L2 between calls, so
compare columns of one run, not these figures with decode_products.py (weights cold, as a decode step meets them).
Each line ends "same" when every variant's output is bitwise the first one's (the guarantee of picks.py: a row's
result does not depend on the tile).

  python3 benchmarks/product_variants.py --variants tma192s,tma128s,tma128pp --m 1852,8192,131072

RESULTS.md, session 20: the measurements of the ping-pong kernel (tma128pp).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import torch_kernels  # noqa: E402

SHAPES = (("qkv", 2304, 768, 0, True), ("attn_out", 768, 768, 3, False), ("mlp_up", 3072, 768, 1, True),
          ("mlp_down", 768, 3072, 3, False), ("upnogelu", 3072, 768, 0, True))   # name, N, K, mode, half out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="tma192s,tma128s,tma128pp")
    ap.add_argument("--m", default="1852,8192,131072")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args()
    vs = a.variants.split(",")
    with torch_kernels(vs) as (torch, k):
        def us(fn):
            fn()
            torch.cuda.synchronize()
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(a.reps):
                fn()
            e1.record()
            e1.synchronize()
            return e0.elapsed_time(e1) / a.reps * 1e3

        print("variants", vs, flush=True)
        for name, N, K, mode, half in (s for s in SHAPES if s[0] in a.shapes.split(",")):
            for M in (int(m) for m in a.m.split(",")):
                A = torch.randn(M, K, device="cuda").half()
                W = (torch.randn(N, K, device="cuda") / K ** 0.5).half()
                C = torch.zeros(M, N, device="cuda", dtype=torch.half if half else torch.float32)
                bias = torch.randn(N, device="cuda")
                outs, line = {}, f"{name:8s} {M:6d}"
                for v in vs:
                    def fn(v=v):
                        k.gemm_f16(None, A.data_ptr(), K, W.data_ptr(), K, C.data_ptr(), N, bias.data_ptr(), M, N, K,
                                   mode, half, variant=v)
                    C.zero_()
                    fn()
                    torch.cuda.synchronize()
                    outs[v] = C.clone()
                    line += f"  {v} {us(fn):7.1f}"
                line += f"  cublas {us(lambda: torch.matmul(A, W.t())):7.1f}"
                differ = [v for v in vs if not torch.equal(outs[v], outs[vs[0]])]
                print(line, "same" if not differ else "DIFFER " + ",".join(differ), flush=True)


if __name__ == "__main__":
    main()
