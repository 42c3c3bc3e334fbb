"""Device time of a sampled decode step's LM head and token choice, temperature-only rows (sampling rule 6), by head
rows: the fused head (tempered_keys, the product with the EPI_TEMPERED epilogue, argmax_partials) against the logits
(the product, [M, V] float32 written) and the selection kernel (sample_rows), with the greedy fused head for
reference; and whether the two rule-6 paths chose the same tokens (they must: the same operations in the same order).
This sets backends/cuda/model.py TEMPERED_MIN_ROWS: the fused head from the smallest row count where it is faster.

  python3 benchmarks/tempered_head.py [--rows 546,1024,2048,4096,8192] [--repeats 7] [--out DIR]

GPT-2's head shape (C 768, V 50,257), seeded fp16 operands (the logits' spread about a random GPT-2's); the product
reads the vocabulary matrix (77 MB) from memory each call, as a decode step does. Prints ms per step (median of
repeats after a warm-up), the table last; JSON lines to OUT/tempered_head.jsonl.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import event_ms, pycuda_kernels, to_gpu  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="546,1024,2048,4096,8192")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    a = ap.parse_args()
    from gpt2job.backends.cuda.kernels import EPI_ARGMAX, EPI_BIAS, EPI_TEMPERED, F16_TILES
    from gpt2job.model.sampling import CHUNK
    C, V = 768, 50257
    Vp = (V + 127) // 128 * 128   # the logits' row stride, as backends/cuda/model.py pads it
    T, seed, step = a.temperature, 5, 3
    os.makedirs(a.out, exist_ok=True)
    table = []
    with pycuda_kernels() as (drv, K):
        rng = np.random.default_rng(0)
        gpu = lambda x: to_gpu(drv, x)  # noqa: E731
        W = gpu((rng.standard_normal((V, C), dtype=np.float32) * np.float32(0.55 / np.sqrt(C))).astype(np.float16))
        for M in [int(r) for r in a.rows.split(",")]:
            hl = gpu(rng.standard_normal((M, C), dtype=np.float32).astype(np.float16))
            rows, seqidx = gpu(np.arange(M, dtype=np.int64) * 7), gpu(np.arange(M, dtype=np.int32))
            tile = K.pick_argmax(M, V, C)
            nch, ngr = -(-V // CHUNK), -(-V // F16_TILES[tile].wn)
            part, keys = drv.mem_alloc(M * nch * 8), drv.mem_alloc(M * 8)
            logits = drv.mem_alloc(M * Vp * 4)
            fused_out, sel_out, greedy_out = (drv.mem_alloc(4 * M) for _ in range(3))

            def fused():
                K.tempered_keys(None, rows, seqidx, step, keys, M, seed=seed, temperature=T)
                K.gemm_f16(None, hl, C, W, C, part, nch, None, M, V, C, EPI_TEMPERED, False, variant=tile, qkv=keys)
                K.argmax_partials(None, part, nch, nch, fused_out, M)

            def unfused():
                K.gemm_f16(None, hl, C, W, C, logits, Vp, None, M, V, C, EPI_BIAS, False)
                K.sample(None, logits, Vp, V, rows, seqidx, step, seed, T, 0, 1.0, sel_out, M)

            def greedy():
                K.gemm_f16(None, hl, C, W, C, part, ngr, None, M, V, C, EPI_ARGMAX, False, variant=tile)
                K.argmax_partials(None, part, ngr, ngr, greedy_out, M)

            res = {}
            for name, fn in (("fused", fused), ("unfused", unfused), ("greedy", greedy)):
                res[name] = event_ms(drv, fn, a.repeats)
            got = [np.empty(M, np.int32) for _ in range(2)]
            drv.memcpy_dtoh(got[0], fused_out)
            drv.memcpy_dtoh(got[1], sel_out)
            same = int((got[0] == got[1]).sum())
            line = {"kind": "tempered-head", "rows": M, "tile": tile, "temperature": T,
                    **{f"{k}_ms": v[0] for k, v in res.items()}, **{f"{k}_runs_ms": v[1] for k, v in res.items()},
                    "same_tokens": same}
            with open(os.path.join(a.out, "tempered_head.jsonl"), "a") as f:
                f.write(json.dumps(line) + "\n")
            print(f"rows {M}: fused {res['fused'][0]:.3f} ms, unfused {res['unfused'][0]:.3f}, greedy "
                  f"{res['greedy'][0]:.3f}; tokens the same in {same} of {M}", flush=True)
            table.append((M, res["fused"][0], res["unfused"][0], res["greedy"][0], same))
            for g in (hl, rows, seqidx, part, keys, logits, fused_out, sel_out, greedy_out):
                g.free()
    print(f"\n{'rows':>6} {'fused ms':>9} {'unfused ms':>11} {'fused/unf':>10} {'greedy ms':>10} {'same':>6}")
    for M, f, u, g, s in table:
        print(f"{M:>6} {f:>9.3f} {u:>11.3f} {f / u:>10.3f} {g:>10.3f} {s:>6}")


if __name__ == "__main__":
    main()
