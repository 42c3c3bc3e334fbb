"""Device time of decode attention (transformer.cu, one warp per (row, head)) against the bytes it must read:
each row reads its keys and values 0..p of every head, (p + 1) * H * D * 2 (K and V) * element size.

  python3 benchmarks/attention_bench.py [--repeats 7] [--out DIR] [--tail]

Shapes: W2's decode (2,048 rows, positions uniform 32..767, GPT-2 124M heads: H 12, D 64, S 768) and a W1 decode
step of a 546-prompt chunk (positions 16..23), fp16, the kernel the runner launches (the grouped one for D 64).
--w1: also W1's 8,192-row decode step in the runner's cache layout (S 24 = 16 prompt + 8 new tokens: a row's keys
are one contiguous run), positions 16..23. --only NAME,...: just those shapes (e.g. "W1 8192", for a profiler).
--tail adds the late steps of a batch that rows leave (the mixed-settings workload's): 1,024, 512, 256, 128 and
64 rows at positions uniform 272..767 (one warp per (row, head): fewer rows, fewer warps an SM), each with the
runner's pick and with 1, 4 and 8 key steps loaded ahead ("k9": 8 a round, the next round's in flight; the
same results).
Prints ms (median after a warm-up) and GB/s of the bytes above; JSON lines to OUT/attention.jsonl.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import event_ms, pycuda_kernels  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--tail", action="store_true", help="also 1,024-64 rows at late positions (see above)")
    ap.add_argument("--w1", action="store_true", help="also W1's 8,192-row step, S 24 (see above)")
    ap.add_argument("--only", default="", help="'name,name': only these shapes")
    a = ap.parse_args()
    with pycuda_kernels() as (drv, K):
        H, D = 12, 64
        C = H * D
        rng = np.random.default_rng(0)
        os.makedirs(a.out, exist_ok=True)
        print(f"{'shape':<10} {'kernel':<10} {'ms':>8} {'GB/s':>7}")
        shapes = [("W2", 2048, 32, 767, 768), ("W1 546", 546, 16, 23, 768)]
        if a.w1:
            shapes += [("W1 8192", 8192, 16, 23, 24)]
        if a.tail:
            shapes += [(f"tail {R}", R, 272, 767, 768) for R in (1024, 512, 256, 128, 64)]
        if a.only:
            shapes = [x for x in shapes if x[0] in a.only.split(",")]
        for shape, R, lo, hi, S in shapes:
            pos = rng.integers(lo, hi + 1, R).astype(np.int32)
            kc = drv.mem_alloc(R * S * C * 2)
            vc = drv.mem_alloc(R * S * C * 2)
            block = (rng.random(1 << 24, np.float32) * 2 - 1).astype(np.float16)   # seeded values in [-1, 1)
            for buf in (kc, vc):   # the block again and again, each copy shifted by 7 values
                n = R * S * C
                for off in range(0, n, len(block) - 7):
                    m = min(len(block), n - off)
                    drv.memcpy_htod(int(buf) + 2 * off, block[:m])
            qkv = drv.to_device((rng.random(R * 3 * C, np.float32) * 2 - 1).astype(np.float16))
            slot = drv.to_device(np.arange(R, dtype=np.int32))
            dpos = drv.to_device(pos)
            nbytes = int((pos.astype(np.int64) + 1).sum()) * H * D * 2 * 2
            out = drv.mem_alloc(R * C * 2)

            # the runner's pick (keys None); the tail shapes also with 1, 4, 8 and 8 + 8 key steps loaded ahead
            for keys in ((None,) if not shape.startswith("tail") else (None, 1, 4, 8, 9)):
                ms, times = event_ms(drv, lambda keys=keys: K.attention(None, True, qkv, kc, vc, slot, 0, dpos, out, R,
                                                                        H, D, S, 0.125, keys=keys), a.repeats)
                kern = "grouped" + ("" if keys is None else f" k{keys}")
                print(f"{shape:<10} {kern:<10} {ms:>8.3f} {nbytes / (ms * 1e-3) / 1e9:>7.0f}", flush=True)
                with open(os.path.join(a.out, "attention.jsonl"), "a") as f:
                    f.write(json.dumps({"kind": "attention-bench", "shape": shape, "kernel": kern, "rows": R,
                                        "bytes": nbytes, "ms": ms, "runs_ms": times}) + "\n")
            for buf in (kc, vc):
                buf.free()


if __name__ == "__main__":
    main()
