"""Cold start on one node (issue 14): time to ready with an empty kernel cache for 2 ranks (one worker) and for 16
ranks (15 workers sharing the node's GPUs, --share-gpus), the workers that became ready, and the nvcc compiles the
node ran (a counting wrapper in front of nvcc on PATH); then the same rank counts warm (the cache the cold run
filled). Targets: cold 16 ranks <= 1.3x cold 2 ranks, 15/15 workers ready, each module compiled once per node.

  python3 benchmarks/cold_start.py [--ranks 2,16] [--repeats 2] [--out DIR]

The job: W1 (workloads.py; the seed workload where present), --model random:gpt2 --backend cuda --dtype float16
--max-new-tokens 8, through mpirun (--bind-to none, --oversubscribe beyond the cores), GPT2JOB_LAUNCH_TIME set at the
launch; each cold run with a fresh GPT2JOB_PYCUDA_CACHE. JSON lines to OUT/cold_start.jsonl, a table last.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import gpu_count  # noqa: E402
from run_workloads import run_job  # noqa: E402
from workloads import make  # noqa: E402


def nvcc_wrapper(folder):
    """A folder whose nvcc runs the real one, then appends the call's start and end (Unix times) and its arguments
    to $NVCC_CALLS."""
    real = shutil.which("nvcc")
    if real is None:
        raise SystemExit("nvcc not found")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "nvcc")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\ns=$(date +%s.%N)\n"{real}" "$@"\nrc=$?\necho "$s $(date +%s.%N) $*" >> "$NVCC_CALLS"\n'
                'exit $rc\n')
    os.chmod(path, 0o755)
    return folder


def one(work, inp, gpus, ranks, cache, calls, wrapper, model="random:gpt2"):
    env = {"GPT2JOB_PYCUDA_CACHE": cache, "NVCC_CALLS": calls, "PATH": wrapper + os.pathsep + os.environ["PATH"]}
    extra = ["--share-gpus"] if ranks - 1 > gpus else []
    t0 = time.time()   # (the launch, within milliseconds: run_job sets GPT2JOB_LAUNCH_TIME as it starts)
    r = run_job(inp, os.path.join(work, f"out{ranks}.h5"), model, "cuda", "float16", gpus, 8, False,
                timeout=600, extra=extra, env=env, ranks=ranks)
    sm = r["summary"] or {}
    workers = sm.get("workers", [])
    runs = []   # (start, end, defines) of each nvcc compile, seconds since the launch
    if os.path.exists(calls):
        with open(calls) as f:
            runs = [(float(x[0]) - t0, float(x[1]) - t0, " ".join(a for a in x[2:] if a.startswith("-D")))
                    for x in (line.split() for line in f) if "--version" not in x]
    compiles = len(runs)
    longest = max(runs, key=lambda x: x[1] - x[0]) if runs else None
    entries = sum(len(fs) for _, _, fs in os.walk(cache))
    return {"bench": "cold_start", "ranks": ranks, "workers": ranks - 1, "rc": r["rc"],
            "time_to_ready_s": sm.get("time_to_ready_s"), "wall_s": sm.get("wall_s"),
            "workers_ready": sum(1 for w in workers if w.get("init_s") is not None),
            "workers_with_work": sum(1 for w in workers if w.get("chunks")), "nvcc_compiles": compiles,
            "cache_files": entries, "workers_ready_s": sorted(round(w["ready_s"], 2) for w in workers
                                                             if w.get("ready_s") is not None),
            "nvcc_first_start_s": round(min(a for a, _, _ in runs), 2) if runs else None,
            "nvcc_last_end_s": round(max(b for _, b, _ in runs), 2) if runs else None,
            "nvcc_longest_s": round(longest[1] - longest[0], 2) if runs else None,
            "nvcc_longest_start_s": round(longest[0], 2) if runs else None,
            "nvcc_longest_defines": longest[2] if runs else None,
            "throughput_tok_s": sm.get("throughput_tokens_per_s"), "cmd": r["cmd"],
            "tail": "" if r["rc"] == 0 else r["log_tail"][-1500:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="2,16")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--model", default="random:gpt2")
    ap.add_argument("--seed-workload", help="W1's prompts (workloads.py: its default where not given)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpt2job-cold-")
    make(work, which=("w1",), seed_workload=a.seed_workload)
    inp = os.path.join(work, "w1.h5")
    wrapper = nvcc_wrapper(os.path.join(work, "bin"))
    gpus = max(gpu_count(), 1)
    rows = []
    for i, ranks in enumerate(int(x) for x in a.ranks.split(",")):   # (a rank count may come again: --ranks 2,16,2,16)
        for rep in range(a.repeats + 1):
            kind = "cold" if rep < a.repeats else "warm"
            if kind == "cold":   # a fresh cache (the warm run reuses the last cold run's)
                cache = tempfile.mkdtemp(prefix="cache-", dir=work)
            calls = os.path.join(work, f"nvcc-{i}-{ranks}-{rep}.txt")
            rec = dict(one(work, inp, gpus, ranks, cache, calls, wrapper, a.model), start=kind, model=a.model)
            rows.append(rec)
            with open(os.path.join(a.out, "cold_start.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
            print(f"{kind} ranks {ranks:3d}: rc {rec['rc']} ready {rec['time_to_ready_s']} s, workers ready "
                  f"{rec['workers_ready']}/{rec['workers']}, nvcc {rec['nvcc_compiles']}, cache files "
                  f"{rec['cache_files']}{' ' + rec['tail'] if rec['tail'] else ''}", flush=True)
            if rec["nvcc_compiles"]:   # where a cold start's time goes: the compiles against the workers' readiness
                rs = rec["workers_ready_s"]
                print(f"    nvcc from {rec['nvcc_first_start_s']} to {rec['nvcc_last_end_s']} s after the launch "
                      f"(longest {rec['nvcc_longest_s']} s); workers ready at {rs[0] if rs else None}.."
                      f"{rs[-1] if rs else None} s", flush=True)
    print("\nranks  start  time to ready (s, runs)      median  workers ready  nvcc compiles")
    med = {}
    for ranks in sorted({r["ranks"] for r in rows}):
        for kind in ("cold", "warm"):
            rs = [r for r in rows if r["ranks"] == ranks and r["start"] == kind]
            ts = [r["time_to_ready_s"] for r in rs if r["time_to_ready_s"] is not None]
            med[ranks, kind] = statistics.median(ts) if ts else None
            print(f"{ranks:5d}  {kind:5s}  {' / '.join(f'{t:.1f}' for t in ts):28s} "
                  f"{med[ranks, kind] or float('nan'):6.1f}  {'/'.join(str(r['workers_ready']) for r in rs):13s}  "
                  f"{'/'.join(str(r['nvcc_compiles']) for r in rs)}")
    ks = sorted({r["ranks"] for r in rows})
    if len(ks) >= 2 and med.get((ks[0], "cold")) and med.get((ks[-1], "cold")):
        print(f"cold {ks[-1]} ranks / cold {ks[0]} ranks: {med[ks[-1], 'cold'] / med[ks[0], 'cold']:.2f}x "
              f"(target <= 1.3x)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
