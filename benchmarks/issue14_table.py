"""Issue 14's table from the JSON lines of one `benchmarks/issue14.sh` run (its OUT folder), each row against its
target ("met", or "missed by N%"), medians over the repeats:

  python3 benchmarks/issue14_table.py OUT

Files read (those present): lfl.jsonl (run_workloads.py: W1 fp16/fp32 and W2 fp16 with every prompt and prefill
token computed, GPT2JOB_PREFIX_SHARE=0 and --no-dedup), defaults.jsonl (W1 with the defaults), baselines.jsonl
(baselines.py: transformers and the compact engine), w3.jsonl (W3 on 1 and 2 GPUs), small_chunks.jsonl,
gpus_ragged.jsonl, load.jsonl (load_bench.py, GPT-2 XL), check.jsonl (check_vs_transformers.py), cold_start.jsonl.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import fmt_int as fmt, read_jsonl  # noqa: E402

TARGETS = {   # issue 14's "must hold" numbers
    "w1 float16": 800_000, "w1 float32": 90_000, "w2 float16": 200_000,
    "chunk 546": 0.60, "chunk 1024": 0.80, "chunk 137": 0.25, "idle": 3.0, "gpus 2": 1.85, "xl ready": 8.0,
    "cold ratio": 1.3,
}


def lines(folder, name):
    return read_jsonl([os.path.join(folder, name)])


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def verdict(value, target, higher_is_better=True):
    if value is None:
        return "not measured"
    if (value >= target) if higher_is_better else (value <= target):
        return "met"
    short = (target - value) / target if higher_is_better else (value - target) / target
    return f"missed by {100 * short:.0f}%"


def ours(recs, workload, dtype, gpus=1):
    runs = [r["throughput_tok_s"] for r in recs if r.get("engine") == "ours" and not r.get("warmup")
            and r.get("workload") == workload and r.get("dtype") == dtype and r.get("gpus", 1) == gpus
            and r.get("rc", 0) == 0]
    return med(runs), runs


def baseline(recs, engine, workload, dtype):
    return med([r["throughput_tok_s"] for r in recs if r.get("engine") == engine and r.get("workload") == workload
                and r.get("dtype") == dtype and r.get("throughput_tok_s")])


def rows_of(folder):
    """[(row, measured, target, verdict)] of issue 14's table, from the files in folder."""
    out = []
    lfl, dflt, base = lines(folder, "lfl.jsonl"), lines(folder, "defaults.jsonl"), lines(folder, "baselines.jsonl")
    for w, d, label in (("w1", "float16", "W1 fp16"), ("w1", "float32", "W1 fp32"), ("w2", "float16", "W2 fp16")):
        m, runs = ours(lfl, w, d)
        if m is None:
            continue
        parts = [f"{fmt(m)} ({' / '.join(fmt(x) for x in runs)})"]
        for engine in ("compact", "transformers"):
            b = baseline(base, engine, w, d)
            if b:
                parts.append(f"{engine} {fmt(b)} ({m / b:.2f}x)")
        dm, _ = ours(dflt, w, d)
        if dm is not None:
            parts.append(f"with the defaults {fmt(dm)}")
        out.append((f"{label}, every prompt and prefill token computed", "; ".join(parts),
                    f">= {fmt(TARGETS[f'{w} {d}'])}", verdict(m, TARGETS[f"{w} {d}"])))
    w3 = lines(folder, "w3.jsonl")
    one, _ = ours(w3, "w3", "float16", 1)
    two, _ = ours(w3, "w3", "float16", 2)
    if one and two:
        out.append(("W3 fp16, 2 GPUs / 1", f"{fmt(two)} / {fmt(one)} = {two / one:.2f}x", "", ""))
    sc = {r["case"]: r for r in lines(folder, "small_chunks.jsonl") if r.get("kind") == "small-chunks"}
    full = sc.get("W3 chunk 8192", {}).get("tok_s")
    for n in (1024, 546, 137):
        r = sc.get(f"W3 chunk {n}")
        if r and full:
            ratio = r["tok_s"] / full
            out.append((f"W3 fp16 `--chunk-size {n}` / 8,192", f"{ratio:.3f} ({fmt(r['tok_s'])} / {fmt(full)}; "
                        f"busy {r.get('busy_percent')}%)", f">= {TARGETS[f'chunk {n}']:.2f}",
                        verdict(ratio, TARGETS[f"chunk {n}"])))
    small, whole = sc.get("ragged chunk 512"), sc.get("ragged one chunk")
    if small:
        idle = 100.0 - small["busy_percent"]
        vs = f", {small['tok_s'] / whole['tok_s']:.3f} of one chunk" if whole else ""
        out.append(("GPU idle, ragged prompts, `--chunk-size 512`", f"{idle:.1f}% (busy {small['busy_percent']}%{vs})",
                    f"<= {TARGETS['idle']:.0f}%", verdict(idle, TARGETS["idle"], higher_is_better=False)))
    gr = [r for r in lines(folder, "gpus_ragged.jsonl") if r.get("kind") == "gpus-ragged" and r.get("tree") == "new"]
    g2 = next((r for r in gr if r.get("gpus") == 2), None)
    if g2:
        busy = ", ".join(f"{w.get('busy_percent')}%" for w in g2.get("workers", []))
        out.append(("ragged prompts, default chunking, 2 GPUs / 1", f"{g2['ratio_to_1']:.2f}x ({fmt(g2['tok_s'])}; "
                    f"workers busy {busy})", f">= {TARGETS['gpus 2']}", verdict(g2["ratio_to_1"], TARGETS["gpus 2"])))
    cold = [r for r in lines(folder, "cold_start.jsonl") if r.get("start") == "cold" and r.get("rc") == 0]
    c2 = med([r["time_to_ready_s"] for r in cold if r.get("ranks") == 2])
    c16 = [r for r in cold if r.get("ranks") == 16]
    if c2 and c16:
        ratio = med([r["time_to_ready_s"] for r in c16]) / c2
        ready = min(r.get("workers_ready", 0) for r in c16)
        compiles = max(r.get("nvcc_compiles", 0) for r in c16)
        out.append(("cold start, 16 ranks / 2 ranks (one node)", f"{ratio:.2f}x; {ready}/15 workers ready; "
                    f"{compiles} nvcc runs", f"<= {TARGETS['cold ratio']}x, 15/15",
                    "met" if ratio <= TARGETS["cold ratio"] and ready == 15 else "missed"))
    xl = next((r for r in lines(folder, "load.jsonl") if r.get("kind") == "load"), None)
    if xl:
        out.append((f"time to ready, {xl['size']} shapes, {xl['dtype']} (warm)", f"{xl['ready_s']:.2f} s",
                    f"<= {TARGETS['xl ready']:.0f} s", verdict(xl["ready_s"], TARGETS["xl ready"], False)))
    for r in lines(folder, "check.jsonl"):
        if r.get("engine") == "check" and r.get("check", "").startswith(("i:", "ii: fp16 vs fp32 top-1")):
            out.append((f"check {r['check']}", f"{100 * r['value']:.2f}%",
                        "" if r.get("bar") is None else f">= {100 * r['bar']:.2f}%",
                        "" if r.get("passed") is None else ("met" if r["passed"] else "missed")))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the OUT folder of benchmarks/issue14.sh")
    a = ap.parse_args(argv)
    rows = rows_of(a.out)
    if not rows:
        print(f"no issue 14 results in {a.out}", file=sys.stderr)
        return 1
    print("| row | measured (median of the runs) | target | |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
