"""Helpers shared by the benchmark scripts: paths, the workload definitions, prompt files, result records.

Nothing here needs a GPU, torch or pycuda, but pycuda_kernels and event_ms (pycuda imported there).
"""
import contextlib
import datetime
import json
import os
import re
import socket
import statistics
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


# Workloads of the performance issue (GPT-2 124M, greedy). W3 = W1 repeated 8 times (scaling over GPUs).
WORKLOADS = {
    "w1": {"file": "w1.h5", "max_new_tokens": 8, "ignore_eos": False,
           "what": "seed workload: 8,192 prompts x 16 tokens, 8 new tokens"},
    "w2": {"file": "w2.h5", "max_new_tokens": 256, "ignore_eos": True,
           "what": "2,048 prompts, lengths uniform 32..512, 256 new tokens, --ignore-eos"},
    "w3": {"file": "w3.h5", "max_new_tokens": 8, "ignore_eos": False,
           "what": "W1 repeated 8 times (65,536 prompts), 8 new tokens"},
    "w2mix": {"file": "w2mix.h5", "max_new_tokens": 256, "ignore_eos": True,
              "what": "W2's prompts with per-row max_new_tokens 1..256, temperature 0..1.2 (a third greedy), "
                      "top-k/top-p/seed per row, stop strings on half the rows"},
    "w1x4": {"file": "w1x4.h5", "max_new_tokens": 8, "ignore_eos": False,
             "what": "W1 with each prompt 4 times in a row (32,768 prompts): the input --num-samples 4 replaces"},
}
EOT = 50256


def shared_dir():
    """$GPT2JOB_SHARED, else ../shared: the read-only folder of the tokenizer files and the seed workload."""
    from gpt2job import envs
    return envs.get("GPT2JOB_SHARED") or os.path.join(ROOT, "..", "shared")


def seed_workload_path(cli_value=None):
    """--seed-workload, else $GPT2JOB_SEED_WORKLOAD, else .device/seed-workload/input.bin, else the shared folder's
    seed-workload/input.bin; None when none exists (callers fall back to random prompts). The seed workload (8,192 x
    16 int32) is never copied into the repository: it is read where it lies."""
    from gpt2job import envs
    for p in (cli_value, envs.get("GPT2JOB_SEED_WORKLOAD"), os.path.join(ROOT, ".device", "seed-workload", "input.bin"),
              os.path.join(shared_dir(), "seed-workload", "input.bin")):
        if p and os.path.isfile(p):
            return os.path.abspath(p)
    return None


def vocab_dir(flag=None):
    """--vocab-dir, else $GPT2_VOCAB_DIR, else .device/gpt2-vocab, else the shared folder's gpt2-vocab: the first
    folder with GPT-2's vocab.bpe and encoder.json ("" when none has them: the tokenizer then falls back to tiktoken's
    own)."""
    from gpt2job import envs
    for d in (flag, envs.get("GPT2_VOCAB_DIR"), os.path.join(ROOT, ".device", "gpt2-vocab"),
              os.path.join(shared_dir(), "gpt2-vocab")):
        if d and os.path.isfile(os.path.join(d, "vocab.bpe")) and os.path.isfile(os.path.join(d, "encoder.json")):
            return os.path.abspath(d)
    return ""


def load_seed_prompts(path=None, n=8192, plen=16, seed=0):
    """[n, plen] int32 prompt tokens from the seed workload, or seeded random tokens when it is absent.
    Returns (tokens, source)."""
    path = seed_workload_path(path)
    if path:
        toks = np.fromfile(path, dtype="<i4").reshape(-1, 16)
        if len(toks) >= n and plen <= 16:
            return np.ascontiguousarray(toks[:n, :plen]).astype(np.int32), path
    rng = np.random.default_rng(seed)
    return rng.integers(0, 50257, (n, plen)).astype(np.int32), f"random(seed={seed})"


# --logprobs' columns (files/h5logprobs.py), compared bit for bit with the tokens where both outputs hold them
LOGPROB_COLUMNS = ("completion_logprobs", "top_logprob_ids", "top_logprobs")


