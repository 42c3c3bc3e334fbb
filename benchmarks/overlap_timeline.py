"""Show, with CUDA events, that a worker uploads the next chunk while the current one computes.

Runs a real job (mpirun -np 2: master + one GPU worker) with GPT2JOB_TRACE=1 and reads the worker's
per-chunk device timeline (CUDA events, ms since the backend started): each chunk's upload interval on
the copy stream, and its compute interval on the compute stream. Prints one row per chunk and which
chunk was computing while it was uploaded.

    python3 benchmarks/overlap_timeline.py IN.h5 --model random:gpt2 [--dtype float16] [--chunk-size 2048]
"""
import argparse
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ROOT, device_timelines  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("--model", default="random:gpt2")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--chunk-size", type=int, default=2048)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    a = ap.parse_args()
    env = dict(os.environ, GPT2JOB_TRACE="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", CUDA_VISIBLE_DEVICES="0")
    out = os.path.join(tempfile.mkdtemp(), "overlap.h5")
    cmd = ["mpirun", "-np", "2", "--bind-to", "none", sys.executable, "-m", "gpt2job", "run", a.input, out,
           "--model", a.model, "--backend", "cuda", "--dtype", a.dtype, "--chunk-size", str(a.chunk_size),
           "--max-new-tokens", str(a.max_new_tokens), "--ignore-eos"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        sys.exit(p.stdout + p.stderr)
    rows = {chunk: fields for _, chunk, fields in device_timelines(p.stderr)}
    print(f"{'chunk':>5}  {'upload (ms)':>19}  {'compute (ms)':>21}  uploaded while computing")
    overlapped = 0
    for c in sorted(rows):
        up, comp = rows[c]["upload"], rows[c]["compute"]
        during = [o for o in rows if o != c and rows[o]["compute"][0] <= up[0] and up[1] <= rows[o]["compute"][1]]
        overlapped += bool(during)
        print(f"{c:5d}  {up[0]:9.2f}-{up[1]:9.2f}  {comp[0]:10.2f}-{comp[1]:10.2f}  "
              f"{'chunk ' + str(during[0]) if during else '-'}")
    print(f"{overlapped} of {len(rows)} chunk uploads ran entirely inside another chunk's compute")
    print([l for l in p.stdout.splitlines() if "throughput" in l][0])


if __name__ == "__main__":
    main()
