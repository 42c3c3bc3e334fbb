"""Device time of token selection on a decode step's logits [R, V] (cuda_src/sampling.cu), per settings case:
the greedy argmax, job-wide sampling (sample_rows) and per-row settings (sample_rows_params, w2mix's mix).

  python3 benchmarks/sampling_bench.py [--rows 1024] [--repeats 5] [--out DIR] [--only CASE-TEXT]

Logits are seeded normals: "flat" (std 0.55, what a randomly initialised GPT-2 gives) and "peaky" (std 3).
Bytes: one read of the logits is R * V * 4; a kernel that needs several passes reads them several times (mostly
from L2). Prints ms per call (median of repeats, after a warm-up) and the equivalent logits GB/s; JSON lines to
OUT/sampling.jsonl.
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
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--only", default="", help="run only the cases whose name contains this text (for a profiler)")
    a = ap.parse_args()
    from gpt2job.backends.cuda.rows import RowSel
    with pycuda_kernels() as (drv, K):
        R, V = a.rows, a.vocab
        rng = np.random.default_rng(0)
        gpu = lambda x: to_gpu(drv, x)  # noqa: E731
        keep = []
        rows = gpu(np.arange(R, dtype=np.int64))
        seqidx = gpu(np.arange(R, dtype=np.int32))
        out = drv.mem_alloc(4 * R)

        def params(temp, top_k, top_p):
            arrs = [gpu(np.asarray(x)) for x in (np.arange(R, dtype=np.uint64), np.asarray(temp, np.float64),
                                                 np.asarray(top_p, np.float64), np.asarray(top_k, np.int32),
                                                 np.ones(R, np.float32))]
            keep.extend(arrs)
            return RowSel(*(int(x) for x in arrs), 0, 0, 0)

        mix_rng = np.random.default_rng(3)   # w2mix's rule (benchmarks/workloads.py)
        mt = np.where(mix_rng.random(R) < 1 / 3, 0.0, mix_rng.uniform(0.05, 1.2, R))
        mk = np.where(mix_rng.random(R) < 0.5, 0, 40)
        mp = np.where(mix_rng.random(R) < 0.5, 1.0, 0.9)
        full = lambda v: np.full(R, v)  # noqa: E731
        cases = [
            ("argmax", lambda lg: K.argmax(None, lg, V, V, out, R)),
            ("sample T=1", lambda lg: K.sample(None, lg, V, V, rows, seqidx, 1, 5, 1.0, 0, 1.0, out, R)),
            ("sample T=1 top-k 40", lambda lg: K.sample(None, lg, V, V, rows, seqidx, 1, 5, 1.0, 40, 1.0, out, R)),
            ("sample T=1 top-p 0.9", lambda lg: K.sample(None, lg, V, V, rows, seqidx, 1, 5, 1.0, 0, 0.9, out, R)),
            ("sample T=0.7 k40 p0.9", lambda lg: K.sample(None, lg, V, V, rows, seqidx, 1, 5, 0.7, 40, 0.9, out, R)),
        ]
        sel_t = params(full(1.0), full(0), full(1.0))
        sel_p = params(full(1.0), full(0), full(0.9))
        sel_mix = params(mt, mk, mp)
        cases += [
            ("params T=1", lambda lg: K.sample_params(None, lg, V, V, rows, seqidx, 1, sel_t, out, R)),
            ("params T=1 top-p 0.9", lambda lg: K.sample_params(None, lg, V, V, rows, seqidx, 1, sel_p, out, R)),
            ("params w2mix mix", lambda lg: K.sample_params(None, lg, V, V, rows, seqidx, 1, sel_mix, out, R)),
            # the row read from global memory at each pass (no shared-memory copy): two blocks an SM instead of one
            ("params w2mix, no cache", lambda lg: K.sample_params(None, lg, V, V, rows, seqidx, 1, sel_mix, out, R,
                                                                  cache=False)),
            ("params T=1 p0.9, no cache", lambda lg: K.sample_params(None, lg, V, V, rows, seqidx, 1, sel_p, out, R,
                                                                     cache=False)),
        ]
        os.makedirs(a.out, exist_ok=True)
        print(f"{'logits':<6} {'case':<26} {'ms':>8} {'GB/s':>7}")
        for dist, std in (("flat", 0.55), ("peaky", 3.0)):
            host = (rng.standard_normal((R, V), dtype=np.float32) * std).astype(np.float32)
            lg = gpu(host)
            for name, fn in cases:
                if a.only not in name:
                    continue
                ms, times = event_ms(drv, lambda: fn(lg), a.repeats)
                gbs = R * V * 4 / (ms * 1e-3) / 1e9
                print(f"{dist:<6} {name:<26} {ms:>8.3f} {gbs:>7.0f}", flush=True)
                with open(os.path.join(a.out, "sampling.jsonl"), "a") as f:
                    f.write(json.dumps({"kind": "sampling-bench", "logits": dist, "case": name, "rows": R, "vocab": V,
                                        "ms": ms, "runs_ms": times}) + "\n")
            lg.free()


if __name__ == "__main__":
    main()
