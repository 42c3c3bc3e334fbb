"""Where the mixed-settings workload (benchmarks/workloads.py w2mix) loses speed against W2: the same job with one
of its settings taken away at a time, through the real pipeline (mpirun, master + one GPU worker), fp16.

  python3 benchmarks/mix_breakdown.py [--repeats 1] [--out DIR] [--trees 'old=.old;new=.'] [--cases 'mixed;W2, 256 new']

  mixed            w2mix as it is: per-row max_new_tokens 1..256, temperature 0..1.2, top-k/top-p, stop strings
  no top-k/top-p   without the top_k and top_p datasets: the mixed workload as issue 13 states it (per-row
                   max_new_tokens 1..256, temperature 0..1.2, stop strings; and seeds)
  no stops         without the stop dataset
  greedy, ragged   without stops, temperature 0 everywhere: per-row max_new_tokens only (the fused greedy head)
  W2, 128 new      W2's prompts, every row 128 new tokens (about the mixed rows' mean), --ignore-eos
  W2, 256 new      W2 itself
Prints tok/s of each and its ratio to W2; JSON lines to OUT/mix.jsonl. With --trees, every case runs in each
source tree in turn (repeats interleaved), and each tree's tokens of the first repeat are compared with the first
tree's.
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from ab_trees import run  # noqa: E402
from bench_common import ROOT, same_tokens  # noqa: E402


def variant(src, dst, drop=(), greedy=False):
    import h5py
    import numpy as np
    shutil.copy(src, dst)
    with h5py.File(dst, "a") as f:
        for name in drop:
            del f[name]
        if greedy:
            f["temperature"][...] = np.zeros(f["temperature"].shape, np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--work", default="/tmp/gpt2job-mix")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--smoke", action="store_true", help="CPU check of this script (tiny model and workloads, numpy)")
    ap.add_argument("--trees", default="", help="'name=path;...': source trees to compare (default: this one)")
    ap.add_argument("--keep-logs", action="store_true", help="each job's output in OUT/logs/ (with GPT2JOB_TRACE=1: "
                                                               "benchmarks/job_ends.py reads them)")
    ap.add_argument("--cases", default="", help="'name;name': only these cases (default: all; W2, 256 new is the base)")
    a = ap.parse_args()
    model, be, small, dt = "random:gpt2", "cuda", [], "float16"
    if a.smoke:
        model, be, dt = "random:n_layer=2,n_head=2,n_embd=32,n_positions=1024,vocab_size=50257:1", "numpy", "float32"
        small, a.work = ["--n-w1", "48", "--n-w2", "6", "--w2-min", "4", "--w2-max", "24"], a.work + "-smoke"
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.work, exist_ok=True)
    py, hf, wl = [sys.executable], os.path.join(a.work, "hf-model"), os.path.join(a.work, "workloads")
    if not os.path.isfile(os.path.join(hf, "config.json")):
        subprocess.run(py + [os.path.join(ROOT, "benchmarks", "export_weights.py"), hf, "--model", model],
                       check=True)
    if not os.path.isfile(os.path.join(wl, "w2mix.h5")):
        subprocess.run(py + [os.path.join(ROOT, "benchmarks", "workloads.py"), wl, "--which", "w2,w2mix", *small],
                       check=True)
    mix, w2 = os.path.join(wl, "w2mix.h5"), os.path.join(wl, "w2.h5")
    nostop, greedy = os.path.join(a.work, "nostop.h5"), os.path.join(a.work, "greedy.h5")
    nocut = os.path.join(a.work, "nocut.h5")
    variant(mix, nocut, drop=("top_k", "top_p"))
    variant(mix, nostop, drop=("stop",))
    variant(mix, greedy, drop=("stop",), greedy=True)
    f16 = ["--dtype", dt, "--ignore-eos"]
    cases = [("mixed", mix, f16 + ["--max-new-tokens", "256"]),
             ("no top-k/top-p", nocut, f16 + ["--max-new-tokens", "256"]),
             ("no stops", nostop, f16 + ["--max-new-tokens", "256"]),
             ("greedy, ragged", greedy, f16 + ["--max-new-tokens", "256"]),
             ("W2, 128 new", w2, f16 + ["--max-new-tokens", "128"]), ("W2, 256 new", w2, f16 + ["--max-new-tokens", "256"])]
    if a.cases:
        cases = [c for c in cases if c[0] in a.cases.split(";")]
    run(ROOT, os.path.join(wl, "warmup.h5"), os.path.join(a.work, "warm.h5"), hf, ["--dtype", dt,
                                                                                    "--max-new-tokens", "2"], be)
    trees = [t.split("=", 1) for t in a.trees.split(";") if t] or [("", ROOT)]
    res = {}
    for name, inp, flags in cases:
        got = {t: [] for t, _ in trees}
        for i in range(a.repeats):
            for t, path in trees:
                log = os.path.join(a.out, "logs", f"mix-{t}-{name.replace(' ', '_').replace(',', '')}-{i}.log") \
                    if a.keep_logs else None
                if log:
                    os.makedirs(os.path.dirname(log), exist_ok=True)
                got[t].append(run(os.path.abspath(path), inp, os.path.join(a.work, f"out-{t}{i}.h5"), hf, flags, be,
                                  log=log))
        for t, _ in trees:
            ok = all(r["rc"] == 0 for r in got[t])
            res[t, name] = statistics.median(r["tput"] for r in got[t]) if ok else None
            first = os.path.join(a.work, f"out-{trees[0][0]}0.h5")
            same = same_tokens(first, os.path.join(a.work, f"out-{t}0.h5")) if ok and os.path.exists(first) else None
            rec = {"kind": "mix-breakdown", "tree": t or ROOT, "case": name, "tok_s": res[t, name],
                   "runs": [r.get("tput") for r in got[t]], "tokens": got[t][0].get("tokens"),
                   "rows_differing_from_first_tree": same and same[1],
                   "tail": [r.get("tail") for r in got[t] if r["rc"]]}
            print(json.dumps(rec), flush=True)
            with open(os.path.join(a.out, "mix.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
    print(f"\n{'tree':<8} {'case':<16} {'tok/s':>10} {'/ W2':>6}")
    for (t, name), v in res.items():
        base = res.get((t, "W2, 256 new"))
        print(f"{t:<8} {name:<16} {v or 0:>10,.0f} {v / base if v and base else 0:>6.3f}")


if __name__ == "__main__":
    main()