def tokens_of(path, column="completion_tokens"):
    """The rows of an output's column (default: completion_tokens), as arrays; None where it has no such column."""
    import h5py
    with h5py.File(path, "r") as f:
        return [np.asarray(t) for t in f[column][()]] if column in f else None


def same_tokens(a, b):
    """(every row's tokens equal, how many rows differ: a row only one output has counts) of two outputs; a row
    counts as differing too where both outputs hold --logprobs' columns and a value of them differs."""
    ta, tb = tokens_of(a), tokens_of(b)
    differ = {i for i, (x, y) in enumerate(zip(ta, tb)) if not np.array_equal(x, y)}
    for col in LOGPROB_COLUMNS:
        ca, cb = tokens_of(a, col), tokens_of(b, col)
        if ca is not None and cb is not None:
            differ |= {i for i, (x, y) in enumerate(zip(ca, cb)) if x.tobytes() != y.tobytes()}
    rows = len(differ) + abs(len(ta) - len(tb))
    return rows == 0, rows


def read_prompt_tokens(path):
    """The prompt token rows of an input HDF5 file (dataset prompt_tokens, vlen or 2-D) as a list."""
    import h5py
    with h5py.File(path, "r") as f:
        ds = f["prompt_tokens"]
        if ds.ndim == 2:
            a = ds[()].astype(np.int32)
            return [a[i] for i in range(len(a))]
        return [np.asarray(r, np.int32) for r in ds[()]]


def tokens_key(model_dir, prompts, new):
    """What a cached token file answers for: the model's weights (gpt2job's fingerprint of them), the prompts and the
    new tokens a row. A cache read back for other weights or prompts gave a false 0% agreement (session 61)."""
    import hashlib
    from gpt2job.model.weights import fingerprint
    h = hashlib.sha256(f"{fingerprint(model_dir)} {new} {len(prompts)}".encode())
    for p in prompts:
        h.update(np.asarray(p, "<i4").tobytes() + b"|")
    return h.hexdigest()[:32]


def save_tokens(path, toks, key):
    """toks (int32 [N, new]) to path, with the key (tokens_key) beside it in path.key."""
    toks.astype("<i4").tofile(path)
    with open(path + ".key", "w") as f:
        f.write(key + "\n")


def load_tokens(path, key, shape):
    """The tokens save_tokens wrote for this key, or None (no file, another key, another shape)."""
    try:
        with open(path + ".key") as f:
            if f.read().strip() != key:
                return None
        t = np.fromfile(path, "<i4")
    except OSError:
        return None
    return t.reshape(shape) if t.size == shape[0] * shape[1] else None


def read_output(path):
    """(summary dict, list of completion token arrays, attrs) of a finished gpt2job output."""
    import h5py
    with h5py.File(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        toks = [np.asarray(t, np.int32) for t in f["completion_tokens"][()]]
    summary = json.loads(attrs["summary"]) if "summary" in attrs else None
    return summary, toks, attrs


def tokens_matrix(rows, width):
    """List of token arrays -> [N, width] int32, rows shorter than width padded with -1."""
    out = np.full((len(rows), width), -1, np.int32)
    for i, r in enumerate(rows):
        r = r[:width]
        out[i, :len(r)] = r
    return out


def gpu_name():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
        return out[0].strip() if out else "cpu"
    except (OSError, subprocess.SubprocessError):
        return "cpu"


def gpu_count():
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
        n = sum(1 for line in out.splitlines() if line.startswith("GPU "))
    except (OSError, subprocess.SubprocessError):
        n = 0
    if n == 0:
        from gpt2job.backends import gpu_count as dev_count
        n = dev_count()
    return n


def git_commit():
    """The checkout's commit; a tree without its own .git (e.g. `git archive` copied to the GPU machine) says it in a
    COMMIT file at its root."""
    marker = os.path.join(ROOT, "COMMIT")
    if os.path.isfile(marker) and not os.path.exists(os.path.join(ROOT, ".git")):
        with open(marker) as f:
            return f.read().strip() or None
    try:
        c = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                           timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (c + ("+dirty" if dirty else "")) if c else None
    except (OSError, subprocess.SubprocessError):
        return None


def base_record(**kw):
    """Fields every result line carries."""
    rec = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
           "gpu": gpu_name(), "commit": git_commit()}
    rec.update(kw)
    return rec


