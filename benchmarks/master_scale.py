"""Is the master the bottleneck at 16 GPUs or more? The real Master (cluster/master.py: scheduler, dispatch, group
commit to the journal, HDF5 writer thread) serves N simulated workers on the CPU.

    python benchmarks/master_scale.py [--workers 15,63] [--tok-s 600000] [--rows 2000000] [--chunk-size 546]
        [--new-tokens 8] [--layout vlen|flat] [--batch-rows 0] [--dir /tmp/gpt2job-master-scale] [--keep]
        [--json results.jsonl]

Each simulated worker (SimChannel) computes the chunks it is sent one after another, each taking
rows x new tokens / --tok-s seconds of wall time (W1-type chunks: 546 prompts of 16 tokens, 8 new, is what each of
15 workers gets for W1), and its result is ready when that time has passed. Results are synthesized in-process
from a pool of precomputed synthetic completions (backends/synthetic.py tokens: realistic text for the writer),
and cross the same encode/decode as an MPI message (chunks.encode_chunk on send, decode_completions on receive):
the master pays what it pays under MPI, except the MPI calls themselves. The input is a W1-like 2-D int32 file
(16 random tokens a row, 8% repeats of earlier rows: greedy dedup on), the output a real HDF5 file and journal.

Reported per N: rows/s and tokens/s the master sustained (first chunk out -> last result stored, and to the end of
finish(): the HDF5 file complete), the demand (N x tok/s), how the master's main thread spent the span (receiving,
committing = journal write + fsync, dispatching, writing: the writer thread's own time, idle), process CPU time,
peak RSS, and the workers' mean busy % (below 100%: the master did not keep up).

--batch-rows N: the workers say they compute up to N rows at once, as an fp16 GPU worker does (8,192: the master then
keeps 2 x N // chunk size chunks with each), and compute so: the chunks that have arrived when a worker is free start
together, up to N rows, and all their results are ready when the batch ends.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from bench_common import git_commit, vocab_dir  # noqa: E402
from gpt2job.chunks import Chunk, decode_completions, encode_chunk, encode_completions  # noqa: E402
from gpt2job.settings import JobSettings  # noqa: E402


class SimWorker:
    def __init__(self, rank):
        self.rank, self.queue, self.free_at, self.busy_s = rank, [], 0.0, 0.0
        self.pending, self.running = [], None    # --batch-rows: chunks not started; (end, [(id, rows)]) computing


class SimChannel:
    """N workers that compute at a set speed; the cluster/channel.py interface."""

    def __init__(self, n, tok_s, new_tokens, pool, batch_rows=0):
        self.workers = {r: SimWorker(r) for r in range(1, n + 1)}
        self.ranks = list(self.workers)
        self.tok_s, self.new_tokens, self.pool, self.batch_rows = tok_s, new_tokens, pool, batch_rows
        self.hello_sent, self.n_results = False, 0
        self.t = {"receive": 0.0, "send": 0.0, "idle": 0.0}

    def encode_ahead(self, chunks):
        pass

    def send_chunk(self, rank, chunk):
        t0 = time.perf_counter()
        encode_chunk(chunk)                             # what MpiChannel does before Isend (its cost)
        w = self.workers[rank]
        now = time.monotonic()
        if self.batch_rows:
            w.pending.append((now, chunk.chunk_id, np.asarray(chunk.rows, np.int64)))
            self.t["send"] += time.perf_counter() - t0
            return
        start = max(now, w.free_at)
        w.free_at = start + len(chunk.rows) * self.new_tokens / self.tok_s
        w.busy_s += w.free_at - start
        w.queue.append((w.free_at, chunk.chunk_id, len(chunk.rows), np.asarray(chunk.rows, np.int64)))
        self.t["send"] += time.perf_counter() - t0

    def send_stop(self, rank, why="stop"):   # (the channel interface: cluster/channel.py)
        pass

    def forget(self, rank):
        pass

    def poll(self):
        t0 = time.perf_counter()
        msgs = []
        if not self.hello_sent:
            self.hello_sent = True
            msgs = [(r, "hello", {"host": "sim", "backend": "sim", "preferred_chunk": 8192,
                                  "batch_rows": self.batch_rows}) for r in self.ranks]
        now = time.monotonic()
        for w in self.workers.values():
            if self.batch_rows:
                self.batches(w, now)
            while w.queue and w.queue[0][0] <= now:
                done_at, cid, b, rows = w.queue.pop(0)
                buf = self.pool.result(cid, rows)
                comp, us = decode_completions(buf)      # what MpiChannel does after Recv
                msgs.append((w.rank, "result", comp, us, time.time() - (now - done_at)))
                self.n_results += 1
        self.t["receive"] += time.perf_counter() - t0
        return msgs

    def batches(self, w, now):
        """--batch-rows: end the batch computing by now (its results join w.queue, ready at its end) and start the
        next from the chunks arrived by then, up to batch_rows rows; until a batch ends after now."""
        while True:
            if w.running is not None:
                end, batch = w.running
                if end > now:
                    return
                w.queue += [(end, cid, len(rows), rows) for cid, rows in batch]
                w.free_at, w.running = end, None
            if not w.pending or max(w.free_at, w.pending[0][0]) > now:
                return
            start, batch, n = max(w.free_at, w.pending[0][0]), [], 0
            while w.pending and w.pending[0][0] <= start and (not batch or n + len(w.pending[0][2]) <= self.batch_rows):
                _, cid, rows = w.pending.pop(0)
                batch.append((cid, rows))
                n += len(rows)
            dur = n * self.new_tokens / self.tok_s
            w.running, w.busy_s = (start + dur, batch), w.busy_s + dur

    def take_reports(self):   # (the simulated workers send no progress reports)
        return []

    def progress(self):
        pass

    def wait(self):
        t0 = time.perf_counter()
        nxt = min([w.queue[0][0] for w in self.workers.values() if w.queue]
                  + [w.running[0] for w in self.workers.values() if w.running is not None], default=None)
        pause = 0.0005 if nxt is None else min(0.0005, max(0.0, nxt - time.monotonic()))
        time.sleep(pause)
        self.t["idle"] += time.perf_counter() - t0

    def flush(self, seconds=10.0, firsts=False):
        pass

    def owns_process(self, rank):
        return False

    def abort(self, code):
        raise SystemExit(code)


class ResultPool:
    """Encoded completion buffers of synthetic tokens for chunks of any size up to the largest: the rows of a
    result are written into a copy of one of them (cheap), its tokens are a real backend's."""

    def __init__(self, model, new_tokens, max_rows, n=32):
        from gpt2job.backends import make_backend
        from gpt2job.backends.base import compute
        from gpt2job.model.weights import load_config
        cfg = load_config(model)
        s = JobSettings(input="", output="", model=model, max_new_tokens=new_tokens, backend="synthetic")
        be = make_backend("synthetic", cfg, s.generation(cfg.eos_token_id))
        rng = np.random.default_rng(1)
        self.full = []
        for k in range(n):
            toks = rng.integers(0, cfg.vocab_size, (max_rows, 16)).astype(np.int32)
            chunk = Chunk(k, np.arange(max_rows), np.arange(max_rows + 1, dtype=np.int64) * 16, toks.reshape(-1))
            self.full.append(compute(be, chunk))
        self.cache = {}

    def result(self, cid, rows):
        b = len(rows)
        key = (cid % len(self.full), b)
        if key not in self.cache:
            c = self.full[key[0]]
            from gpt2job.chunks import Completions
            sub = Completions(0, c.rows[:b], c.offsets[:b + 1], c.tokens[:c.offsets[b]], c.finish[:b])
            self.cache[key] = encode_completions(sub, 7000)
        buf = self.cache[key].copy()
        buf[0] = cid
        buf[4:4 + b] = rows      # [chunk_id, B, compute_us, T, rows, ...]: chunks.encode_completions
        return buf


