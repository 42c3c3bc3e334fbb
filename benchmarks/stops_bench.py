"""Host cost of stop strings (model/stops.py): StopStrings build time and ms per decode step (ends over 2,048 rows).

  python3 benchmarks/stops_bench.py [--vocab-dir DIR] [--out DIR] [--impl LABEL=FILE ...]

Cases, each with random tokens and with text-like tokens (GPT-2 tokens of English-like text made here, each row
from its own offset): (a) half the rows [".", " the"] or ["\\n"]; (b) half the rows "Question: " (its " " begins
most GPT-2 tokens); (c) every row its own f"Q{b}: "; (d) every row its own word. Every row is checked at every
step (rows that matched stay: the same work each step). A build starts from a fresh TokenTable (no cached
candidates); ms per step is the median of the steps after the warm-up (1st ms: the first step, when the package's
matcher reads each row's earlier tokens once). --impl LABEL=FILE (repeatable) benchmarks
other versions of stops.py (e.g. `git show HEAD:gpt2job/model/stops.py > /tmp/x.py`; FILE "package": the package's
own), each case running every version in turn, so that the machine's drift hits them alike; rows' first matching
steps are summed into a check value that versions must agree on. Prints a table; appends JSON lines to
OUT/stops.jsonl.
"""
import argparse
import datetime
import importlib.util
import json
import os
import socket
import statistics
import sys
import time

import numpy as np
from bench_common import vocab_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

B, STEPS, WARMUP, V = 2048, 48, 4, 50257
WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or has had "
         "not but they their one new first two time year people city world state school after also during between "
         "government music film water life work war history system century team family game number group house "
         "river small large early known called used made found began became played won held came took wrote said "
         "North American British French German English national public local original general second last old "
         "high great well only most other such many some more several however because although").split()


def load_impl(path):
    """The stops module at path ("package": the package's)."""
    if path == "package":
        import gpt2job.model.stops as mod
        return mod
    spec = importlib.util.spec_from_file_location("stops_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def english(rng, n_sentences):
    """English-like text: sentences of common words, commas, full stops, now and then a question and answer or a
    numbered question ("Q17: ...")."""
    out = []
    for _ in range(n_sentences):
        words = list(rng.choice(WORDS, rng.integers(4, 18)))
        if rng.random() < 0.2:
            words.insert(int(rng.integers(1, len(words))), words.pop() + ",")
        s = " ".join(words).capitalize() + "."
        if rng.random() < 0.1:
            s = f"Question: {s[:-1]}? A: {' '.join(rng.choice(WORDS, 5))}."
        elif rng.random() < 0.1:
            s = f"Q{rng.integers(B)}: {s}"
        out.append(s + ("\n" if rng.random() < 0.15 else " "))
    return "".join(out)


def half(f):
    """Rows' stop strings: f(b) for even rows, none for odd ones."""
    return [f(b) if b % 2 == 0 else () for b in range(B)]


def cases(rng):
    words = set()
    while len(words) < B:
        words.add(("" if rng.random() < 0.3 else " ") + "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"),
                                                                            rng.integers(3, 9))))
    return {"a: half . / the or \\n": half(lambda b: (".", " the") if b % 4 == 0 else ("\n",)),
            "b: half 'Question: '": half(lambda b: ("Question: ",)),
            "c: 2048 distinct 'Q{b}: '": [(f"Q{b}: ",) for b in range(B)],
            "d: 2048 distinct words": [(w,) for w in sorted(words)]}


def run_case(mod, blobs, stops, streams):
    """(build seconds, ms of each step, check value, rows matched) of one matcher over streams [B, STEPS]."""
    table = mod.TokenTable(blobs)
    t0 = time.perf_counter()
    ss = mod.StopStrings(stops, table)
    build = time.perf_counter() - t0
    rows = np.arange(B)
    first = np.full(B, -1)
    ms = []
    for step in range(STEPS):
        tok = streams[:, step]
        t0 = time.perf_counter()
        hit = ss.ends(rows, tok, lambda b: streams[b, :step])    # as RowPlan.check passes out[b, :step]
        ms.append((time.perf_counter() - t0) * 1e3)
        first[hit & (first < 0)] = step
    return build, ms, int((first + 1).sum()), int((first >= 0).sum())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab-dir", default=vocab_dir())
    ap.add_argument("--out", default=os.environ.get("OUT", "bench-out"))
    ap.add_argument("--impl", action="append", metavar="LABEL=FILE",
                    help="a version of stops.py to benchmark (repeatable; default: package=package)")
    a = ap.parse_args()
    from gpt2job.model.tokenizer import load_tokenizer
    impls = [x.split("=", 1) for x in a.impl or ["package=package"]]
    mods = [(label, path, load_impl(path)) for label, path in impls]
    enc = load_tokenizer(a.vocab_dir)
    blobs = [enc.decode_single_token_bytes(t) for t in range(V)]
    rng = np.random.default_rng(0)
    text = np.array(enc.encode(english(rng, 4000)), np.int64)
    start = rng.integers(0, len(text) - STEPS, B)
    streams = {"random": rng.integers(0, V, (B, STEPS)), "text": text[start[:, None] + np.arange(STEPS)]}
    os.makedirs(a.out, exist_ok=True)
    print(f"{'version':10s} {'case':28s} {'tokens':7s} {'build s':>8s} {'ms/step':>8s} {'1st ms':>7s} "
          f"{'rows hit':>8s} {'check':>8s}")
    for name, stops in cases(rng).items():
        for kind, st in streams.items():
            for label, path, mod in mods:
                build, ms, check, n_hit = run_case(mod, blobs, stops, st)
                med = statistics.median(ms[WARMUP:])
                print(f"{label:10s} {name:28s} {kind:7s} {build:8.3f} {med:8.3f} {ms[0]:7.2f} {n_hit:8d} "
                      f"{check:8d}", flush=True)
                rec = {"bench": "stops", "version": label, "impl": path, "case": name, "tokens": kind, "rows": B,
                       "steps": STEPS, "warmup": WARMUP, "build_s": round(build, 4), "step_ms": round(med, 4),
                       "first_step_ms": round(ms[0], 3), "rows_hit": n_hit, "check": check,
                       "host": socket.gethostname(), "when": datetime.datetime.now().isoformat(timespec="seconds")}
                with open(os.path.join(a.out, "stops.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
