"""What a decode step costs at small batches, launched kernel by kernel vs replayed as a CUDA graph
(gpt2job/backends/cuda/graphs.py), and what it must cost: the bytes it has to read (weights + the KV cache).

  python3 benchmarks/graph_probe.py [--rows 137,546,1024,2048,8192] [--dtype float16] [--steps 50]

For each batch of n rows (W1's shape: 16-token prompts, step 1 of 8, positions 16, KV cache of 24 positions):
  eager  wall time per step of n steps launched back to back (host launches + GPU), then synchronised
  gpu    device time per step of the same (CUDA events around the steps)
  graph  wall time per step when each step is one cuGraphLaunch of the captured step
  bytes  weights read once per step + the KV cache rows attention reads, over the H200's ~4.8 TB/s
The graph's tokens are checked against the eager step's (the same inputs: identical). One JSON line per size to
--results. Needs a GPU and pycuda.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="137,546,1024,2048,8192")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--results", default=None)
    a = ap.parse_args()
    from gpt2job.backends.cuda.backend import CudaBackend
    from gpt2job.backends.cuda.graphs import Graph
    from gpt2job.backends.cuda.runner import decode_buffers
    from gpt2job.model.config import PRESETS
    from gpt2job.model.weights import random_params
    from gpt2job.settings import GenerationSettings

    cfg = PRESETS["gpt2"]
    be = CudaBackend(random_params(cfg, 0), GenerationSettings(max_new_tokens=8, ignore_eos=True), dtype=a.dtype)
    dev, model, runner, drv = be.device, be.model, be.runner, be.device.drv
    L, S, step = 16, 24, 1
    wbytes = sum(int(np.prod(s)) for s in [(cfg.n_layer, 12 * cfg.n_embd * cfg.n_embd), (cfg.vocab_size, cfg.n_embd)])
    wbytes *= model.elt
    rows_out = []
    for n in [int(x) for x in a.rows.split(",")]:
        kv = runner.kv_cache(n, S)
        tok_dev, sdev = [dev.buf(name, nb) for name, nb in decode_buffers(n)]
        rows_dev = dev.buf("probe_rows", 8 * n)
        drv.memcpy_htod(rows_dev, np.arange(n, dtype=np.int64))
        drv.memcpy_htod(tok_dev, np.random.default_rng(n).integers(0, cfg.vocab_size, n).astype(np.int32))
        drv.memcpy_htod(sdev, np.concatenate([np.full(n, L + step - 1, np.int32), np.arange(n, dtype=np.int32)]))
        p_out = dev.buf("probe_out", 4 * n)

        def one_step():
            x, _, _ = model.forward(n, tok_dev, sdev, sdev + 4 * n, 0, S, kv)
            model.select(x, n, None, 0, sdev + 4 * n, rows_dev, step, p_out, be.settings.sampling)

        one_step()                      # grows every pool buffer this size needs (no allocation under capture)
        dev.compute.synchronize()
        ref = np.empty(n, np.int32)
        drv.memcpy_dtoh(ref, p_out)
        e0, e1 = drv.Event(), drv.Event()
        t = time.perf_counter()
        e0.record(dev.compute)
        for _ in range(a.steps):
            one_step()
        e1.record(dev.compute)
        e1.synchronize()
        eager_ms = (time.perf_counter() - t) * 1e3 / a.steps
        gpu_ms = e1.time_since(e0) / a.steps
        g = Graph(dev.compute, one_step)
        g.launch()
        dev.compute.synchronize()
        got = np.empty(n, np.int32)
        drv.memcpy_dtoh(got, p_out)
        t = time.perf_counter()
        e0.record(dev.compute)
        for _ in range(a.steps):
            g.launch()
        e1.record(dev.compute)
        e1.synchronize()
        graph_ms = (time.perf_counter() - t) * 1e3 / a.steps
        graph_gpu_ms = e1.time_since(e0) / a.steps
        g.close()
        kvbytes = 2 * cfg.n_layer * n * (L + step) * cfg.n_embd * model.elt
        floor_ms = (wbytes + kvbytes) / 4.8e12 * 1e3
        rec = {"kind": "graph_probe", "dtype": a.dtype, "rows": n, "eager_ms": eager_ms, "eager_gpu_ms": gpu_ms,
               "graph_ms": graph_ms, "graph_gpu_ms": graph_gpu_ms, "bytes_floor_ms": floor_ms,
               "identical": bool((got == ref).all()), "eager_tok_s": n / eager_ms * 1e3,
               "graph_tok_s": n / graph_ms * 1e3}
        rows_out.append(rec)
        print(json.dumps(rec), flush=True)
        if a.results:
            with open(a.results, "a") as f:
                f.write(json.dumps(rec) + "\n")
    be.close()
    print(f"\n{'rows':>6} {'eager ms':>9} {'(gpu)':>7} {'graph ms':>9} {'(gpu)':>7} {'bytes ms':>9} "
          f"{'speed-up':>8} identical")
    for r in rows_out:
        print(f"{r['rows']:>6} {r['eager_ms']:>9.3f} {r['eager_gpu_ms']:>7.3f} {r['graph_ms']:>9.3f} "
              f"{r['graph_gpu_ms']:>7.3f} {r['bytes_floor_ms']:>9.3f} {r['eager_ms'] / r['graph_ms']:>8.2f} "
              f"{r['identical']}")


if __name__ == "__main__":
    main()
