"""Writing completed rows into the output's HDF5 file, beside the master's loop.

h5py converts a variable-length element at a time through the HDF5 API (several times this module's cost for the token
rows); here each dataset is written with one H5Dwrite of HDF5's own in-memory form instead: an array of (length,
pointer) pairs into the flat token buffer for `completion_tokens`, and of pointers to NUL-terminated UTF-8 strings
for `completions`. HDF5 still stores each variable-length element on its own (a fixed cost per element):
`finish_reason`, which holds one of three words, is a fixed-length string since format 2. The rows of a write are
selected in row order (HDF5 writes scattered points in any other order far slower), as runs of consecutive rows
where they come in few runs (select_rows: a fixed-size column then costs about nothing per row); a fixed-size column
writes the dense blocks of a write's rows as one read and one write of the rows between (dense_blocks). The file is
what plain h5py reads: same datasets, same types. With `--layout flat` (files/h5flat.py) the tokens, text and
log-probabilities are appended to flat arrays instead, and each row gets a start and a length.

RowText.make (the rows' text), RowWriter.prepare (NumPy: order, pointers) and RowWriter.write (the HDF5 calls: h5py
holds the GIL through them) are separate steps. Two writers take rows from the master (files/writer.py): WriterThread
(in the master's process, for small jobs: nothing to start) and WriterProcess (large jobs: its own process, and the
text made by others, so that neither the master's loop nor the text waits for HDF5 or for the GIL). Both create the
file themselves, from what make_header gives them; WriterProcess takes each group of results as the journal's bytes
(files/journal.py), WriterThread as Completions.
"""
import errno
import json
import os
import resource

import numpy as np

from gpt2job.chunks import FINISH_NAMES, FINISH_STOP, Completions
from gpt2job.files import h5flat, h5logprobs, score_output
from gpt2job.files.text import RowText

FINISH_DTYPE = "S7"     # finish_reason: fixed-length ASCII, "" (zeros) while not done; format 2 (was vlen str)
BATCH_ROWS = 1 << 16    # rows per H5Dwrite: the temporaries stay small (large first-touch allocations are slow here)
FLAT_ROWS = ("completion_tokens_start", "completion_tokens_count", "completions_start", "completions_size")
MIN_BLOCK_ROWS = 64     # dense_blocks: fewer rows close together are selected one by one
FIXED = ("text_exact", "finish_reason", *FLAT_ROWS, "done")     # the fixed-size per-row columns (done last)
LATER_ROWS = 1 << 20    # the flat layout's scattered rows wait until this many (or a flush), then
LATER_SPAN = 256        # a block may span 256 rows per row (a read and a write of a few bytes a row, ~0.1 us a point)
MAX_RUNS = 256          # select_rows: a write of this many runs of consecutive rows or more selects points


# ---------------------------------------------------------------- the file

def close_quietly(f):
    """Close an output left unfinished (an error is on its way already; the journal has its rows)."""
    if f is not None:
        try:
            f.close()
        except Exception:
            pass


def flush_quietly(writer):
    """At a close (the job stops early): the rows held back written too (the flat layout's scattered rows), so that
    the file shows every row the job kept; a failure here is not the job's error (the journal has the rows)."""
    try:
        writer.flush()
    except Exception:
        pass


RESERVE = 16 << 20      # bytes a full disk keeps free before the writer stops (other programs write there too)


