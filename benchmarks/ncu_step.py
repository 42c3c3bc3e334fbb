"""Per-kernel GPU time of one decode step, from Nsight Compute's CSV (gpu__time_duration of every kernel that ran,
each alone: ncu serialises kernels, so the sum is the step without its launch gaps).

    ncu --csv --metrics gpu__time_duration.sum --cache-control none --clock-control none \\
        python3 benchmarks/decode_step_bench.py --configs picks --rows 137 --ctx 24 --reps 1 > step.csv
    python3 benchmarks/ncu_step.py step.csv --steps 5 [--label "137 rows ctx 24"]

--steps: how many steps the run launched (decode_step_bench: one eager step, then reps + 3 graph replays).
Prints us per step by kernel (name and grid), largest first, and the total; one JSON line with the same.
"""
import argparse
import collections
import csv
import json
import sys


def read(path):
    """[(kernel name, grid, us)] in launch order from ncu's --csv output (other lines skipped)."""
    out = []
    with open(path, newline="") as f:
        lines = [ln for ln in f if ln.startswith('"')]
    for rec in csv.DictReader(lines):
        if rec.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(rec["Metric Value"].replace(",", ""))
        unit = rec.get("Metric Unit", "nsecond")
        us = v / 1000.0 if unit in ("nsecond", "ns") else v * 1000.0 if unit in ("msecond", "ms") else v
        out.append((rec["Kernel Name"].split("(")[0], rec.get("Grid Size", ""), us))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    ks = read(a.csv)
    if not ks:
        sys.exit(f"{a.csv}: no gpu__time_duration lines")
    tot = collections.defaultdict(float)
    cnt = collections.Counter()
    for name, grid, us in ks:
        tot[(name, grid)] += us
        cnt[(name, grid)] += 1
    step = sum(tot.values()) / a.steps
    print(f"== {a.label}: {len(ks) / a.steps:.0f} kernels a step, {step:.1f} us of kernels a step")
    rows = sorted(tot.items(), key=lambda kv: -kv[1])
    for (name, grid), us in rows:
        print(f"{us / a.steps:9.1f} us  {cnt[(name, grid)] / a.steps:5.1f}x  {name} {grid}")
    print(json.dumps({"bench": "ncu_step", "label": a.label, "kernels_per_step": len(ks) / a.steps,
                      "us_per_step": round(step, 2),
                      "by_kernel": [[n, g, round(us / a.steps, 2)] for (n, g), us in rows]}))


if __name__ == "__main__":
    main()