def append_jsonl(path, rec):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")


def read_jsonl(paths):
    recs = []
    for p in paths:
        if not os.path.isfile(p):
            continue
        with open(p) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        recs.append(json.loads(line))
                    except ValueError:
                        pass
    return recs


def fmt_int(x):
    return "-" if x is None else f"{x:,.0f}"


def fmt_s(x):
    return "-" if x is None else f"{x:.2f}"


def print_table(headers, rows, out=sys.stdout):
    w = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]
    out.write("  ".join(str(h).ljust(w[i]) for i, h in enumerate(headers)).rstrip() + "\n")
    out.write("  ".join("-" * w[i] for i in range(len(headers))) + "\n")
    for r in rows:
        out.write("  ".join(str(c).ljust(w[i]) if i in (0, len(r) - 1) or not _numeric(c) else str(c).rjust(w[i])
                            for i, c in enumerate(r)).rstrip() + "\n")
    out.flush()


def _numeric(c):
    s = str(c).replace(",", "").replace("%", "").replace("x", "").strip()
    try:
        float(s)
        return True
    except ValueError:
        return s == "-"


@contextlib.contextmanager
def pycuda_kernels():
    """(pycuda.driver, Kernels with the default options) in a context of its own on GPU 0, popped at the end."""
    import pycuda.driver as drv
    from gpt2job.backends.cuda.kernels import Kernels
    from gpt2job.backends.cuda.options import KernelOptions
    drv.init()
    ctx = drv.Device(0).make_context()
    try:
        yield drv, Kernels(KernelOptions())
    finally:
        ctx.pop()
        ctx.detach()


@contextlib.contextmanager
def torch_kernels(variants=()):
    """(torch, Kernels compiling the named fp16 tile variants; none: the GPU's default set), PyCUDA on torch's
    primary context of its current GPU, popped at the end: our products and torch's on the same operands."""
    import torch
    torch.zeros(1, device="cuda")
    import pycuda.driver as drv
    from gpt2job.backends.cuda.kernels import Kernels
    from gpt2job.backends.cuda.options import KernelOptions
    drv.init()
    ctx = drv.Device(torch.cuda.current_device()).retain_primary_context()
    ctx.push()
    try:
        yield torch, Kernels(KernelOptions(f16_variants=tuple(variants)))
    finally:
        ctx.pop()


def to_gpu(drv, x):
    """A device copy of array x (pycuda allocation, at least 16 bytes)."""
    x = np.ascontiguousarray(x)
    g = drv.mem_alloc(max(x.nbytes, 16))
    drv.memcpy_htod(g, x)
    return g


def event_ms(drv, fn, repeats, stream=None):
    """fn()'s device time in ms, by CUDA events (on stream: the one fn launches on; None: the default stream): the
    median of repeats launches after one warm-up; and all of them."""
    fn()
    drv.Context.synchronize()
    times = []
    for _ in range(repeats):
        e0, e1 = drv.Event(), drv.Event()
        e0.record(stream)
        fn()
        e1.record(stream)
        e1.synchronize()
        times.append(e1.time_since(e0))
    return statistics.median(times), times


TIMELINE = re.compile(r"rank (\d+): chunk (-?\d+) device timeline \(ms since start\): (.*)$")


def device_timelines(text):
    """The workers' device timeline lines in a traced job's output (GPT2JOB_TRACE=1, gpt2job/cluster/worker.py):
    [(rank, chunk id, {name: (start, end) or a number})], times in ms since the worker's backend started."""
    out = []
    for line in text.splitlines():
        m = TIMELINE.search(line)
        if m:
            fields = {}
            for item in m.group(3).split(", "):
                name, _, v = item.partition(" ")
                x = [float(t) for t in re.findall(r"\d+(?:\.\d+)?", v)]   # (ms since the start: never negative)
                fields[name] = tuple(x) if len(x) == 2 else x[0]
            out.append((int(m.group(1)), int(m.group(2)), fields))
    return out
