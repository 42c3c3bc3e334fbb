"""Every GPT-2 size against transformers, through the real job: fp32 greedy tokens equal, fp16 beside them.

  python3 benchmarks/sizes_vs_transformers.py [--sizes gpt2,gpt2-medium,gpt2-large,gpt2-xl] [--seed 11]
      [--prompts 1024] [--new 16] [--out DIR]

For each size: seeded random weights of the real shapes (random:SIZE:SEED), exported once as a Hugging Face folder
that both engines read; N prompts of 16 lengths from 1 to 300 tokens in a shuffled order (seeded); greedy,
--ignore-eos. Our job (mpirun, one GPU worker, --backend cuda, default flags) in float32 and float16, so a chunk
mixes every length; transformers in float32 (TF32 off, sdpa) on the prompts of each length as one batch, so no
padding changes its sums. Reports the share of our fp32 tokens equal to transformers' (bar >= 99.95%, as the W1
check's), of rows identical, and of our fp16 tokens equal to our fp32 ones (reported). JSON lines to
OUT/sizes_vs_transformers.jsonl; a table last; exit status 1 when a bar fails.
--backend numpy --reference numpy: the same plumbing on the CPU (fp32 only; no torch needed), e.g.
  --sizes random:n_layer=2,n_head=2,n_embd=64,vocab_size=1000 --prompts 64 --new 4
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import append_jsonl, base_record, print_table, read_output, tokens_matrix  # noqa: E402
from export_weights import export  # noqa: E402
from run_workloads import run_job  # noqa: E402
from gpt2job.model.weights import load_config  # noqa: E402

LENGTHS = (1, 2, 5, 9, 16, 17, 31, 48, 64, 100, 127, 128, 129, 200, 256, 300)


def write_prompts(path, n, vocab, seed):
    """n prompts of LENGTHS, each length n / 16 times, in a shuffled order; returns them."""
    import h5py
    rng = np.random.default_rng(seed)
    lens = rng.permutation(np.resize(np.array(LENGTHS), n))
    prompts = [rng.integers(0, vocab, int(L)).astype(np.int32) for L in lens]
    with h5py.File(path + ".tmp", "w") as f:
        ds = f.create_dataset("prompt_tokens", (n,), dtype=h5py.vlen_dtype(np.int32))
        for i, p in enumerate(prompts):
            ds[i] = p
    os.replace(path + ".tmp", path)
    return prompts


def transformers_tokens(hf_dir, prompts, new):
    """transformers fp32 greedy tokens [N, new], the prompts of one length a batch (no padding)."""
    import torch
    import baselines
    baselines.set_precision(torch, "float32")
    eng = baselines.HFEngine(hf_dir, "cuda" if torch.cuda.is_available() else "cpu", torch.float32)
    out = np.zeros((len(prompts), new), np.int32)
    lens = np.array([len(p) for p in prompts])
    for L in np.unique(lens):
        idx = np.flatnonzero(lens == L)
        out[idx] = eng.generate([prompts[i] for i in idx], new)
    del eng
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def numpy_tokens(model, prompts, new):
    """The NumPy backend's greedy tokens [N, new] in this process (the CPU smoke test's reference)."""
    from gpt2job.backends.base import compute
    from gpt2job.backends.numpy_backend import NumpyBackend
    from gpt2job.chunks import Chunk
    from gpt2job.model.weights import load_params
    from gpt2job.settings import GenerationSettings
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in prompts])])
    chunk = Chunk(0, np.arange(len(prompts)), offsets, np.concatenate(prompts))
    comp = compute(NumpyBackend(load_params(model), GenerationSettings(max_new_tokens=new, ignore_eos=True)), chunk)
    return tokens_matrix([comp.row_tokens(i) for i in range(len(prompts))], new)


def our_tokens(a, inp, hf_dir, dtype, work):
    out, log = os.path.join(work, f"out-{dtype}.h5"), os.path.join(work, f"job-{dtype}.log")
    res = run_job(inp, out, hf_dir, a.backend, dtype, 1, a.new, True, log=log, timeout=a.timeout)
    if res["rc"] != 0:
        print(res.get("log_tail", ""), flush=True)
        raise SystemExit(f"our {dtype} job failed (rc {res['rc']}): {log}")
    return tokens_matrix(read_output(out)[1], a.new), res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="gpt2,gpt2-medium,gpt2-large,gpt2-xl",
                    help="presets, or one random:FIELD=VALUE,... spec without the seed (the CPU smoke test's model)")
    ap.add_argument("--seed", type=int, default=11, help="the weights' seed (random:SIZE:SEED)")
    ap.add_argument("--prompts", type=int, default=1024)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--bar", type=float, default=0.9995)
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--reference", default="transformers", choices=("transformers", "numpy"))
    ap.add_argument("--work", default="/tmp/gpt2job-sizes")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--timeout", type=float, default=900)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    results = os.path.join(a.out, "sizes_vs_transformers.jsonl")
    table, failed = [], False
    for size in [a.sizes] if a.sizes.startswith("random:") else a.sizes.split(","):
        model = (size if size.startswith("random:") else f"random:{size}") + f":{a.seed}"
        work = os.path.join(a.work, model.replace(":", "_").replace(",", "_").replace("=", ""))
        os.makedirs(work, exist_ok=True)
        t0 = time.time()
        hf_dir = export(model, os.path.join(work, "hf"))
        cfg = load_config(hf_dir)
        inp = os.path.join(work, "prompts.h5")
        prompts = write_prompts(inp, a.prompts, cfg.vocab_size, a.seed)
        t1 = time.time()
        ref = (transformers_tokens(hf_dir, prompts, a.new) if a.reference == "transformers"
               else numpy_tokens(hf_dir, prompts, a.new))
        t_ref = time.time() - t1
        f32, r32 = our_tokens(a, inp, hf_dir, "float32", work)
        f16, r16 = our_tokens(a, inp, hf_dir, "float16", work) if a.backend == "cuda" else (None, {"summary": None})
        eq = f32 == ref
        tok, rows = float(eq.mean()), float(eq.all(axis=1).mean())
        agree16 = float((f16 == f32).mean()) if f16 is not None else None
        ok = tok >= a.bar
        failed |= not ok
        bad = np.flatnonzero(~eq.all(axis=1))
        rec = base_record(kind="sizes-vs-transformers", model=model, reference=a.reference, prompts=a.prompts,
                          new=a.new, lengths=list(LENGTHS), fp32_tokens_equal=tok, fp32_rows_identical=rows,
                          bar=a.bar, ok=ok, fp16_tokens_equal_fp32=agree16, rows_differing=bad[:20].tolist(),
                          reference_s=t_ref, ours_fp32_tok_s=(r32["summary"] or {}).get("throughput_tokens_per_s"),
                          ours_fp16_tok_s=(r16["summary"] or {}).get("throughput_tokens_per_s"),
                          seconds=time.time() - t0)
        append_jsonl(results, rec)
        table.append([size, cfg.n_layer, cfg.n_embd, f"{100 * tok:.2f}%", f"{100 * rows:.2f}%",
                      "met" if ok else "FAILED", f"{100 * agree16:.2f}%" if f16 is not None else "-", f"{time.time() - t0:.0f}"])
        print(table[-1], flush=True)
    print()
    print_table(["size", "layers", "n_embd", f"fp32 tokens = {a.reference}", "rows identical",
                 f">= {100 * a.bar:.2f}%", "fp16 tokens = our fp32", "s"], table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
