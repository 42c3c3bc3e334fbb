"""The greedy fp16 LM head alone (the product with the (max, argmax) epilogue, GPT-2 124M shapes, seeded weights)
on each named tile, three ways: launched back to back (eager), replayed as a CUDA graph, and replayed with
programmatic dependent launch between its kernels (as the runner replays decode steps on Hopper). GPU ms a head,
median of --reps rounds of 8 heads after one (bench_common.event_ms). (The kernels_bench.py --profile figure,
events around every launch inside a W1 chunk, put tma128pp 12% under tma192p; alone, and in whole replayed steps,
the two are within a few %: RESULTS.md, session 49.)

  python3 benchmarks/head_probe.py [--rows 8192,2048,546] [--tiles tma192p,tma128pp] [--reps 10] [--out DIR]

JSON lines to OUT/head_probe.jsonl; a table last. Needs a GPU and pycuda.
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import append_jsonl, base_record, event_ms, print_table  # noqa: E402

MODES = ("eager", "graph", "graph+pdl")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="8192,2048,546")
    ap.add_argument("--tiles", default="tma192p,tma128pp")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    a = ap.parse_args()
    from gpt2job.backends.cuda.backend import CudaBackend
    from gpt2job.backends.cuda.graphs import Graph
    from gpt2job.backends.cuda.kernels import EPI_ARGMAX, F16_TILES
    from gpt2job.model.config import PRESETS
    from gpt2job.model.weights import random_params
    from gpt2job.settings import GenerationSettings
    os.makedirs(a.out, exist_ok=True)
    tiles = a.tiles.split(",")
    be = CudaBackend(random_params(PRESETS["gpt2"], 0), GenerationSettings(max_new_tokens=8, ignore_eos=True),
                     dtype="float16")
    dev, model, k = be.device, be.model, be.kernels
    drv, st = dev.drv, dev.compute
    C, V = model.cfg.n_embd, model.V
    rng = np.random.default_rng(0)
    rows = []
    try:
        for M in (int(r) for r in a.rows.split(",")):
            A = dev.upload(rng.standard_normal((M, C)), np.float16)
            res = {}
            for v in tiles:
                nch = -(-V // F16_TILES[v].wn)
                part = dev.upload(np.zeros((M, nch, 2)), np.float32)

                def eight(v=v, nch=nch, part=part):
                    for _ in range(8):
                        k.gemm_f16(st, A, C, model.head_w, C, part, nch, None, M, V, C, EPI_ARGMAX, False, variant=v)
                eight()
                st.synchronize()
                for mode in MODES:
                    g = None if mode == "eager" else Graph(st, eight, pdl=mode == "graph+pdl")
                    ms, _ = event_ms(drv, eight if g is None else g.launch, a.reps, stream=st)
                    if g is not None:
                        g.close()
                    res[v, mode] = ms / 8
                    append_jsonl(os.path.join(a.out, "head_probe.jsonl"),
                                 base_record(bench="head_probe", rows=M, tile=v, mode=mode, ms=round(res[v, mode], 4)))
            for mode in MODES:
                rows.append([M, mode, *(f"{res[v, mode]:.4f}" for v in tiles),
                             *(f"{res[v, mode] / res[tiles[0], mode]:.3f}" for v in tiles[1:])])
    finally:
        be.close()
    print_table(["rows", "mode", *(f"{v} ms" for v in tiles), *(f"{v} / {tiles[0]}" for v in tiles[1:])], rows)


if __name__ == "__main__":
    main()
