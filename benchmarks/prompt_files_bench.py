"""The master's costs that grow with a text or JSONL input, tree against tree (CPU only): the `prompts` conversion of
1M-line files (text; JSONL texts with two settings and an own "id" field; JSONL token lists), run's conversion when
the file is unchanged (a rerun), reading and tokenizing a text input's conversion, reading a token input and a score
input of token pairs, and greedy dedup's keys of ragged prompts. Each case runs in a fresh process per tree and
repeat: wall seconds and the process's peak RSS (ru_maxrss of the child), medians of the repeats. The files are made here, seeded (no shared data).

    python benchmarks/prompt_files_bench.py --trees "old=/tmp/old;new=." --lines 1000000 --repeats 3 \
        --vocab-dir ../shared/gpt2-vocab --json out.jsonl
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

from bench_common import vocab_dir

WORDS = "the quick brown fox jumps over lazy dog and then some more words appear in this prompt".split()

# read_prompts from the tree's own module (read_input.py; prompts.py in trees before it)
READ_PROMPTS = """
try:
    from gpt2job.files.read_input import read_prompts
except ImportError:
    from gpt2job.files.prompts import read_prompts"""

# each case: a script run in the tree (argv: source file, scratch folder); its own work only, imports before the clock
CASES = {
    "prompts txt": ("t.txt", "from gpt2job.files.prompt_files import convert as c\nRUN = lambda: c(SRC, OUT + '/o.h5')"),
    "prompts jsonl texts+settings": ("j.jsonl", "from gpt2job.files.prompt_files import convert as c\n"
                                                "RUN = lambda: c(SRC, OUT + '/o.h5')"),
    "prompts jsonl tokens": ("k.jsonl", "from gpt2job.files.prompt_files import convert as c\n"
                                        "RUN = lambda: c(SRC, OUT + '/o.h5')"),
    "run's conversion of an unchanged file": ("j.jsonl", """
try:
    from gpt2job.files.conversions import convert_for_run
except ImportError:
    from gpt2job.files.prompt_files import convert_for_run
convert_for_run(SRC, OUT + '/out.h5')       # the first run's (not timed)
import resource
BASE = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
RUN = lambda: convert_for_run(SRC, OUT + '/out.h5')"""),
    "read and tokenize the text conversion": ("t.txt", READ_PROMPTS + """
import glob
try:
    from gpt2job.files.conversions import convert_for_run
except ImportError:
    from gpt2job.files.prompt_files import convert_for_run
from gpt2job.model.tokenizer import load_tokenizer
path, _ = convert_for_run(SRC, OUT + '/out.h5')
enc = load_tokenizer(VOCAB)
import gc, resource
gc.collect()
BASE = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
RUN = lambda: read_prompts(path, lambda: enc, 50257)"""),
    "reread the text conversion (its kept ids)": ("t.txt", READ_PROMPTS + """
from gpt2job.files.conversions import convert_for_run
from gpt2job.model.tokenizer import load_tokenizer
path, _ = convert_for_run(SRC, OUT + '/out.h5', vocab_dir=VOCAB)   # a conversion that keeps its prompts' ids
enc = load_tokenizer(VOCAB)
import gc, resource
gc.collect()
BASE = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
RUN = lambda: read_prompts(path, lambda: enc, 50257)"""),
    "read a token input": ("k.jsonl", READ_PROMPTS + """
from gpt2job.files.prompt_files import convert
convert(SRC, OUT + '/o.h5')   # prompt_tokens, variable-length rows
import gc, resource
gc.collect()
BASE = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
RUN = lambda: read_prompts(OUT + '/o.h5', None, 50257)"""),
    "read a score input of token pairs": ("k.jsonl", """
import h5py
from gpt2job.files.prompt_files import convert
from gpt2job.files.score_input import read_score_input
convert(SRC, OUT + '/o.h5')   # prompt_tokens, variable-length rows: each row is a context and a continuation
with h5py.File(OUT + '/o.h5', 'r') as f, h5py.File(OUT + '/pairs.h5', 'w') as g:
    g.create_dataset('context_tokens', data=f['prompt_tokens'][()], dtype=f['prompt_tokens'].dtype)
    g.create_dataset('continuation_tokens', data=f['prompt_tokens'][()], dtype=f['prompt_tokens'].dtype)
