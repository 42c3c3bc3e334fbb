"""Time to ready with a big model (issue 14: GPT-2 XL shapes, float32 safetensors, run in float16; target <= 8 s warm).

Writes a Hugging Face checkpoint folder of the size's real shapes once (seeded values; float32 safetensors, as
published), then, for each tree (--old, then --new, interleaved, --repeats times), runs the real job on 4 short
prompts (mpirun: master + one GPU worker) and reads the summary: the job's time to ready (launch to every rank
ready) and the worker's init (model read + GPU set-up). The first round warms the page cache and the kernel cache and
is not counted. Then, in a process of its own with the new tree, where the worker's time goes: the checkpoint read and
checked (load_params) and the CUDA backend built (weights uploaded and converted, kernels loaded, warm-up).
Prints a table last; JSON lines to OUT/load.jsonl.

  python3 benchmarks/load_bench.py [--size gpt2-xl] [--old .old] [--repeats 3] [--dtype float16]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ROOT, append_jsonl  # noqa: E402
from run_workloads import run_job  # noqa: E402


def write_checkpoint(folder, size):
    """The size's real shapes, N(0, 0.02)-like values from one seeded block (fast to write: a load test reads
    bytes, their values need only be finite and plausible), float32 safetensors + config.json."""
    sys.path.insert(0, ROOT)
    from gpt2job.model.config import PRESETS
    from gpt2job.model.params import GPT2Params, global_shapes, layer_shapes
    from gpt2job.model.hf_dir import save_hf_dir
    if os.path.exists(os.path.join(folder, "config.json")):
        return
    cfg = PRESETS[size]
    block = (np.random.default_rng(0).standard_normal(1 << 22, dtype=np.float32) * np.float32(0.02))
    count = [0]

    def values(shape, base=0.0):
        n = int(np.prod(shape))
        i = (count[0] * 7919) % block.size
        count[0] += 1
        out = np.resize(np.roll(block, -i), n).reshape(shape)
        if base:
            out += np.float32(base)
        return out

    layers = [{k: values(s, 1.0 if k.startswith("ln") and k.endswith("weight") else 0.0)
               for k, s in layer_shapes(cfg).items()} for _ in range(cfg.n_layer)]
    g = global_shapes(cfg)
    p = GPT2Params(config=cfg, wte=values(g["wte.weight"]), wpe=values(g["wpe.weight"]), layers=layers,
                   ln_f_w=values(g["ln_f.weight"], 1.0), ln_f_b=values(g["ln_f.bias"]))
    save_hf_dir(p, folder + ".tmp")
    os.replace(folder + ".tmp", folder)


def job(tree, inp, out, model, dtype):
    r = run_job(inp, out, model, "cuda", dtype, 1, 4, False, timeout=600, tree=tree)
    if r["rc"] != 0:
        return {"rc": r["rc"], "tail": r["log_tail"][-1200:]}
    sm = r["summary"]
    return {"rc": 0, "ready": sm["time_to_ready_s"], "init": sm["workers"][0].get("init_s")}


BREAKDOWN = """
import json, sys, time
from gpt2job.backends import make_backend
from gpt2job.model.weights import load_params
from gpt2job.settings import GenerationSettings
model, dtype = sys.argv[1:3]
t0 = time.perf_counter()
params = load_params(model)
t1 = time.perf_counter()
be = make_backend("cuda", params, GenerationSettings(max_new_tokens=4), dtype=dtype)
t2 = time.perf_counter()
be.warm_up()
t3 = time.perf_counter()
be.close()
print(json.dumps({"load_params_s": t1 - t0, "backend_s": t2 - t1, "warm_up_s": t3 - t2}))
"""


def breakdown(tree, model, dtype):
    """Where the worker's time goes, in a process of its own running `tree`."""
    tree = os.path.abspath(tree)
    e = dict(os.environ, CUDA_VISIBLE_DEVICES="0",
             PYTHONPATH=tree + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else ""))
    p = subprocess.run([sys.executable, "-c", BREAKDOWN, model, dtype], env=e, cwd=tree, capture_output=True,
                       text=True, timeout=600)
    if p.returncode:
        print(f"breakdown failed (rc {p.returncode}):\n{p.stderr[-2000:]}", flush=True)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="gpt2-xl")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--old", default=None, help="an older tree to compare (git archive COMMIT into a folder)")
    ap.add_argument("--new", default=ROOT)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default="/tmp/gpt2job-load")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    os.makedirs(a.out, exist_ok=True)
    model = os.path.join(a.dir, a.size)
    t = time.time()
    write_checkpoint(model, a.size)
    print(f"checkpoint {model}: {sum(os.path.getsize(os.path.join(model, f)) for f in os.listdir(model)) / 1e9:.2f}"
          f" GB, written in {time.time() - t:.1f} s", flush=True)
    import h5py
    inp = os.path.join(a.dir, "prompts.h5")
    with h5py.File(inp, "w") as f:
        f["prompt_tokens"] = np.arange(4 * 16, dtype=np.int32).reshape(4, 16)
    trees = {"new": a.new, **({"old": a.old} if a.old else {})}
    runs = {k: [] for k in trees}
    for i in range(a.repeats + 1):
        for name, tree in trees.items():
            r = job(tree, inp, os.path.join(a.dir, f"out-{name}.h5"), model, a.dtype)
            if r["rc"] != 0:
                print(f"{name}: rc {r['rc']}\n{r['tail']}", flush=True)
                continue
            print(f"round {i} {name}: ready {r['ready']:.2f} s, worker init {r['init']:.2f} s"
                  + ("  (warm-up round, not counted)" if i == 0 else ""), flush=True)
            if i:
                runs[name].append(r)
    print("\ntree  size      dtype     ready s (median)  worker init s   runs")
    for name, rs in runs.items():
        if not rs:
            continue
        rec = {"kind": "load", "tree": name, "size": a.size, "dtype": a.dtype,
               "ready_s": statistics.median(r["ready"] for r in rs), "init_s": statistics.median(r["init"] for r in rs),
               "runs": [[round(r["ready"], 3), round(r["init"], 3)] for r in rs]}
        append_jsonl(os.path.join(a.out, "load.jsonl"), rec)
        print(f"{name:5s} {a.size:9s} {a.dtype:9s} {rec['ready_s']:16.2f} {rec['init_s']:15.2f}   {len(rs)}")
    parts = breakdown(a.new, model, a.dtype)     # after the records: a failure here loses no measured run
    if parts:
        append_jsonl(os.path.join(a.out, "load.jsonl"), {"kind": "load-breakdown", "size": a.size, "dtype": a.dtype,
                                                         **parts})
        print("new tree, a process of its own: " + ", ".join(f"{k} {v:.2f}" for k, v in parts.items()))


if __name__ == "__main__":
    main()
