"""The flat output layout (`run --layout flat`, for jobs of millions of rows): each variable-length column is one flat
array with a start and a length per row, instead of one HDF5 variable-length element per row.

Why: HDF5 stores every element of a variable-length dataset on its own (a cost per element:
benchmarks/store_costs.py, RESULTS.md), so with tokens and text one writer process tops out below 1M rows/s;
appending a batch of rows to a flat array is one contiguous write.

  completion_tokens_data   int32   [T]     the generated tokens of every row, a batch of rows after another in the
                                           order they were written (not row order)
  completion_tokens_start  int64   [N]     row i: completion_tokens_data[start[i] : start[i] + count[i]]
  completion_tokens_count  int32   [N]     (0 while not done)
  completions_data         uint8   [B]     the rows' text, UTF-8, each followed by a NUL byte
  completions_start        int64   [N]     row i: bytes(completions_data[start[i] : start[i] + size[i]]).decode()
  completions_size         int32   [N]     in bytes, without the NUL
  completion_logprobs_data float32 [T]     --logprobs: token t's log-probability (indexed like the tokens)
  top_logprob_ids_data     int32   [T, K]  --top-logprobs K: token t's step's K most likely ids
  top_logprobs_data        float32 [T, K]  and their log-probabilities (attribute top_logprobs_k = K)
  file attribute layout = "flat"; every other dataset (done, finish_reason, text_exact, stop_reason, prompt_length,
  ...) is as in the default layout (README.md, "HDF5 contract").

Rows of identical prompts (dedup copies) point at the same data. `rows(f, name, a, b)` reads a column's rows in
either layout; `gpt2job export` writes the same JSONL from both.
"""
import numpy as np

from gpt2job.files.h5files import read_rows

TOKEN_COLUMNS = ("completion_tokens", "completion_logprobs", "top_logprob_ids", "top_logprobs")   # start/count
TEXT = "completions"
READ_GAP = 1 << 16      # rows(): data between two rows' spans up to this many elements is read, not skipped


def is_flat(f):
    v = f.attrs.get("layout", "")
    return (v.decode() if isinstance(v, bytes) else v) == "flat"


def wanted(header):
    """Does the job whose output header (h5write.make_header) this is ask for the flat layout?"""
    s = header["key"].get("settings")
    return isinstance(s, dict) and s.get("layout") == "flat"


def has(f, name):
    """Does the output hold column `name` (completion_tokens, completions, ...) in either layout?"""
    return name in f or (name + "_data" in f and is_flat(f))


def top_dataset(f):
    """The dataset that carries --top-logprobs' K (attribute top_logprobs_k) in either layout, or None."""
    return f["top_logprobs"] if "top_logprobs" in f else f["top_logprobs_data"] if has(f, "top_logprobs") else None


def dataset_names(f):
    """The names of the flat layout's own datasets in f (none in the default layout)."""
    if not is_flat(f):
        return []
    return [k for k in f.keys() if k.endswith(("_data", "_start", "_count", "_size"))
            and k.rsplit("_", 1)[0] in TOKEN_COLUMNS + (TEXT,)]


# ---------------------------------------------------------------- writing