import gc, resource
gc.collect()
BASE = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
RUN = lambda: read_score_input(OUT + '/pairs.h5', None)"""),
    "dedup keys and groups of 4M ragged prompts": (None, """
import numpy as np
from gpt2job.files.prompts import PromptSet
from gpt2job.files.dedup import group_identical, prompt_keys
rng = np.random.default_rng(0)
lens = rng.integers(4, 64, 200000)
distinct = rng.integers(0, 50257, (20000, 64)).astype(np.uint16)
pick = rng.integers(0, 20000, 200000)
pick[::3] = rng.integers(20000, 1 << 30, len(pick[::3]))
toks = np.concatenate([distinct[p, :n] if p < 20000 else rng.integers(0, 50257, n).astype(np.uint16)
                       for p, n in zip(pick, lens)])
ps = PromptSet.from_pieces([np.tile(lens, 20)], np.tile(toks, 20), "prompts")
ps.offsets, ps.lengths
rows = np.arange(len(ps), dtype=np.int64)
import gc, resource
gc.collect()
BASE = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
RUN = lambda: (prompt_keys(ps), group_identical(ps, rows))"""),
}

RUNNER = """
import os, resource, sys, time, json
SRC, OUT, VOCAB = sys.argv[1], sys.argv[2], sys.argv[3] or None
BASE = None
exec(open(sys.argv[4]).read())
t = time.perf_counter()
RUN()
dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"s": dt, "peak_mb": peak, "over_base_mb": None if BASE is None else peak - BASE / 1024}))
"""


def make_files(folder, lines, seed=0):
    rnd = random.Random(seed)
    with open(f"{folder}/t.txt", "w") as t, open(f"{folder}/j.jsonl", "w") as j, open(f"{folder}/k.jsonl", "w") as k:
        for i in range(lines):
            text = " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 30)))
            t.write(text + "\n")
            j.write(json.dumps({"prompt": text, "max_new_tokens": rnd.randint(1, 64), "temperature": 0.7, "id": i})
                    + "\n")
            k.write(json.dumps({"tokens": [rnd.randint(0, 50000) for _ in range(rnd.randint(3, 30))]}) + "\n")


def run_case(tree, name, folder, vocab):
    src, code = CASES[name]
    with tempfile.TemporaryDirectory(dir=folder) as scratch:
        case = os.path.join(scratch, "case.py")
        with open(case, "w") as f:
            f.write(code)
        env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
        p = subprocess.run([sys.executable, "-c", RUNNER, os.path.join(folder, src or "-"), scratch, vocab or "",
                            case], env=env, capture_output=True, text=True, cwd=scratch)
    if p.returncode:
        raise SystemExit(f"{name} in {tree} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", default="new=.", help='"name=path;name=path": gpt2job trees to compare')
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--vocab-dir", default=vocab_dir())
    ap.add_argument("--json", help="append one JSON line per run here")
    a = ap.parse_args()
    trees = dict(x.split("=", 1) for x in a.trees.split(";") if x)
    cases = [c.strip() for c in a.cases.split(",") if c.strip()]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        make_files(folder, a.lines)
        for name in cases:
            got = {t: [] for t in trees}
            for r in range(a.repeats):
                for t, path in trees.items():     # interleaved: tree against tree on one machine's state
                    res = run_case(path, name, folder, a.vocab_dir)
                    got[t].append(res)
                    line = {"case": name, "tree": t, "path": path, "repeat": r, "lines": a.lines, "commit": commit,
                            "time": time.strftime("%Y-%m-%d %H:%M:%S"), **res}
                    print(json.dumps(line), flush=True)
                    if a.json:
                        with open(a.json, "a") as f:
                            f.write(json.dumps(line) + "\n")
            for t in trees:
                med = {k: statistics.median(x[k] for x in got[t]) if got[t][0][k] is not None else None
                       for k in ("s", "peak_mb", "over_base_mb")}
                rows.append((name, t, med))
    print(f"\n| case | tree | s (median of {a.repeats}) | peak RSS MB | peak above the case's set-up MB |")
    print("| --- | --- | --- | --- | --- |")
    for name, t, m in rows:
        over = f"{m['over_base_mb']:.0f}" if m["over_base_mb"] is not None else ""
        print(f"| {name} | {t} | {m['s']:.2f} | {m['peak_mb']:.0f} | {over} |")


if __name__ == "__main__":
    main()
