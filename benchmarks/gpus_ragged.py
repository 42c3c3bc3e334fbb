"""Default chunking on 2 GPUs against 1, ragged prompts (issue 14: >= 1.85x with default flags), fp16:

  python3 benchmarks/gpus_ragged.py [--old .old] [--repeats 3] [--prompts 4096]

4,096 prompts, half of 4-32 tokens and half of 256-448 (small_chunks.py's ragged prompts, interleaved), 128 new
tokens, --ignore-eos, no --chunk-size: the real pipeline (mpirun: the master and 1 or 2 GPU workers), one job per
tree and GPU count in turn, --repeats times; the medians, the 2-GPU / 1-GPU ratio, and each worker's chunks, rows,
compute seconds and busy % from the summary of the 2-GPU run with the median throughput. Outputs of 1 and 2 GPUs
are compared token by token (fp16: the same rows in other chunks may differ slightly; the share identical is
printed). JSON lines to OUT/gpus_ragged.jsonl; a table last.
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ROOT, tokens_of  # noqa: E402
from run_workloads import run_job  # noqa: E402
from small_chunks import ragged_prompts  # noqa: E402


def job(tree, gpus, inp, out, model, backend="cuda", new=128):
    r = run_job(inp, out, model, backend, "float16" if backend == "cuda" else "float32", gpus, new, True,
                timeout=600, tree=tree)
    if r["rc"] != 0:
        return {"rc": r["rc"], "tail": r["log_tail"][-1500:]}
    sm = r["summary"]
    chunking = next((ln for ln in r["output"].splitlines() if " ready: chunks" in ln), "")
    return {"rc": 0, "tok_s": sm["throughput_tokens_per_s"], "chunking": chunking.strip(),
            "workers": [{k: w.get(k) for k in ("rank", "chunks", "rows", "compute_s", "busy_percent")}
                        for w in sm["workers"]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", default=None, help="an older tree to compare (git archive COMMIT into a folder)")
    ap.add_argument("--new", default=ROOT)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=4096)
    ap.add_argument("--model", default="random:gpt2")
    ap.add_argument("--work", default="/tmp/gpt2job-gpus")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--smoke", action="store_true", help="CPU check of this script (tiny model, numpy, 64 prompts)")
    a = ap.parse_args()
    be, new = "cuda", 128
    if a.smoke:
        a.model, a.prompts, a.work, be, new = ("random:n_layer=2,n_head=2,n_embd=32,n_positions=1024,vocab_size=50257",
                                               64, a.work + "-smoke", "numpy", 4)
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    inp = os.path.join(a.work, f"ragged-{a.prompts}.h5")
    if not os.path.isfile(inp):
        ragged_prompts(inp, n=a.prompts)
    trees = {"new": a.new, **({"old": a.old} if a.old else {})}
    outs = {(t, g): os.path.join(a.work, f"out-{t}-{g}.h5") for t in trees for g in (1, 2)}
    for t, tree in trees.items():   # warm the kernel cache and the page cache; not counted
        job(tree, 1, inp, outs[t, 1], a.model, be, new)
    runs = {k: [] for k in outs}
    for i in range(a.repeats):
        for (t, g), out in outs.items():
            r = job(trees[t], g, inp, out, a.model, be, new)
            print(f"{t} {g} GPU(s) #{i}: " + (f"{r['tok_s']:,.0f} tok/s, workers {r['workers']}" if r["rc"] == 0
                                              else f"rc {r['rc']}\n{r['tail']}"), flush=True)
            if r["rc"] == 0:
                runs[t, g].append(r)
    print("\ntree  GPUs   tok/s (median)  x 1 GPU  workers: chunks / rows / compute s / busy %   same tokens as 1 GPU")
    for t in trees:
        one = statistics.median(r["tok_s"] for r in runs[t, 1]) if runs[t, 1] else None
        for g in (1, 2):
            rs = runs[t, g]
            if not rs:
                print(f"{t:5s} {g:4d}   failed")
                continue
            med = statistics.median(r["tok_s"] for r in rs)
            mid = min(rs, key=lambda r: abs(r["tok_s"] - med))
            same = None
            if g == 2:
                ta, tb = tokens_of(outs[t, 1]), tokens_of(outs[t, 2])
                same = sum(x.tolist() == y.tolist() for x, y in zip(ta, tb)) / len(ta)
            rec = {"kind": "gpus-ragged", "tree": t, "gpus": g, "prompts": a.prompts, "tok_s": med,
                   "ratio_to_1": med / one if one else None, "runs": [r["tok_s"] for r in rs],
                   "workers": mid["workers"], "chunking": mid["chunking"], "same_tokens_as_1gpu": same}
            with open(os.path.join(a.out, "gpus_ragged.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
            ws = "; ".join(f"{w['chunks']} / {w['rows']} / {w['compute_s']} / {w['busy_percent']}"
                           for w in mid["workers"])
            print(f"{t:5s} {g:4d} {med:16,.0f} {rec['ratio_to_1'] or 0:8.3f}  {ws}"
                  + (f"   {same:.3f}" if same is not None else ""))
        print(f"      chunking: {runs[t, 2][0]['chunking'] if runs[t, 2] else '-'}")


if __name__ == "__main__":
    main()
