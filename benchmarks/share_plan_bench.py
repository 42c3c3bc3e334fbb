"""The shared-prefix plan of a chunk (gpt2job.backends.cuda.prefix_share.plan) on the CPU, this tree against another:
the host work a default job's first chunk waits for before its prefill starts (no GPU).

    python3 benchmarks/share_plan_bench.py [--old TREE] [--repeats 40] [--seed-workload PATH]

Cases: W1 (the seed workload's 8,192 prompts of 16 tokens; seeded random ones without it), W1's first 546 prompts (a
15-worker share), and 2,048 ragged prompts of 17-441 tokens (16 shared stems of 4-255 seeded tokens, tails of 0-191:
the byte-string sort for long prompts). Prints the median ms per plan (and per lexicographic sort) of each tree, and
whether the two trees' plans are identical; one JSON line per case with --json.
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ROOT, append_jsonl, base_record, load_seed_prompts  # noqa: E402

FIELDS = ("perm", "lens", "skip", "offsets", "tokens", "positions", "seq", "copies", "copy_off")


def load_module(tree):
    """prefix_share.py of a tree (pure NumPy: loaded from its file, not imported as a package)."""
    path = os.path.join(tree, "gpt2job", "backends", "cuda", "prefix_share.py")
    spec = importlib.util.spec_from_file_location(f"prefix_share_{abs(hash(tree))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def median_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def cases(seed_workload):
    w1, source = load_seed_prompts(seed_workload)
    rng = np.random.default_rng(4)
    stems = [rng.integers(0, 50257, rng.integers(4, 256)) for _ in range(16)]
    ragged = [np.concatenate([stems[i % 16], rng.integers(0, 50257, rng.integers(0, 192))])
              for i in range(2048)]
    out = []
    for name, rows in (("W1 8,192", list(w1)), ("W1 546", list(w1[:546])), ("ragged 2,048", ragged)):
        offsets = np.zeros(len(rows) + 1, np.int64)
        offsets[1:] = np.cumsum([len(r) for r in rows])
        out.append((name, offsets, np.concatenate(rows).astype(np.int32)))
    return out, source


def one_group(lens):
    return [(0, len(lens))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", help="another tree to time in the same run (its prefix_share.py)")
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--seed-workload")
    ap.add_argument("--json", help="append one JSON line per case to this file")
    a = ap.parse_args()
    trees = [("new", ROOT)] + ([("old", a.old)] if a.old else [])
    mods = {name: load_module(tree) for name, tree in trees}
    work, source = cases(a.seed_workload)
    print(f"prompts of W1 from {source}")
    for name, offsets, tokens in work:
        rec = base_record(bench="share_plan", case=name, prompts=len(offsets) - 1, tokens=len(tokens))
        plans = {}
        for tree, mod in mods.items():
            rec[f"{tree}_plan_ms"] = round(median_ms(lambda: mod.plan(offsets, tokens, one_group), a.repeats), 3)
            rec[f"{tree}_sort_ms"] = round(median_ms(lambda: mod.lexicographic(offsets, tokens), a.repeats), 3)
            plans[tree] = mod.plan(offsets, tokens, one_group)
        sp = plans["new"]
        rec["saving"] = round(sp.saving, 4) if sp is not None else None
        if "old" in plans:
            old = plans["old"]
            rec["identical"] = (old is None) == (sp is None) and (sp is None or all(
                np.array_equal(getattr(old, f), getattr(sp, f)) for f in FIELDS) and old.groups == sp.groups)
        print(f"{name:13s} plan ms " + " / ".join(f"{t} {rec[t + '_plan_ms']:.2f}" for t in mods) +
              "   sort ms " + " / ".join(f"{t} {rec[t + '_sort_ms']:.2f}" for t in mods) +
              f"   saving {rec['saving']}" + (f"   identical {rec['identical']}" if "identical" in rec else ""))
        append_jsonl(a.json, rec)


if __name__ == "__main__":
    main()