def write_input(path, n, seed=0):
    import h5py
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("prompt_tokens", (n, 16), dtype=np.int32)
        step = 1 << 20
        for a in range(0, n, step):
            m = min(step, n - a)
            block = rng.integers(0, 50257, (m, 16)).astype(np.int32)
            dup = np.flatnonzero(rng.random(m) < 0.08)
            dup = dup[dup > 0]
            block[dup] = block[(rng.random(len(dup)) * dup).astype(np.int64)]   # repeats of earlier rows
            ds[a:a + m] = block


def timed(obj, name, bucket, key):
    fn = getattr(obj, name)

    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            bucket[key] += time.perf_counter() - t0
    setattr(obj, name, wrapper)


def one(n_workers, a, inp, out):
    from gpt2job.cluster.master import Master
    for p in (out, out + ".journal", out + ".lock"):
        if os.path.exists(p):
            os.remove(p)
    s = JobSettings(input=inp, output=out, model=a.model, max_new_tokens=a.new_tokens, backend="synthetic",
                    chunk_size=a.chunk_size, vocab_dir=a.vocab_dir, progress_interval=1e9, chunk_timeout=600,
                    layout=a.layout)
    pool = ResultPool(a.model, a.new_tokens, a.chunk_size)
    ch = SimChannel(n_workers, a.tok_s, a.new_tokens, pool, a.batch_rows)
    m = Master(s, None, channel=ch)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    m.prepare()
    # the output's processes ready (a sync through each text process: ~0.3-0.5 s of start-up, the tokenizer's load),
    # as they are in a real job, where the workers' own start-up (weights, kernels) takes seconds
    for _ in getattr(m.store.writer, "pipes", [None]):
        m.store.wait_written()
    t_prep = time.perf_counter() - t0
    spent = {"commit (count, copies, submit)": 0.0, "dispatch": 0.0}
    timed(m, "commit", spent, "commit (count, copies, submit)")
    timed(m, "feed", spent, "dispatch")
    journal = {"journal write+fsync": 0.0}
    timed(m.store.journal, "_write", journal, "journal write+fsync")
    cpu1 = time.process_time()
    t1 = time.perf_counter()
    m.run(None)
    t2 = time.perf_counter()
    m.progress.stream = open(os.devnull, "w")
    m.progress.close()
    sm = m.summary()
    m.store.finish(sm)
    t3 = time.perf_counter()
    cpu2 = time.process_time()
    w = m.store.writer
    rows = int(sum(x.rows for x in m.workers.values()))
    toks = int(m.generated)
    span = sm["generation_s"]
    busy = [ch.workers[r].busy_s / span for r in ch.workers] if span else [0]
    res = {
        "commit": git_commit(), "text": m.enc is not None, "layout": a.layout,
        "workers": n_workers, "tok_s_each": a.tok_s, "demand_tok_s": n_workers * a.tok_s,
        "chunk_size": a.chunk_size, "batch_rows": a.batch_rows, "rows": rows, "tokens": toks, "results": ch.n_results,
        "prepare_s": round(t_prep, 2), "span_s": round(span, 3), "run_s": round(t2 - t1, 3),
        "finish_s": round(t3 - t2, 3),
        "rows_per_s": round(rows / span), "tokens_per_s": round(toks / span),
        "rows_per_s_to_file_complete": round(rows / (t3 - t1)),
        "workers_busy_mean_percent": round(100 * float(np.mean(busy)), 1),
        "main_thread_s": {"receive (decode)": round(ch.t["receive"], 3), **{k: round(v, 3) for k, v in spent.items()},
                          "idle (wait)": round(ch.t["idle"], 3)},
        "journal_thread_s": round(journal["journal write+fsync"], 3), "journal_mb": round(
            os.path.getsize(out + ".journal") / 2**20) if os.path.exists(out + ".journal") else None,
        # (the writer thread's own seconds; a writer process reports its own: output_writer below)
        "writer_thread_s": round(w.write_s, 3) if hasattr(w, "write_s") else None,
        "writer_rows": getattr(w, "written_rows", None),
        "cpu_s_run_and_finish": round(cpu2 - cpu1, 2), "cpu_s_prepare": round(cpu1 - cpu0, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "output_mb": round((os.path.getsize(out)) / 2**20),
        "output_writer": _writer_summary(out),
    }
    return res


def _writer_summary(out):
    """The output's summary's output_writer entry (the writer process's seconds), or None."""
    import h5py
    with h5py.File(out, "r") as f:
        return json.loads(f.attrs["summary"]).get("output_writer") if "summary" in f.attrs else None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="15,63")
    ap.add_argument("--tok-s", type=float, default=600_000)
    ap.add_argument("--rows", type=int, default=2_000_000)
    ap.add_argument("--chunk-size", type=int, default=546)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--model", default="random:gpt2")
    ap.add_argument("--vocab-dir", default=vocab_dir())
    ap.add_argument("--no-text", action="store_true", help="no tokenizer: the output without its 'completions' text")
    ap.add_argument("--layout", choices=("vlen", "flat"), default="vlen", help="the output's layout (run --layout)")
    ap.add_argument("--batch-rows", type=int, default=0, help="the workers merge chunks into batches of up to this "
                                                              "many rows (see above; 0: one chunk at a time)")
    ap.add_argument("--dir", default="/tmp/gpt2job-master-scale")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", help="append one JSON line per run")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)    # one worker count, in this process
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    if a.no_text:    # a folder without the vocabulary: the master runs without a tokenizer
        a.vocab_dir = os.path.join(a.dir, "no-vocabulary")
        os.makedirs(a.vocab_dir, exist_ok=True)
    elif not os.path.isfile(os.path.join(a.vocab_dir, "vocab.bpe")):    # (a run without text would look faster)
        raise SystemExit(f"master_scale.py: no vocab.bpe in {a.vocab_dir or '(none found)'}: pass --vocab-dir DIR, "
                         "or --no-text")
    else:
        a.vocab_dir = os.path.abspath(a.vocab_dir)
    inp, out = os.path.join(a.dir, "in.h5"), os.path.join(a.dir, "out.h5")
    if not os.path.exists(inp) or _rows(inp) != a.rows:
        write_input(inp, a.rows)
    if a.one:
        print("RESULT " + json.dumps(one(a.one, a, inp, out)), flush=True)
        return
    try:
        for n in [int(x) for x in a.workers.split(",")]:   # each in a process of its own: its own peak memory
            p = subprocess.run([sys.executable, __file__, "--one", str(n), "--keep"] + _passed(a), capture_output=True,
                               text=True)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(p.stdout + p.stderr)
                raise SystemExit(f"the run with {n} workers failed")
            res = json.loads(line[7:])
            print(json.dumps(res), flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps({"bench": "master_scale", **res}) + "\n")
    finally:
        if not a.keep:
            shutil.rmtree(a.dir, ignore_errors=True)


def _passed(a):
    return ["--tok-s", str(a.tok_s), "--rows", str(a.rows), "--chunk-size", str(a.chunk_size), "--new-tokens",
            str(a.new_tokens), "--model", a.model, "--dir", a.dir, "--layout", a.layout,
            "--batch-rows", str(a.batch_rows)] \
        + ["--vocab-dir", a.vocab_dir] + (["--no-text"] if a.no_text else [])


def _rows(path):
    import h5py
    with h5py.File(path, "r") as f:
        return f["prompt_tokens"].shape[0]


if __name__ == "__main__":
    main()
