"""A/B of two source trees on one GPU, in one run: the same jobs through each tree's real pipeline (mpirun, master
+ one GPU worker), interleaved old/new, repeats taken as the median; then the completion tokens of each old/new
pair compared. For refactors: "token-identical, no speed loss" measured in one device call.

  git archive 6ebac9a | (mkdir -p .old && tar -x -C .old)      # the old tree (ignored folder, carried)
  python3 benchmarks/ab_trees.py --old .old [--new .] [--repeats 3] [--out DIR] [--cases "W1 fp16,W2 fp16"]

Speed cases (--no-dedup: every prompt computed): W1 fp16, W1 fp32, W2 fp16, W1 fp16 sampled at temperature 1 (no
top-k / top-p, seed 7), W1 fp16 logprobs5 (--top-logprobs 5: the log-probabilities compared bit for bit too), W1x4
fp16 one chunk (W1's prompts 4 times over, workloads.py w1x4, as one chunk of 32,768).
Token cases: each speed case, W2 fp32, W1 sampled (temperature 0.8, top-k 40, top-p 0.9, seed 7) in fp16 and fp32,
and the tiny checkpoints of tests/fixtures (EOS stops on) in cuda fp32/fp16 and numpy.
Prints a table last; JSON lines to OUT/ab.jsonl.

--features adds speed cases that only the new tree can run (the same repeats, interleaved with nothing), each set
against a speed case of the new tree measured above: the mixed-settings workload (W2's prompts with per-row
max_new_tokens, temperature, top-k/top-p, seeds and stop strings: benchmarks/workloads.py w2mix) against W2 fp16;
W1 x4 sampled (W1 with each prompt 4 times in a row: workloads.py w1x4; temperature 0.8, top-k 40, seed 7) against
W1 fp16, the same without prefix sharing (GPT2JOB_PREFIX_SHARE=0) against it, and W1 with --num-samples 4 (same
sampling) against W1 x4 sampled: the ratio n=4 / x4 is the shared-prefill check of --num-samples; W1 fp16 with
--logprobs and with --top-logprobs 5 against W1 fp16 (the cost of log-probabilities).
"""
import argparse
import os
import statistics
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ROOT, append_jsonl, same_tokens  # noqa: E402
from run_workloads import run_job  # noqa: E402


