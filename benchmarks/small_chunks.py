"""Issue 14's first two rows on one GPU, through the real pipeline (mpirun, master + one GPU worker), fp16:

  python3 benchmarks/small_chunks.py [--repeats 1] [--out DIR] [--sizes 8192,2048,1024,546,137]
      [--configs 'old=.prev;new=.;new-s4=.@GPT2JOB_F16_VARIANTS=...'] [--flags '--temperature 0.8 ...']

  W3 by chunk size   W3 (W1's 8,192 prompts x 8, 16 tokens, 8 new), --no-dedup, --chunk-size N: tok/s and N / 8192
  W1 one chunk       (--w1) W1 itself, --no-dedup, default chunking: one chunk of 8,192
  ragged, small      2,048 prompts, half of 4-32 tokens and half of 256-448 (seeded, interleaved), 128 new,
                     --ignore-eos, --chunk-size 512, against the same in one chunk (--chunk-size 2048). (The raw
                     lines of 2026-11-30 named "ragged chunk 512" ran --chunk-size 256, as their flags say.)
--flags: more job flags for every case (sampled jobs: '--temperature 0.8 --top-k 40 --seed 7').
With --configs, each case runs in every configuration in turn (a tree and environment variables), and each
configuration's tokens are compared with the first's (first repeat). Each line also gives the worker's busy % (its compute time over its span from the first chunk sent to the last
result: what the job summary reports). JSON lines to OUT/small_chunks.jsonl; a table last.
With GPT2JOB_TRACE=1 in a configuration's environment (...@GPT2JOB_TRACE=1), the line also gives the GPU's idle
time between chunks from the worker's device timeline (CUDA events): from a chunk's last GPU work to the next chunk's
first launch (trees without the first_launch field: to its compute start, which misses the host's preparation), as
a % of the span from the first chunk's start to the last one's end ("gaps %": with --gpus N, the largest of the
workers'), and the median gap in ms.
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ROOT, device_timelines, same_tokens  # noqa: E402
from run_workloads import run_job  # noqa: E402


def ragged_prompts(path, n=2048, seed=5, vocab=50257):
    import h5py
    rng = np.random.default_rng(seed)
    lens = np.where(np.arange(n) % 2 == 0, rng.integers(4, 33, n), rng.integers(256, 449, n))
    with h5py.File(path + ".tmp", "w") as f:
        ds = f.create_dataset("prompt_tokens", (n,), dtype=h5py.vlen_dtype(np.int32))
        for i, L in enumerate(lens):
            ds[i] = rng.integers(0, vocab, int(L)).astype(np.int32)
    os.replace(path + ".tmp", path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--sizes", default="8192,2048,1024,546,137")
    ap.add_argument("--work", default="/tmp/gpt2job-small")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--configs", default=f"this={ROOT}",
                    help="'name=TREE[@VAR=VALUE...]' separated by ';': trees (git archive COMMIT into a folder) and "
                         "environment to compare, run interleaved; tokens compared with the first")
    ap.add_argument("--gpus", type=int, default=1, help="worker ranks, one GPU each (busy %% and gaps %%: the "
                                                            "first worker's, and the largest of the workers')")
    ap.add_argument("--smoke", action="store_true", help="CPU check of this script (tiny model, numpy, few rows)")
    ap.add_argument("--flags", default="", help="more job flags for every case, e.g. '--temperature 0.8 --top-k 40'")
    ap.add_argument("--w1", action="store_true", help="also W1 (8,192 x 16 tokens, 8 new, --no-dedup) as one chunk: "
                                                       "a one-chunk job, its start and end not hidden by other chunks")
    ap.add_argument("--only", default="", help="only the cases whose names start with one of these (comma-separated)")
    ap.add_argument("--keep-logs", action="store_true", help="each run's output in OUT/logs/ (with GPT2JOB_TRACE=1: "
                                                               "benchmarks/job_ends.py reads them)")
    ap.add_argument("--model", default="random:gpt2", help="the weights (exported once into WORK/hf-model)")
    ap.add_argument("--seed-workload", help="W1/W3's prompts (workloads.py: its default where not given)")
    a = ap.parse_args()
    model, be, dt, small = a.model, "cuda", "float16", []
    if a.smoke:
        model, be, dt = "random:n_layer=2,n_head=2,n_embd=32,n_positions=1024,vocab_size=50257:1", "numpy", "float32"
        small, a.work = ["--n-w1", "64"], a.work + "-smoke"
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.work, exist_ok=True)
    py, hf, wl = [sys.executable], os.path.join(a.work, "hf-model"), os.path.join(a.work, "workloads")
    # every run: the export is kept only where it holds this --model, and the prompts are written again (a second
    # run with other weights or prompts measured the first run's)
    subprocess.run(py + [os.path.join(ROOT, "benchmarks", "export_weights.py"), hf, "--model", model], check=True)
    seed = ["--seed-workload", a.seed_workload] if a.seed_workload else []
    subprocess.run(py + [os.path.join(ROOT, "benchmarks", "workloads.py"), wl, "--which", "w1,w3", *small, *seed],
                   check=True)
    if a.keep_logs:   # (job_ends.py reads every log there: an earlier run's were mixed into its medians)
        shutil.rmtree(os.path.join(a.out, "logs"), ignore_errors=True)
    ragged = os.path.join(a.work, "ragged.h5")
    if not os.path.isfile(ragged):
        ragged_prompts(ragged, n=64 if a.smoke else 2048)
    w3 = os.path.join(wl, "w3.h5")
    sizes = [int(x) for x in a.sizes.split(",")]
    if a.smoke:
        sizes = [64, 16]
    more = shlex.split(a.flags)
    cases = [(f"W3 chunk {n}", w3, 8, ["--no-dedup", "--chunk-size", str(n), *more]) for n in sizes]
    rs = 512 if not a.smoke else 16
    cases += [(f"ragged chunk {rs}", ragged, 128, ["--ignore-eos", "--chunk-size", str(rs), *more]),
              ("ragged one chunk", ragged, 128, ["--ignore-eos", "--chunk-size", str(8 * rs if a.smoke else 2048),
                                                 *more])]
    if a.w1:
        cases.append(("W1 one chunk", os.path.join(wl, "w1.h5"), 8, ["--no-dedup", *more]))
    if a.only:
        cases = [c for c in cases if any(c[0].startswith(p) for p in a.only.split(","))]
    configs = parse_configs(a.configs)
    for tree, env in configs.values():
        run_job(os.path.join(wl, "warmup.h5"), os.path.join(a.work, "warm.h5"), hf, be, dt, 1, 2, False, tree=tree,
                env=env)
    res = {}
    for name, inp, new, extra in cases:
        got = {c: [] for c in configs}
        for i in range(a.repeats):
            for c, (tree, env) in configs.items():    # interleaved: drifts of the machine hit every configuration
                out = os.path.join(a.work, f"out-{c}-{i}.h5")
                r = run_job(inp, out, hf, be, dt, a.gpus, new, False, extra=extra, tree=tree, env=env)
                if a.keep_logs:
                    os.makedirs(os.path.join(a.out, "logs"), exist_ok=True)
                    with open(os.path.join(a.out, "logs", f"{c}-{name.replace(' ', '_')}-{i}.log"), "w") as f:
                        f.write(r["output"])
                sm = r["summary"] or {}
                ws = sm.get("workers") or [{}]
                got[c].append({"rc": r["rc"], "tok_s": sm.get("throughput_tokens_per_s"),
                               "busy": [w.get("busy_percent") for w in ws], "chunks": [w.get("chunks") for w in ws],
                               "gaps": chunk_gaps(r["output"]), "tail": r["log_tail"][-600:] if r["rc"] else ""})
        first = next(iter(configs))
        for c in configs:
            runs = got[c]
            ok = all(g["rc"] == 0 for g in runs)
            tput = statistics.median(g["tok_s"] for g in runs) if ok else None
            busy = statistics.median(g["busy"][0] for g in runs) if ok and runs[0]["busy"][0] is not None else None
            gaps = statistics.median(g["gaps"]["percent"] for g in runs) if ok and runs[0]["gaps"] else None
            same = same_tokens(os.path.join(a.work, f"out-{first}-0.h5"), os.path.join(a.work, f"out-{c}-0.h5")) \
                if ok and all(x["rc"] == 0 for x in got[first]) else None
            res[c, name] = (tput, busy, gaps, runs[0]["chunks"][0], same)
            rec = {"kind": "small-chunks", "config": c, "tree": configs[c][0], "env": configs[c][1], "case": name,
                   "tok_s": tput, "busy_percent": busy, "gpu_gaps_percent": gaps,
                   "same_tokens_as": first if same and same[0] else None,
                   "differing_rows": None if same is None else same[1], "runs": runs, "flags": extra,
                   "max_new_tokens": new, "model": model, "seed_workload": a.seed_workload}
            print(json.dumps(rec), flush=True)
            with open(os.path.join(a.out, "small_chunks.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
    print(f"\n{'config':<10} {'case':<20} {'tok/s':>10} {'ratio':>6} {'busy %':>7} {'gaps %':>7} {'chunks':>6} "
          f"{'rows differing':>14}")
    for (c, name), (t, busy, gaps, chunks, same) in res.items():
        ref = res.get((c, "ragged one chunk" if name.startswith("ragged") else cases[0][0]), (None,))[0]
        print(f"{c:<10} {name:<20} {t or 0:>10,.0f} {t / ref if t and ref else 0:>6.3f} "
              f"{f'{busy:.1f}' if busy is not None else '-':>7} {f'{gaps:.2f}' if gaps is not None else '-':>7} "
              f"{chunks if chunks is not None else '-':>6} {same[1] if same else '-':>14}")


def chunk_gaps(output):
    """The GPU's idle time between chunks from a traced job's device timeline lines, per worker rank: {"percent":
    the largest of the workers' (the gaps' sum over the span from its first chunk's start to its last one's end),
    "per_rank": {rank: percent}, "median_ms": the median gap over all workers}, or None (not traced, or no worker
    with two chunks)."""
    spans = {}
    for rank, _, f in device_timelines(output):
        if "compute" in f:
            spans.setdefault(rank, []).append((f.get("first_launch", f["compute"][0]), f["compute"][1]))
    per, gaps = {}, []
    for rank, sp in sorted(spans.items()):
        if len(sp) < 2:
            continue
        sp.sort()
        g = [max(0.0, b[0] - a[1]) for a, b in zip(sp, sp[1:])]
        total = sp[-1][1] - sp[0][0]
        per[rank] = round(100 * sum(g) / total, 3) if total > 0 else 0.0
        gaps += g
    if not per:
        return None
    return {"percent": max(per.values()), "per_rank": per, "median_ms": round(statistics.median(gaps), 4)}


def parse_configs(text):
    """'name=TREE[@VAR=VALUE[@VAR=VALUE]]' separated by ';' -> {name: (tree, {VAR: VALUE})}; the first is the
    reference of the token comparison."""
    out = {}
    for part in filter(None, (x.strip() for x in text.split(";"))):
        name, rest = part.split("=", 1)
        tree, *envs = rest.split("@")
        out[name] = (tree, dict(e.split("=", 1) for e in envs))
    return out



if __name__ == "__main__":
    main()