def check_disk_room(path, need, allocated=0):
    """Raise the OSError of a full disk (ENOSPC) or of a file-size limit (EFBIG) when `need` more bytes would not
    fit, before HDF5 finds out itself: HDF5 2.0 can crash (segfault) when a write fails halfway through its own
    bookkeeping (measured with RLIMIT_FSIZE), where this check gives the one clear line instead. allocated: the
    file's size as HDF5 has allocated it (its metadata cache writes there later)."""
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        size = max(os.path.getsize(path), allocated)
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
    except OSError:
        return
    if soft != resource.RLIM_INFINITY and size + need + min(RESERVE // 4, soft // 8) > soft:
        raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
    if st.f_bavail * st.f_frsize < need + RESERVE:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def make_header(path, n, key, attrs, text, vocab_dir, flush_interval, stops=None):
    """What a writer needs to create the output (JSON-able): the prompt lengths travel beside it. stops: the job's
    stops (row_stops.stops_header), None when it has none."""
    return {"path": path, "n": int(n), "key": key, "attrs": attrs, "text": bool(text), "vocab_dir": vocab_dir,
            "flush_interval": flush_interval, "stops": stops}


def create_output(header, prompt_lengths):
    """A new, empty output file at header['path'] (made beside it, then moved there); -> open h5py.File (r+). With
    attrs num_samples N > 1, rows [prompts * N]: prompt_index (int64) and sample_index (int32) say which prompt and
    sample each row is, and prompt_lengths (per prompt) are repeated per row."""
    import h5py
    path, n = header["path"], header["n"]
    tmp = path + ".tmp"
    try:
        with h5py.File(tmp, "w") as f:
            vstr = h5py.string_dtype("utf-8")
            if h5flat.wanted(header):       # --layout flat: flat arrays and a start and length per row
                lp, k = h5logprobs.wanted(header)
                h5flat.create_datasets(f, n, header["text"], k if lp else None)
            else:
                f.create_dataset("completion_tokens", (n,), dtype=h5py.vlen_dtype(np.int32))
                if header["text"]:
                    f.create_dataset("completions", (n,), dtype=vstr)
                h5logprobs.create_datasets(f, header)      # only a job with --logprobs
            if header["text"]:
                f.create_dataset("text_exact", (n,), dtype=np.uint8)
            f.create_dataset("done", (n,), dtype=np.uint8)
            f.create_dataset("finish_reason", (n,), dtype=FINISH_DTYPE)
            if header.get("stops"):     # only a job with stops: other outputs stay as they were
                f.create_dataset("stop_reason", (n,), dtype=vstr)
            samples = int(header["attrs"].get("num_samples", 1))   # --num-samples N: row r = sample r % N of
            lengths = np.asarray(prompt_lengths).astype(np.int32)   # prompt r // N (prompt_lengths: per prompt)
            if samples > 1:
                r = np.arange(n, dtype=np.int64)
                f.create_dataset("prompt_index", data=r // samples)
                f.create_dataset("sample_index", data=(r % samples).astype(np.int32))
                lengths = np.repeat(lengths, samples) if len(lengths) * samples == n else lengths
            f.create_dataset("prompt_length", data=lengths)
            for k, v in {**header["key"], **header["attrs"]}.items():
                f.attrs[k] = v if isinstance(v, (int, float, str)) else json.dumps(v, sort_keys=True)
            f.attrs["resume_key"] = json.dumps(header["key"], sort_keys=True)
            f.attrs["finished"] = 0
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    # a chunk cache that holds the flat layout's growing chunks (h5flat.py): appends then never read a chunk back
    return h5py.File(path, "r+", rdcc_nbytes=64 << 20)


def finish_output(f, summary):
    """The summary, finished = 1, closed and synced."""
    text = json.dumps(summary, sort_keys=True)
    extra = 12 * f["done"].shape[0] if score_output.is_score(f) else 0   # sum_logprob and n_tokens, 12 B a row
    check_disk_room(f.filename, 4 * len(text) + extra + (256 << 10), f.id.get_filesize())
    score_output.finalize(f)     # a score job's datasets get their names (nothing for a run)
    f.attrs["summary"] = text
    f.attrs["finished"] = 1
    path = f.filename
    f.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def token_text(header):
    """The TokenText a writer decodes with, or None (no text)."""
    if not header["text"]:
        return None
    from gpt2job.files.text import TokenText
    from gpt2job.model.tokenizer import load_tokenizer
    return TokenText(load_tokenizer(header["vocab_dir"]))


# ---------------------------------------------------------------- rows

class RowWriter:
    """Writes Completions into an open output file (h5py.File), every dataset of the rows at once."""

    def __init__(self, f, text=None, stops=None):
        """text: the TokenText the rows' text is made with (None: prepare() is given it, or the output has none)."""
        from h5py import h5t
        self.f, self.stops = f, stops     # stops: a row_stops.StopTable, or None
        self.vint = h5t.vlen_create(h5t.NATIVE_INT32)
        self.vstr = h5t.C_S1.copy()
        self.vstr.set_size(h5t.VARIABLE)
        self.vstr.set_cset(h5t.CSET_UTF8)
        self.names = np.array([FINISH_NAMES[k].encode() for k in range(max(FINISH_NAMES) + 1)], FINISH_DTYPE)
        self.ds = {k: f[k].id for k in ("completion_tokens", "completions", "text_exact", "done", "finish_reason",
                                         "stop_reason", *FLAT_ROWS) if k in f}
        if "stop_reason" not in self.ds:
            self.stops = None
        self.flat = h5flat.Appender(f) if h5flat.is_flat(f) else None     # --layout flat
        self.has_text = h5flat.has(f, "completions")     # its text: made by row_text, or given to prepare()
        self.row_text = RowText(text, self.stops) if self.has_text and text is not None else None
        self.lp = h5logprobs.Columns(f)                # log-probabilities, if the output has them
        self.ds.update(self.lp.ds)
        self.fresh = list(self.ds)      # datasets whose storage is not allocated yet
        self.later, self.later_n = [], 0    # write(): the flat layout's scattered rows, written by write_later()

    def prepare(self, comp: Completions, text=None):
        """The buffers of HDF5 writes of these rows (their copies too), for write(): one per BATCH_ROWS rows, each
        made when write() comes to it. text: RowText.make's result for comp's rows, made elsewhere (None: made
        here)."""
        hits, h = (sorted(text.hits.items()) if text is not None else []), 0
        for a in range(0, len(comp.rows), BATCH_ROWS):
            b = min(a + BATCH_ROWS, len(comp.rows))
            o = comp.offsets[a:b + 1]
            mine = (comp.copy_src >= a) & (comp.copy_src < b)
            part = None
            if text is not None:    # rows a..b of it (the strings stay where they are in the one buffer)
                mine_hits = {}
                while h < len(hits) and hits[h][0] < b:
                    mine_hits[hits[h][0] - a] = hits[h][1]
                    h += 1
                part = text._replace(starts=text.starts[a:b], sizes=text.sizes[a:b], exact=text.exact[a:b],
                                     hits=mine_hits)
            yield self._prepare(comp.rows[a:b], o - o[0], comp.tokens[o[0]:o[-1]], comp.finish[a:b],
                                comp.copy_rows[mine], comp.copy_src[mine] - a, self.lp.part(comp, o[0], o[-1]), part)

    def _prepare(self, rows, offsets, tokens, finish, copy_rows, copy_src, lp_part=None, text=None):
        n = len(rows)
        tokens = np.ascontiguousarray(tokens, np.int32)
        finish = np.asarray(finish)
        p = {"keep": [tokens]}
        hits, buf = {}, None                    # row index -> the stop string its text was cut before
        if self.has_text:
            t = text if text is not None else self.row_text.make(rows, offsets, tokens, finish)
            buf, starts, hits = t.buf, t.starts, t.hits
            p["keep"].append(buf)
            p["text_exact"] = t.exact.astype(np.uint8)
        if self.flat is not None:
            self.flat.prepare(p, offsets, tokens, None if buf is None else (buf, starts, t.sizes), lp_part)
        else:
            pairs = np.empty(n, [("len", "<u8"), ("ptr", "<u8")])       # HDF5's hvl_t {size_t len; void *p}
            pairs["len"] = np.diff(offsets)
            pairs["ptr"] = np.uint64(tokens.ctypes.data) + (offsets[:-1] * 4).astype(np.uint64)
            p["completion_tokens"] = pairs
            if buf is not None:
                p["completions"] = np.uint64(buf.ctypes.data) + starts.astype(np.uint64)
            self.lp.prepare(p, offsets, lp_part)
        p["finish_reason"] = self.names[finish]
        if self.stops is not None:
            p["stop_reason"] = self._reasons(offsets, tokens, finish, hits, p["keep"])
        p["done"] = np.ones(n + len(copy_rows), np.uint8)
        all_rows = np.concatenate([rows, copy_rows]) if len(copy_rows) else rows
        order = np.argsort(all_rows, kind="stable")
        for k in ("completion_tokens", "completions", "text_exact", "finish_reason", "stop_reason",   # a copy: its
                  *h5logprobs.NAMES, *FLAT_ROWS):
            # source's pointers (or starts and lengths)
            if k in p:
                p[k] = (np.concatenate([p[k], p[k][copy_src]]) if len(copy_rows) else p[k])[order]
        p["n"], p["rows"] = len(all_rows), np.asarray(all_rows, np.uint64)[order].reshape(-1, 1)
        # what the file may grow by, generously: HDF5 stores each variable-length element with a header of its own
        p["bytes"] = 2 * (128 * p["n"] + 4 * len(tokens) + sum(len(b) for b in p["keep"][1:])) + (64 << 10)
        p["bytes"] += 2 * p.pop("lp_bytes", 0) + p.pop("flat_bytes", 0)
        return p

    def _reasons(self, offsets, tokens, finish, hits, keep):
        """stop_reason pointers [n] (vLLM's stop_reason): the stop string a row's text was cut before, a stop token
        id (not EOS) as decimal text for a row that ended at one, "" otherwise."""
        reasons = dict(hits)
        at_id = np.flatnonzero((finish == FINISH_STOP) & (np.diff(offsets) > 0))
        if len(at_id) and self.stops.ids:
            for k, t in zip(at_id.tolist(), tokens[offsets[at_id + 1] - 1].tolist()):
                if k not in reasons:
                    reasons[k] = self.stops.id_reason(t)
        # a stop string whose text was not cut (no tokenizer here, or the match is not in the decoded text): the
        # row's own strings' first match is unknown; "" says so
        words = sorted(set(reasons.values()) - {""})
        blob = b"".join(w.encode("utf-8") + b"\0" for w in words) + b"\0"
        buf = np.frombuffer(blob, np.uint8)
        keep.append(buf)
        where = dict(zip(words, np.cumsum([0] + [len(w.encode("utf-8")) + 1 for w in words[:-1]]).tolist()))
        ptrs = np.full(len(finish), np.uint64(buf.ctypes.data) + np.uint64(len(blob) - 1), np.uint64)
        for k, w in reasons.items():
            if w:
                ptrs[k] = np.uint64(buf.ctypes.data) + np.uint64(where[w])
        return ptrs

    def _unallocated(self):
        """Bytes HDF5 allocates at the first write to a dataset (its whole contiguous storage)."""
        if self.fresh:
            self.fresh = [k for k in self.fresh if self.ds[k].get_storage_size() == 0]
        return sum(self.ds[k].shape[0] * self.ds[k].get_type().get_size() for k in self.fresh)

    def write(self, prepared):
        from h5py import h5s
        for p in prepared:
            if not p["n"]:
                continue
            check_disk_room(self.f.filename, p["bytes"] + self._unallocated(), self.f.id.get_filesize())
            if self.flat is not None:     # the data first: a row's start is written only once its data is there
                self.flat.write(p)
            rows = p["rows"][:, 0]
            blocks, rest = dense_blocks(rows)
            if self.flat is not None and len(rest):      # every column fixed-size: the scattered rows wait (later)
                self.later.append((p["rows"][rest], {k: p[k][rest] for k in FIXED if k in p}))
                self.later_n += len(rest)
                rest = rest[:0]
            space = mem = None
            for name, mtype in (("completion_tokens", self.vint), ("completions", self.vstr), ("text_exact", None),
                                ("finish_reason", None), ("stop_reason", self.vstr),
                                *self.lp.types.items(), *((k, None) for k in FLAT_ROWS), ("done", None)):   # done last
                if name not in p:
                    continue
                ds, values = self.ds[name], p[name]
                if mtype is None and (blocks or self.flat is not None):   # a fixed-size column (the flat
                    write_fixed(ds, p["rows"], values, blocks, rest)        # layout's other rows are held back)
                    continue
                if space is None:
                    space, mem = ds.get_space(), h5s.create_simple((p["n"],))
                    select_rows(space, p["rows"])
                ds.write(mem, space, values, mtype)
        if self.later_n >= LATER_ROWS:
            self.write_later()

    def write_later(self):
        """The flat layout's scattered rows of earlier writes (mostly copies of repeated prompts, anywhere in the
        file), sorted and written together: close enough then for dense blocks of a wider span."""
        if not self.later_n:
            return
        rows = np.concatenate([r for r, _ in self.later])
        order = np.argsort(rows[:, 0], kind="stable")
        rows = rows[order]
        cols = {k: np.concatenate([c[k] for _, c in self.later])[order] for k in self.later[0][1]}
        self.later, self.later_n = [], 0
        check_disk_room(self.f.filename, self._unallocated() + (64 << 10), self.f.id.get_filesize())
        blocks, rest = dense_blocks(rows[:, 0], 4096, LATER_SPAN)
        for name in cols:     # (FIXED's order: done last)
            write_fixed(self.ds[name], rows, cols[name], blocks, rest)

    def flush(self):
        """Everything written (the waiting rows too) and the file flushed."""
        self.write_later()
        self.f.flush()

    def finish(self, summary):
        """Everything written (the waiting rows too), then the file finished (finish_output: closed and synced)."""
        self.write_later()
        finish_output(self.f, summary)

    def put(self, comp):
        self.write(self.prepare(comp))


def dense_blocks(rows, gap=32, span=4):
    """The sorted rows [n] of a write as dense blocks and the rest: ([(first row, end row, a, b)] for rows[a:b] that lie
    close together (no two consecutive ones more than gap apart, the block at most span x its rows plus 4,096 long),
    the indices of the other rows). A fixed-size column writes a block as one read and one write of the rows between
    (a few bytes a row, whatever is there), where selecting the rows themselves costs ~0.1 us each, and far more when
    they are far apart: a group of chunks is a few ranges of rows with holes (repeated prompts), and their copies lie
    anywhere."""
    n = len(rows)
    if n < MIN_BLOCK_ROWS:
        return [], np.arange(n)
    cut = np.flatnonzero(np.diff(rows) > gap) + 1
    first, end = np.concatenate([[0], cut]), np.append(cut, n)
    count, lo, hi = end - first, rows[first].astype(np.int64), rows[end - 1].astype(np.int64) + 1
    ok = (count >= MIN_BLOCK_ROWS) & (hi - lo <= span * count + 4096)
    blocks = [(int(lo[i]), int(hi[i]), int(first[i]), int(end[i])) for i in np.flatnonzero(ok).tolist()]
    return blocks, np.flatnonzero(~np.repeat(ok, count))


def write_fixed(ds, rows, values, blocks, rest):
    """Rows [n, 1] (sorted) of the fixed-size dataset ds (a DatasetID) set to values [n]: dense_blocks' blocks as
    write_block, the rest as points."""
    for lo, hi, a, b in blocks:
        write_block(ds, lo, hi, rows[a:b, 0], values[a:b])
    if len(rest):
        from h5py import h5s
        space = ds.get_space()
        space.select_elements(rows[rest])
        ds.write(h5s.create_simple((len(rest),)), space, np.ascontiguousarray(values[rest]))


def write_block(ds, lo, hi, rows, values):
    """Rows (sorted, in lo..hi-1) of the fixed-size dataset ds (a DatasetID) set to values: lo..hi-1 read, updated,
    written back."""
    from h5py import h5s
    buf = np.empty(hi - lo, ds.dtype)
    space = ds.get_space()
    space.select_hyperslab((lo,), (hi - lo,))
    mem = h5s.create_simple((hi - lo,))
    ds.read(mem, space, buf)
    buf[rows - lo] = values
    ds.write(mem, space, buf)


def select_rows(space, rows):
    """Select sorted rows [n, 1] of a 1-d dataspace: as runs of consecutive rows (hyperslabs) when they come in few
    runs, as a chunk's rows do (a fixed-size column then costs about nothing per row, a point about 0.1 us; an
    OR of k runs costs O(k^2), hence MAX_RUNS), else as points."""
    flat = rows[:, 0]
    step = np.diff(flat)
    breaks = np.flatnonzero(step != 1) + 1
    if len(breaks) + 1 >= MAX_RUNS or (step <= 0).any():    # (an OR of runs would merge a repeated row)
        space.select_elements(rows)
        return
    from h5py import h5s
    starts = np.concatenate([[0], breaks])
    ends = np.append(breaks, len(flat))
    space.select_none()
    for a, b in zip(starts.tolist(), ends.tolist()):
        space.select_hyperslab((int(flat[a]),), (b - a,), op=h5s.SELECT_OR)
