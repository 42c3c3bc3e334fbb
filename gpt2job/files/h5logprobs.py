"""The log-probability datasets of an output (--logprobs, --top-logprobs K), beside h5write.py's RowWriter: made
only by jobs that ask for them (other outputs keep their layout), written with the same one-H5Dwrite-per-dataset
form (HDF5's (length, pointer) pairs into the flat arrays).

  completion_logprobs  vlen float32 [N]  row i: one value per generated token (aligned with completion_tokens):
                                         its log_softmax under the model's raw logits (model/logprobs.py)
  top_logprob_ids      vlen int32 [N]    with K > 0: row i holds n_generated x K ids, step-major (step s's K ids
  top_logprobs         vlen float32 [N]  are [s*K:(s+1)*K]), most likely first; reshape(-1, K). Both datasets
                                         carry the attribute top_logprobs_k = K.
"""
import numpy as np

from gpt2job.files import h5flat

NAMES = ("completion_logprobs", "top_logprob_ids", "top_logprobs")


def wanted(header):
    """(logprobs on, K) of the job whose output header (h5write.make_header) this is: from its settings."""
    s = header["key"].get("settings")
    s = s if isinstance(s, dict) else {}     # (a key made by hand, in tests, may hold anything there)
    return bool(s.get("logprobs")), int(s.get("top_logprobs") or 0)


def create_datasets(f, header):
    """The datasets in a new output, when the job asks for log-probabilities (else nothing)."""
    on, k = wanted(header)
    if not on:
        return
    import h5py
    n = header["n"]
    f.create_dataset("completion_logprobs", (n,), dtype=h5py.vlen_dtype(np.float32))
    if k:
        for name, t in (("top_logprob_ids", np.int32), ("top_logprobs", np.float32)):
            f.create_dataset(name, (n,), dtype=h5py.vlen_dtype(t)).attrs["top_logprobs_k"] = np.int32(k)


class Columns:
    """RowWriter's part for these datasets of an open output (ds empty and flat False: the output has none)."""

    def __init__(self, f):
        from h5py import h5t
        self.ds = {k: f[k].id for k in NAMES if k in f}
        self.flat = "completion_logprobs_data" in f      # the flat layout's (h5flat.Appender writes them)
        top = h5flat.top_dataset(f)
        self.k = int(top.attrs["top_logprobs_k"]) if top is not None else 0
        self.types = {"completion_logprobs": h5t.vlen_create(h5t.NATIVE_FLOAT),
                      "top_logprob_ids": h5t.vlen_create(h5t.NATIVE_INT32),
                      "top_logprobs": h5t.vlen_create(h5t.NATIVE_FLOAT)}

    def part(self, comp, t0, t1):
        """comp's arrays of its tokens t0..t1 (a batch of its rows), or None without these datasets."""
        if not self.ds and not self.flat:
            return None
        return tuple(a[t0:t1] for a in comp.logprob_arrays(self.k))

    def prepare(self, p, offsets, part):
        """Adds to RowWriter's prepared batch p the (length, pointer) pairs [n] of each dataset: offsets [n+1] of
        the batch's rows into part (self.part)."""
        if part is None:
            return
        lens = np.diff(offsets)
        for name, a, width in zip(NAMES, part, (1, self.k, self.k)):
            if name not in self.ds:
                continue
            a = np.ascontiguousarray(a)
            pairs = np.empty(len(lens), [("len", "<u8"), ("ptr", "<u8")])     # HDF5's hvl_t
            pairs["len"] = lens * width
            pairs["ptr"] = np.uint64(a.ctypes.data) + (offsets[:-1] * 4 * width).astype(np.uint64)
            p["keep"].append(a)
            p[name] = pairs
            p["lp_bytes"] = p.get("lp_bytes", 0) + a.nbytes