def run(tree, inp, out, model, extra, backend, log=None, env=None):
    """One job of `tree` on one GPU, its flags in extra."""
    r = run_job(inp, out, model, backend, None, 1, None, False, log=log, timeout=900, extra=extra, env=env, tree=tree)
    if r["rc"] != 0:
        return {"rc": r["rc"], "tail": r["log_tail"][-1500:]}
    sm = r["summary"]
    return {"rc": 0, "tput": sm.get("throughput_tokens_per_s"), "ready": sm.get("time_to_ready_s"),
            "tokens": sm.get("generated_tokens")}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", default=ROOT)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default="/tmp/gpt2job-ab")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--model", default="random:gpt2")
    ap.add_argument("--features", action="store_true", help="also the new tree's feature cases (see above)")
    ap.add_argument("--cases", default="", help="only these cases (names, comma-separated; default: all)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of this script: a tiny model, tiny workloads, the numpy backend, float32 only")
    a = ap.parse_args()
    backend = "numpy" if a.smoke else "cuda"
    if a.smoke:
        a.model, a.work = "random:n_layer=2,n_head=2,n_embd=32,n_positions=1024,vocab_size=50257:1", a.work + "-smoke"
    os.makedirs(a.out, exist_ok=True)
    logs = os.path.join(a.work, "logs")
    os.makedirs(logs, exist_ok=True)
    res_path = os.path.join(a.out, "ab.jsonl")
    hf = os.path.join(a.work, "hf-model")
    wl = os.path.join(a.work, "workloads")
    py = [sys.executable]
    if not os.path.isfile(os.path.join(hf, "config.json")):
        subprocess.run(py + [os.path.join(ROOT, "benchmarks", "export_weights.py"), hf, "--model", a.model], check=True)
    small = ["--n-w1", "48", "--n-w2", "6", "--w2-min", "4", "--w2-max", "24"] if a.smoke else []
    if not os.path.isfile(os.path.join(wl, "w2.h5")):
        subprocess.run(py + [os.path.join(ROOT, "benchmarks", "workloads.py"), wl, "--which", "w1,w2", *small],
                       check=True)
    if (a.features or "W1x4" in a.cases or not a.cases) and not all(
            os.path.isfile(os.path.join(wl, f)) for f in ("w2mix.h5", "w1x4.h5")):
        subprocess.run(py + [os.path.join(ROOT, "benchmarks", "workloads.py"), wl, "--which", "w2mix,w1x4", *small],
                       check=True)
    # the tiny checkpoints' prompts, as an input file
    tiny_in = os.path.join(a.work, "tiny.h5")
    d = np.load(os.path.join(ROOT, "tests", "fixtures", "tiny_expected.npz"))
    import h5py
    with h5py.File(tiny_in, "w") as f:
        off, tok = d["prompt_offsets"], d["prompt_tokens"]
        ds = f.create_dataset("prompt_tokens", (len(off) - 1,), dtype=h5py.vlen_dtype(np.int32))
        for i in range(len(off) - 1):
            ds[i] = tok[off[i]:off[i + 1]].astype(np.int32)
    tiny_model = os.path.join(ROOT, "tests", "fixtures", "tiny-hf")
    w1, w2 = os.path.join(wl, "w1.h5"), os.path.join(wl, "w2.h5")
    speed = {   # name -> (input, flags)
        "W1 fp16": (w1, ["--dtype", "float16", "--max-new-tokens", "8", "--no-dedup"]),
        "W1 fp32": (w1, ["--dtype", "float32", "--max-new-tokens", "8", "--no-dedup"]),
        "W2 fp16": (w2, ["--dtype", "float16", "--max-new-tokens", "256", "--ignore-eos"]),
        "W1 fp16 T=1": (w1, ["--dtype", "float16", "--max-new-tokens", "8", "--no-dedup", "--temperature", "1",
                             "--seed", "7"]),
        # --logprobs --top-logprobs 5 (log-probabilities compared bit for bit too: bench_common.same_tokens)
        "W1 fp16 logprobs5": (w1, ["--dtype", "float16", "--max-new-tokens", "8", "--no-dedup", "--top-logprobs", "5"]),
        # one chunk of 32,768 prompts (4 preferred chunks: what a chunk of cheap rows may hold, scheduler.py)
        "W1x4 fp16 one chunk": (os.path.join(wl, "w1x4.h5"), ["--dtype", "float16", "--max-new-tokens", "8",
                                                              "--no-dedup", "--chunk-size", "32768"]),
    }
    once = {
        "W2 fp32": (hf, w2, ["--dtype", "float32", "--max-new-tokens", "256", "--ignore-eos"], "cuda"),
        "W1 fp16 sampled": (hf, w1, ["--dtype", "float16", "--max-new-tokens", "8", "--temperature", "0.8",
                                     "--top-k", "40", "--top-p", "0.9", "--seed", "7"], "cuda"),
        "W1 fp32 sampled": (hf, w1, ["--dtype", "float32", "--max-new-tokens", "8", "--temperature", "0.8",
                                     "--top-k", "40", "--top-p", "0.9", "--seed", "7"], "cuda"),
        "tiny cuda fp32 eos": (tiny_model, tiny_in, ["--dtype", "float32", "--max-new-tokens", "12"], "cuda"),
        "tiny cuda fp16 eos": (tiny_model, tiny_in, ["--dtype", "float16", "--max-new-tokens", "12"], "cuda"),
        "tiny numpy eos": (tiny_model, tiny_in, ["--max-new-tokens", "12"], "numpy"),
    }
    # new tree only: name -> (input, flags, the new tree's case it is set against[, environment]), in order (a case
    # may be set against a feature case above it)
    sampled = ["--dtype", "float16", "--max-new-tokens", "8", "--temperature", "0.8", "--top-k", "40", "--seed", "7"]
    features = {
        "W2 fp16 mixed": (os.path.join(wl, "w2mix.h5"), ["--dtype", "float16", "--max-new-tokens", "256",
                                                          "--ignore-eos"], "W2 fp16"),
        # --num-samples 4 against the same prompts written 4 times in a row (whose prefill the CUDA backend's
        # prefix sharing shares too: adjacent copies land in one chunk), and against those without prefix sharing
        "W1 fp16 x4 sampled": (os.path.join(wl, "w1x4.h5"), sampled, "W1 fp16"),
        "W1 fp16 x4 unshared": (os.path.join(wl, "w1x4.h5"), sampled, "W1 fp16 x4 sampled",
                                {"GPT2JOB_PREFIX_SHARE": "0"}),
        "W1 fp16 n=4": (w1, sampled + ["--num-samples", "4"], "W1 fp16 x4 sampled"),
        # --logprobs: the LM head writes logits and a kernel reads them, instead of the fused greedy argmax
        "W1 fp16 logprobs": (w1, speed["W1 fp16"][1] + ["--logprobs"], "W1 fp16"),
        "W1 fp16 top-5": (w1, speed["W1 fp16"][1] + ["--top-logprobs", "5"], "W1 fp16"),
    } if a.features else {}
    if a.smoke:
        features = {k.replace("fp16", "fp32"): (i, ["--dtype", "float32"] + f[2:], ref.replace("fp16", "fp32"), *more)
                    for k, (i, f, ref, *more) in features.items()}
        for cases in (speed, once):
            for k in [k for k in cases if "fp16" in k or "cuda" in k]:
                del cases[k]
        once = {k: (m, i, f, backend) for k, (m, i, f, _b) in once.items()}
    if a.cases:
        keep = set(a.cases.split(","))
        speed, once, features = ({k: v for k, v in d.items() if k in keep} for d in (speed, once, features))
    trees = {"old": a.old, "new": a.new}
    out = lambda tag, name, i=0: os.path.join(a.work, f"{tag}-{name.replace(' ', '_')}-{i}.h5")  # noqa: E731
    for tag, tree in trees.items():   # compile caches warm, for both dtypes
        for dt in (("float32",) if a.smoke else ("float16", "float32")):
            r = run(tree, os.path.join(wl, "warmup.h5"), out(tag, "warmup-" + dt), hf,
                    ["--dtype", dt, "--max-new-tokens", "2"], backend=backend,
                    log=os.path.join(logs, f"{tag}-warmup-{dt}.log"))
            print(f"warm-up {tag} {dt}: rc {r['rc']} ready {r.get('ready')}", flush=True)
    rows = []
    for name, (inp, flags) in speed.items():
        got = {"old": [], "new": []}
        for i in range(a.repeats):
            for tag in (("old", "new") if i % 2 == 0 else ("new", "old")):
                r = run(trees[tag], inp, out(tag, name, i), hf, flags, backend=backend,
                        log=os.path.join(logs, f"{tag}-{name.replace(' ', '_')}-{i}.log"))
                got[tag].append(r)
                print(f"{name} #{i} {tag}: {r}", flush=True)
        ok = all(r["rc"] == 0 for t in got.values() for r in t)
        ident, ndiff = same_tokens(out("old", name), out("new", name)) if ok else (False, None)
        med = {t: statistics.median(r["tput"] for r in got[t]) if ok else None for t in got}
        rdy = {t: statistics.median(r["ready"] for r in got[t]) if ok else None for t in got}
        rec = {"case": name, "old_tok_s": med["old"], "new_tok_s": med["new"],
               "ratio": med["new"] / med["old"] if ok else None, "old_ready_s": rdy["old"], "new_ready_s": rdy["new"],
               "runs": {t: [r.get("tput") for r in got[t]] for t in got}, "identical": ident, "rows_differ": ndiff}
        rows.append(rec)
        append_jsonl(res_path, {"kind": "ab", **rec})
    for name, (inp, flags, ref, *env) in features.items():
        got = [run(a.new, inp, out("new", name, i), hf, flags, backend=backend,
                   log=os.path.join(logs, f"new-{name.replace(' ', '_').replace('=', '')}-{i}.log"),
                   env=env[0] if env else None) for i in range(a.repeats)]
        for i, r in enumerate(got):
            print(f"{name} #{i} new: {r}", flush=True)
        base = next((r for r in rows if r["case"] == ref), None)
        ok = all(r["rc"] == 0 for r in got) and base is not None and base["new_tok_s"]
        med = statistics.median(r["tput"] for r in got) if ok else None
        rec = {"case": name, "old_tok_s": None, "new_tok_s": med, "ratio": med / base["new_tok_s"] if ok else None,
               "against": ref, "old_ready_s": None, "new_ready_s": statistics.median(r["ready"] for r in got) if ok
               else None, "runs": {"new": [r.get("tput") for r in got]}, "identical": True, "rows_differ": 0,
               "tail": [r.get("tail") for r in got if r["rc"]]}
        rows.append(rec)
        append_jsonl(res_path, {"kind": "ab-feature", **rec})
    for name, (model, inp, flags, backend) in once.items():
        r = {t: run(trees[t], inp, out(t, name), model, flags, backend=backend,
                    log=os.path.join(logs, f"{t}-{name.replace(' ', '_')}.log")) for t in trees}
        ok = all(x["rc"] == 0 for x in r.values())
        ident, ndiff = same_tokens(out("old", name), out("new", name)) if ok else (False, None)
        rec = {"case": name, "identical": ident, "rows_differ": ndiff,
               "rc": {t: x["rc"] for t, x in r.items()}, "tail": {t: x.get("tail") for t, x in r.items() if x["rc"]}}
        rows.append(rec)
        append_jsonl(res_path, {"kind": "ab", **rec})
    print("\ncase                 old tok/s    new tok/s   new/old  ready old/new (s)  tokens identical")
    for r in rows:
        if "against" in r:
            ratio = f"{r['ratio']:.3f}" if r["ratio"] else "-"
            print(f"{r['case']:<20} {'':>10} {r['new_tok_s'] or 0:>12,.0f} {ratio:>9}  (new / new {r['against']})  "
                  f"ready {r['new_ready_s'] or 0:.2f}")
        elif "ratio" in r:
            ratio = f"{r['ratio']:.3f}" if r["ratio"] else "-"
            print(f"{r['case']:<20} {r['old_tok_s'] or 0:>10,.0f} {r['new_tok_s'] or 0:>12,.0f} {ratio:>9}  "
                  f"{r['old_ready_s'] or 0:>6.2f} / {r['new_ready_s'] or 0:<6.2f}    {r['identical']} "
                  f"({r['rows_differ']} rows differ)")
        else:
            print(f"{r['case']:<20} {'':>10} {'':>12} {'':>9}  {'':>15}    {r['identical']} "
                  f"({r['rows_differ']} rows differ) rc {r['rc']}")
    return 0 if all(r["identical"] and not r.get("tail") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
