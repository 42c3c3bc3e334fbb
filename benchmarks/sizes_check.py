"""Every GPT-2 size on the GPU: our CUDA backend (float32 and float16) against the NumPy reference.

For each size (random seeded weights of the real shapes), a few prompts of mixed lengths, greedy:
prints whether CUDA float32 tokens equal the NumPy backend's, and the share of float16 tokens equal.

    python3 benchmarks/sizes_check.py [--sizes gpt2,gpt2-medium,gpt2-large,gpt2-xl] [--prompts 6]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt2job.backends.base import compute
from gpt2job.backends.numpy_backend import NumpyBackend
from gpt2job.chunks import Chunk
from gpt2job.model.config import PRESETS
from gpt2job.model.weights import random_params
from gpt2job.settings import GenerationSettings


def tokens(backend, chunk):
    comp = compute(backend, chunk)
    return [comp.row_tokens(i).tolist() for i in range(len(comp.rows))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="gpt2,gpt2-medium,gpt2-large,gpt2-xl")
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new", type=int, default=4)
    a = ap.parse_args()
    from gpt2job.backends.cuda.backend import CudaBackend
    rng = np.random.default_rng(0)
    rows = []
    for name in a.sizes.split(","):
        cfg = PRESETS[name]
        t = time.time()
        params = random_params(cfg, seed=1)
        prompts = [rng.integers(0, cfg.vocab_size, rng.integers(3, 21)).astype(np.int32) for _ in range(a.prompts)]
        offsets = np.concatenate([[0], np.cumsum([len(p) for p in prompts])])
        chunk = Chunk(0, np.arange(a.prompts), offsets, np.concatenate(prompts))
        gs = GenerationSettings(max_new_tokens=a.new, ignore_eos=True)
        ref = tokens(NumpyBackend(params, gs), chunk)
        got = {}
        for dtype in ("float32", "float16"):
            b = CudaBackend(params, gs, dtype=dtype)
            got[dtype] = tokens(b, chunk)
            b.close()
        flat = lambda x: [t for r in x for t in r]  # noqa: E731
        eq16 = np.mean(np.array(flat(got["float16"])) == np.array(flat(ref)))
        rows.append((name, cfg.n_layer, cfg.n_embd, cfg.n_head, got["float32"] == ref, eq16, time.time() - t))
        print(rows[-1], flush=True)
    print(f"\n{'size':12s} {'layers':>6s} {'n_embd':>6s} {'heads':>5s}  {'cuda fp32 = numpy':>17s}  "
          f"{'fp16 tokens = numpy':>19s}  {'s':>5s}")
    for name, nl, c, h, ok, eq, s in rows:
        print(f"{name:12s} {nl:6d} {c:6d} {h:5d}  {str(ok):>17s}  {100 * eq:18.1f}%  {s:5.1f}")


if __name__ == "__main__":
    main()
