"""Each row's stop strings: the input's optional `stop` dataset ([N] or [N, K] UTF-8 strings, "" for none) read into
flat arrays, resolved against the job's --stop (StopTable), and what the output's writer needs of them (stops_header,
stop_table_of: the writer's processes read the dataset again rather than receive it)."""
import numpy as np

from gpt2job.chunks import pack_stops, take_ragged, unpack_stops
from gpt2job.errors import UserError, plural
from gpt2job.files.h5files import JSONL_EXTENSIONS, check_rows_shape
from gpt2job.files.prompts import BLOCK_ROWS

STOP = "stop"
STOP_FIX = "write stop strings as variable-length UTF-8 strings, [N] or [N, K]; \"\" for none"


class StopTable:
    """Each row's stop strings: the input's `stop` dataset where a row has some, else the job's --stop. Flat arrays
    (RowParams' form): row i's own are raw_bytes[raw_offsets[i]:raw_offsets[i+1]], none when that is empty."""

    def __init__(self, job_stops, raw_offsets=None, raw_bytes=None, ids=(), eos=None, num_samples=1):
        self.job = tuple(job_stops)
        self.num_samples = num_samples     # of(): output rows, sample r % N of input row r // N (--num-samples N)
        self.ids, self.eos = frozenset(int(i) for i in ids), eos   # stop token ids; EOS when it stops a row
        blob = np.frombuffer(pack_stops(self.job), np.uint8)
        self.per_row = raw_offsets is not None
        if self.per_row:
            # the job's strings as one more row at the end (row N), which rows without their own point to
            self.offsets = np.append(raw_offsets, raw_offsets[-1] + len(blob)).astype(np.int64)
            self.bytes = np.concatenate([raw_bytes, blob]).astype(np.uint8)
            self.n = len(raw_offsets) - 1
        self.job_blob = blob

    def take(self, rows):
        """(offsets [B+1], bytes) of these rows' stop strings."""
        rows = np.asarray(rows, np.int64)
        if not self.per_row:
            b = len(self.job_blob)
            return np.arange(len(rows) + 1, dtype=np.int64) * b, np.tile(self.job_blob, len(rows))
        own = self.offsets[rows + 1] > self.offsets[rows]
        return take_ragged(self.offsets, self.bytes, np.where(own, rows, self.n))

    def id_reason(self, last_token):
        """stop_reason of a row that ended at a stop token (FINISH_STOP): a stop token id as decimal text, "" for EOS
        (vLLM: None for EOS, the id for stop_token_ids)."""
        t = int(last_token)
        return "" if t == self.eos or t not in self.ids else str(t)

    def of(self, row):
        """Output row row's stop strings (those of its input row): a tuple of str."""
        if not self.per_row:
            return self.job
        row //= self.num_samples
        raw = self.bytes[self.offsets[row]:self.offsets[row + 1]]
        return unpack_stops(raw) if len(raw) else self.job


def may_have_stops(path):
    """Whether a worker should prepare the stop strings' table: the input is a JSONL file (its lines may give "stop";
    the master converts it, a worker does not read it), or an HDF5 file with a `stop` dataset (False when it cannot
    be read: the master reports that)."""
    if str(path).lower().endswith(JSONL_EXTENSIONS):
        return True
    try:
        import h5py
        with h5py.File(path, "r") as f:
            return STOP in f
    except Exception:
        return False


def read_stop_dataset(path, ds, n_rows, h=None):
    """The `stop` dataset as flat arrays: (offsets int64 [N+1], bytes uint8): row i's stop strings, a NUL after
    each, in bytes[offsets[i]:offsets[i+1]] (empty: the row has none of its own). h hashes it as stored."""
    import h5py
    check_rows_shape(path, ds, STOP, n_rows, STOP_FIX, (1, 2))
    if h5py.check_string_dtype(ds.dtype) is None and ds.dtype.kind not in "SO":
        raise UserError(f"has dtype {ds.dtype}: it must be UTF-8 strings", path, STOP, STOP_FIX)
    lengths, pieces = [], []
    first, n_bad = None, 0
    if h is not None:
        h.update(f"stop:{ds.shape[1:]}".encode())
    for a in range(0, n_rows, BLOCK_ROWS):
        raw = ds[a:a + BLOCK_ROWS]
        raw = raw.reshape(len(raw), -1)
        blobs = []
        for i, row in enumerate(raw, a):
            parts = []
            for x in row:
                b = x if isinstance(x, bytes) else str(x).encode("utf-8")
                if not b:
                    continue
                try:
                    b.decode("utf-8")
                    good = b"\0" not in b
                except UnicodeDecodeError:
                    good = False
                if not good:
                    n_bad += 1
                    first = first or (i, b)
                    continue
                parts.append(b + b"\0")
            blobs.append(b"".join(parts))
        lens = np.fromiter(map(len, blobs), np.int64, len(blobs))
        blob = b"".join(blobs)
        if h is not None:
            h.update(lens.astype("<i8").tobytes())
            h.update(blob)
        lengths.append(lens)
        pieces.append(np.frombuffer(blob, np.uint8))
    if first is not None:
        raise UserError(f"row {first[0]} is {first[1][:40]!r}: each stop string must be UTF-8 text without NUL "
                        f"({plural(n_bad, 'string')} bad)", path, STOP, STOP_FIX)
    offsets = np.zeros(n_rows + 1, np.int64)
    if lengths:
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    return offsets, (np.concatenate(pieces) if pieces else np.zeros(0, np.uint8))


def stops_header(s, eos_token_id, rows):
    """What the output's writer needs to know of the job's stops (JSON-able; h5write.make_header), None when the
    job uses none (its output then has no stop_reason). rows: the input's InputRowSettings or None."""
    per_row = rows is not None and STOP in rows.given
    if not (s.stop or s.stop_token_ids or per_row):
        return None
    import os
    return {"stop": list(s.stop), "stop_token_ids": sorted(int(i) for i in s.stop_token_ids),
            "eos": None if s.ignore_eos else int(eos_token_id), "input": os.path.abspath(s.input) if per_row else None,
            "num_samples": s.num_samples}


def stop_table_of(header):
    """The StopTable of a writer (from stops_header), the input's `stop` dataset read again (rather than sent
    through the writer's pipe) where the job has one; None when the job uses no stops."""
    st = header.get("stops")
    if not st:
        return None
    so = sb = None
    n_samples = int(st.get("num_samples", 1))        # the output's rows: input rows x --num-samples
    if st.get("input"):
        import h5py
        with h5py.File(st["input"], "r") as f:
            so, sb = read_stop_dataset(st["input"], f[STOP], header["n"] // n_samples)
    return StopTable(st["stop"], so, sb, st["stop_token_ids"], st["eos"], n_samples)


def check_job_stops(s, vocab_size, rows, enc):
    """Before work starts: every --stop-token-ids id in the vocabulary; stop strings need the tokenizer (they are
    matched on the generated text)."""
    bad = [i for i in s.stop_token_ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"{', '.join(map(str, bad))} outside the vocabulary 0..{vocab_size - 1}",
                        field="--stop-token-ids", fix="give ids of this model's vocabulary")
    if enc is None and (s.stop or (rows is not None and STOP in rows.given)):
        raise UserError("stop strings need the tokenizer, which was not found", field="--stop" if s.stop else STOP,
                        fix="pass --vocab-dir (or set GPT2_VOCAB_DIR) to a folder with vocab.bpe and encoder.json")
