"""Write the benchmark workloads of the performance issue as gpt2job input files (dataset prompt_tokens).

  python3 benchmarks/workloads.py DIR [--seed-workload PATH] [--which w1,w2,w3]

  w1.h5      W1: the seed workload, 8,192 prompts x 16 tokens (2-D int32)          run with 8 new tokens
  w2.h5      W2: 2,048 prompts, lengths uniform 32..512, tokens uniform [0, 50257)  256 new tokens, --ignore-eos
             (vlen int32, numpy seed 2)
  w3.h5      W3: W1 repeated 8 times, 65,536 x 16 (2-D int32)                     8 new tokens
  w1x4.h5    W1 with each prompt 4 times in a row (adjacent), 32,768 x 16: what `--num-samples 4` on W1 replaces
  w2mix.h5   W2's prompts with per-row settings (numpy seed 3): max_new_tokens uniform 1..256, temperature 0 on a
             third of the rows and uniform 0.05..1.2 on the rest, top_k 0/40, top_p 1/0.9, seed = row, stop strings
             ([".", " the"] or ["\n"]) on half the rows                      --ignore-eos
  warmup.h5  64 prompts of W1, for the kernel-cache warm-up job
  workloads.json  what was written (sizes, the seed workload's path or 'random(seed=0)', new tokens, flags)

The seed workload is read from --seed-workload, $GPT2JOB_SEED_WORKLOAD, .device/seed-workload/input.bin or
../shared/seed-workload/input.bin; without it W1/W3 are seeded random 16-token prompts. The files are derived
from the seed workload, so keep DIR outside the repository (default scripts use /tmp).
--n-w1/--n-w2/--w2-min/--w2-max/--w3-repeat shrink the workloads for CPU smoke tests.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import WORKLOADS, load_seed_prompts  # noqa: E402


def write_2d(path, toks):
    import h5py
    with h5py.File(path + ".tmp", "w") as f:
        f.create_dataset("prompt_tokens", data=np.ascontiguousarray(toks, np.int32))
    os.replace(path + ".tmp", path)


def write_vlen(path, rows):
    import h5py
    with h5py.File(path + ".tmp", "w") as f:
        ds = f.create_dataset("prompt_tokens", (len(rows),), dtype=h5py.vlen_dtype(np.int32))
        ds[...] = np.array([np.asarray(r, np.int32) for r in rows] + [None], dtype=object)[:-1]
    os.replace(path + ".tmp", path)


def w2_prompts(n=2048, lo=32, hi=512, seed=2, vocab=50257):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, n)
    return [rng.integers(0, vocab, int(L)).astype(np.int32) for L in lengths]


def mixed_settings(n, seed=3):
    """The mixed-settings workload's per-row datasets for n rows: {name: array}, and each row's stop strings."""
    rng = np.random.default_rng(seed)
    temp = rng.uniform(0.05, 1.2, n).astype(np.float32)
    temp[rng.random(n) < 1 / 3] = 0.0
    stop = np.array([["", ""]] * n, dtype=object)
    pick = rng.random(n)
    stop[pick < 0.25] = [".", " the"]
    stop[(pick >= 0.25) & (pick < 0.5), 0] = "\n"
    cols = {"max_new_tokens": rng.integers(1, 257, n).astype(np.int32), "temperature": temp,
            "top_k": np.where(rng.random(n) < 0.5, 40, 0).astype(np.int32),
            "top_p": np.where(rng.random(n) < 0.5, 0.9, 1.0).astype(np.float32), "seed": np.arange(n, dtype=np.int64)}
    return cols, stop


def write_mixed(path, rows, seed=3):
    """rows (W2's prompts) with the per-row settings datasets of the mixed-settings workload."""
    import h5py
    cols, stop = mixed_settings(len(rows), seed)
    with h5py.File(path + ".tmp", "w") as f:
        ds = f.create_dataset("prompt_tokens", (len(rows),), dtype=h5py.vlen_dtype(np.int32))
        ds[...] = np.array([np.asarray(r, np.int32) for r in rows] + [None], dtype=object)[:-1]
        for name, col in cols.items():
            f[name] = col
        f.create_dataset("stop", data=stop, dtype=h5py.string_dtype())
    os.replace(path + ".tmp", path)


def make(outdir, which=("w1", "w2", "w3"), seed_workload=None, n_w1=8192, n_w2=2048, w2_min=32, w2_max=512,
         w3_repeat=8, vocab=50257):
    os.makedirs(outdir, exist_ok=True)
    w1, source = load_seed_prompts(seed_workload, n=n_w1)
    if vocab < 50257:   # tiny test models: keep token ids in range
        w1 = w1 % vocab
    meta = {"seed_workload": source, "workloads": {}}
    for name in which:
        path = os.path.join(outdir, WORKLOADS[name]["file"])
        if name == "w1":
            write_2d(path, w1)
            n, ntok = len(w1), w1.size
        elif name == "w2":
            rows = w2_prompts(n_w2, w2_min, w2_max, vocab=vocab)
            write_vlen(path, rows)
            n, ntok = len(rows), int(sum(len(r) for r in rows))
        elif name == "w2mix":
            rows = w2_prompts(n_w2, w2_min, w2_max, vocab=vocab)
            write_mixed(path, rows)
            n, ntok = len(rows), int(sum(len(r) for r in rows))
        elif name == "w1x4":
            x4 = np.repeat(w1, 4, axis=0)       # prompt i at rows 4i..4i+3
            write_2d(path, x4)
            n, ntok = len(x4), x4.size
        elif name == "w3":
            w3 = np.tile(w1, (w3_repeat, 1))
            write_2d(path, w3)
            n, ntok = len(w3), w3.size
        else:
            raise SystemExit(f"unknown workload {name!r}")
        meta["workloads"][name] = {"path": path, "prompts": n, "prompt_tokens": ntok,
                                   "max_new_tokens": WORKLOADS[name]["max_new_tokens"],
                                   "ignore_eos": WORKLOADS[name]["ignore_eos"], "what": WORKLOADS[name]["what"]}
        print(f"wrote {path}: {n} prompts, {ntok} prompt tokens", flush=True)
    write_2d(os.path.join(outdir, "warmup.h5"), w1[:64])
    with open(os.path.join(outdir, "workloads.json"), "w") as f:
        json.dump(meta, f, indent=2)
    print(f"prompts of W1/W3 from: {source}", flush=True)
    return meta


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir")
    ap.add_argument("--which", default="w1,w2,w3")
    ap.add_argument("--seed-workload", help="the seed workload's input.bin (int32 [8192, 16])")
    ap.add_argument("--n-w1", type=int, default=8192)
    ap.add_argument("--n-w2", type=int, default=2048)
    ap.add_argument("--w2-min", type=int, default=32)
    ap.add_argument("--w2-max", type=int, default=512)
    ap.add_argument("--w3-repeat", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50257, help="token ids modulo this (tiny test models only)")
    a = ap.parse_args()
    make(a.outdir, [w.strip() for w in a.which.split(",") if w.strip()], a.seed_workload, a.n_w1, a.n_w2,
         a.w2_min, a.w2_max, a.w3_repeat, a.vocab)


if __name__ == "__main__":
    main()