def create_datasets(f, n, text, logprobs_k):
    """The flat layout's datasets in a new output (f: h5py.File); logprobs_k: None without --logprobs, else K."""
    f.attrs["layout"] = "flat"
    grow = {"maxshape": (None,), "chunks": (1 << 18,)}
    f.create_dataset("completion_tokens_data", (0,), dtype=np.int32, **grow)
    f.create_dataset("completion_tokens_start", (n,), dtype=np.int64)
    f.create_dataset("completion_tokens_count", (n,), dtype=np.int32)
    if text:
        f.create_dataset("completions_data", (0,), dtype=np.uint8, maxshape=(None,), chunks=(1 << 20,))
        f.create_dataset("completions_start", (n,), dtype=np.int64)
        f.create_dataset("completions_size", (n,), dtype=np.int32)
    if logprobs_k is not None:
        f.create_dataset("completion_logprobs_data", (0,), dtype=np.float32, **grow)
        if logprobs_k:
            for name, t in (("top_logprob_ids_data", np.int32), ("top_logprobs_data", np.float32)):
                f.create_dataset(name, (0, logprobs_k), dtype=t, maxshape=(None, logprobs_k),
                                 chunks=(max(1, (1 << 16) // logprobs_k), logprobs_k)).attrs["top_logprobs_k"] = \
                    np.int32(logprobs_k)


def text_span(buf, starts, sizes):
    """NUL-terminated strings at starts [n] in buf, of sizes [n] bytes without their NUL (files/text.py's Text) ->
    (their bytes with no unused byte between them, each string once with its NUL; starts [n] into that; sizes). The
    strings are usually one after another (one slice, no copy); rows decoded again (not valid UTF-8, cut at a stop
    string) have their text after the buffer, and their first text is dropped here."""
    starts, sizes = np.asarray(starts, np.int64), np.asarray(sizes, np.int64)
    if len(starts) == 0:
        return np.zeros(0, np.uint8), starts, sizes
    at, first, row = np.unique(starts, return_index=True, return_inverse=True)   # rows of one string: one copy
    lens = sizes[first] + 1
    new = np.zeros(len(at) + 1, np.int64)
    np.cumsum(lens, out=new[1:])
    cut = (np.flatnonzero(at[1:] != at[:-1] + lens[:-1]) + 1).tolist()          # a string not right after the last
    pieces = [buf[at[a]:at[b - 1] + lens[b - 1]] for a, b in zip([0] + cut, cut + [len(at)])]
    blob = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
    return blob, new[:-1][row.reshape(-1)], sizes


class Appender:
    """RowWriter's part for the flat datasets of an open output (f: h5py.File of the flat layout)."""

    def __init__(self, f):
        self.ds = {k: f[k] for k in ("completion_tokens_data", "completions_data", "completion_logprobs_data",
                                     "top_logprob_ids_data", "top_logprobs_data") if k in f}
        self.ends = {"tokens": self.ds["completion_tokens_data"].shape[0],
                     "text": self.ds["completions_data"].shape[0] if "completions_data" in self.ds else 0}

    def prepare(self, p, offsets, tokens, text=None, lp_part=None):
        """Adds to RowWriter's prepared batch p its per-row columns (starts relative to the batch's data, made
        absolute by write()) and the data to append: offsets [n+1] into tokens; text: (buffer, starts, sizes) of the
        rows' NUL-terminated strings; lp_part: h5logprobs.Columns.part's arrays or None."""
        p["completion_tokens_start"] = offsets[:-1].astype(np.int64)
        p["completion_tokens_count"] = np.diff(offsets).astype(np.int32)
        data = {"completion_tokens_data": tokens}
        if text is not None:
            blob, st, sizes = text_span(*text)
            p["completions_start"], p["completions_size"] = st, sizes.astype(np.int32)
            data["completions_data"] = blob
        if lp_part is not None:
            for name, a in zip(("completion_logprobs_data", "top_logprob_ids_data", "top_logprobs_data"), lp_part):
                if name in self.ds:
                    data[name] = a
                    p["lp_bytes"] = p.get("lp_bytes", 0) + a.nbytes
        p["flat"] = data
        # (the file may grow by a new chunk of each dataset appended to: RowWriter's room check)
        p["flat_bytes"] = sum(self.ds[k].chunks[0] * self.ds[k].dtype.itemsize * int(np.prod(self.ds[k].shape[1:]))
                              for k in data)

    def write(self, p):
        """Appends p's data, then makes its per-row starts absolute (before RowWriter writes them). Token-indexed
        data (tokens, log-probabilities) is written at one position, so the tokens' start indexes each."""
        data = p.pop("flat")
        t0, b0 = self.ends["tokens"], self.ends["text"]
        for name, a in data.items():
            at = b0 if name == "completions_data" else t0
            if len(a):
                ds = self.ds[name]
                ds.resize(at + len(a), axis=0)
                ds[at:at + len(a)] = a
        self.ends["tokens"] = t0 + len(data["completion_tokens_data"])
        p["completion_tokens_start"] += t0
        if "completions_data" in data:
            self.ends["text"] = b0 + len(data["completions_data"])
            p["completions_start"] += b0


# ---------------------------------------------------------------- reading (either layout)

def rows(f, name, a, b):
    """Column `name` (completion_tokens, completions, completion_logprobs, top_logprob_ids, top_logprobs) of rows
    a..b-1 in either layout, as h5py gives a variable-length dataset's rows: an object array of arrays (bytes for
    completions)."""
    if not is_flat(f):
        return read_rows(f[name], a, b)
    counts, vals = values(f, name, a, b)
    out = np.empty(len(counts), object)
    ends = np.cumsum(counts)
    out[:] = [v.tobytes() for v in np.split(vals, ends[:-1])] if name == TEXT else np.split(vals, ends[:-1])
    return out


def values(f, name, a, b):
    """The flat layout's column `name` of rows a..b-1: (counts [n] int64, the rows' values one row after another:
    int32 / float32, uint8 UTF-8 for completions, [.., K] flattened for the top log-probabilities)."""
    if name == TEXT:
        start, count = f["completions_start"][a:b], f["completions_size"][a:b]
    else:
        start, count = f["completion_tokens_start"][a:b], f["completion_tokens_count"][a:b]
    start, count = start.astype(np.int64), count.astype(np.int64)
    flat, at = _gather(f[name + "_data"], start, count)
    cum = np.zeros(len(count) + 1, np.int64)
    np.cumsum(count, out=cum[1:])
    vals = flat[np.repeat(at - cum[:-1], count) + np.arange(cum[-1], dtype=np.int64)]
    if vals.ndim > 1:
        count = count * vals.shape[1]
        vals = vals.reshape(-1)
    return count, vals


def _gather(data, start, count):
    """The rows' spans of dataset data, read as few slices (spans closer than READ_GAP share one read): -> (the
    values of the spans one after another, each row's start in them)."""
    n = len(start)
    if n == 0 or count.sum() == 0:
        return data[0:0], np.zeros(n, np.int64)
    order = np.argsort(start, kind="stable")
    s, e = start[order], start[order] + count[order]
    reach = np.maximum.accumulate(e)
    if int(reach[-1]) > len(data):   # rows marked done whose values never reached the file: a job stopped mid-write
        raise OSError(f"Unable to read rows past the end of {data.name.lstrip('/')} ({int(reach[-1]):,} > "
                      f"{len(data):,})")
    new = np.ones(n, bool)
    new[1:] = s[1:] > reach[:-1] + READ_GAP
    runs = np.flatnonzero(new)
    ends = np.append(runs[1:], n)
    pieces, where, base = [], np.empty(n, np.int64), 0
    for r0, r1 in zip(runs.tolist(), ends.tolist()):
        lo, hi = int(s[r0]), int(reach[r1 - 1])
        pieces.append(data[lo:hi])
        where[order[r0:r1]] = s[r0:r1] - lo + base
        base += hi - lo
    return np.concatenate(pieces), where
