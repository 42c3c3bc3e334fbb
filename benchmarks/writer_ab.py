"""The output writer of two source trees, interleaved on one machine: benchmarks/master_scale.py (15 simulated
workers, with text) run in each tree in turn, --repeats times; prints each run's rows/s to the HDF5 file complete
and the medians last. For writer changes, whose effect the 2-core CPU machine cannot resolve (everything shares its
cores).

    python3 benchmarks/writer_ab.py --old .old [--new .] [--repeats 3] [--rows 2000000] [--vocab-dir DIR] [--out DIR]
        [--old-layout vlen] [--new-layout flat]

--old . --old-layout vlen --new-layout flat compares this tree's two output layouts (run --layout).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

from bench_common import vocab_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", default=ROOT)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rows", type=int, default=2000000)
    ap.add_argument("--workers", type=int, default=15)
    ap.add_argument("--vocab-dir", default=vocab_dir())
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--old-layout", default="vlen", help="run --layout of the old tree's runs (vlen: not passed)")
    ap.add_argument("--new-layout", default="vlen", help="and of the new tree's")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    if a.vocab_dir:     # each tree's run starts in that tree: a relative path would name another folder there
        a.vocab_dir = os.path.abspath(a.vocab_dir)
    got = {"old": [], "new": []}
    for i in range(a.repeats):
        for name in ("old", "new"):
            tree = os.path.abspath(getattr(a, name))
            cmd = [sys.executable, os.path.join(tree, "benchmarks", "master_scale.py"), "--workers", str(a.workers),
                   "--rows", str(a.rows), "--vocab-dir", a.vocab_dir]
            layout = getattr(a, name + "_layout")
            cmd += ["--layout", layout] if layout != "vlen" else []
            p = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=600)
            lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
            if p.returncode or not lines:
                print(f"{name} run {i}: rc {p.returncode}\n{p.stdout[-1500:]}{p.stderr[-1500:]}", flush=True)
                continue
            res = json.loads(lines[-1])
            got[name].append(res["rows_per_s_to_file_complete"])
            print(f"{name} run {i}: {res['rows_per_s_to_file_complete']:,} rows/s to the file complete, "
                  f"{res['rows_per_s']:,} dispatched; writer {res.get('output_writer')}", flush=True)
            with open(os.path.join(a.out, "writer_ab.jsonl"), "a") as f:
                f.write(json.dumps({"bench": "writer_ab", "tree": name, "path": tree, "layout": layout, **res}) + "\n")
    print(f"\n{'tree':5s} {'median rows/s to the file complete':>36s}  runs")
    for name, v in got.items():
        print(f"{name:5s} {statistics.median(v) if v else float('nan'):>36,.0f}  {v}")
    if got["old"] and got["new"]:
        print(f"new / old {statistics.median(got['new']) / statistics.median(got['old']):.3f}")


if __name__ == "__main__":
    main()
