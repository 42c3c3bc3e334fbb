"""What a stored row costs the master, piece by piece (CPU, no GPU): the microsecond figures behind the design of
files/h5write.py, files/text.py and files/journal.py.

    python benchmarks/store_costs.py [--rows 1048576] [--json out.jsonl]

One JSON line per piece (median of 3 repeats, us per row): HDF5 writes of 8-token rows as h5py converts them
(write_direct of numpy objects) and in HDF5's own form (hvl_t pairs) over a sorted and an unsorted point selection,
65,536 rows a call; a vlen UTF-8 string column (35 bytes a row) from char pointers; finish_reason as a vlen string
and as S7; a uint8 column; the text of a row by row_text (tiktoken and Python a row) and by TokenText.batch_text
(4,096 rows a call; tokens drawn from the whole vocabulary: about 5% of rows are not valid UTF-8); the journal:
records encoded, written and fsynced, 15 chunks of 546 rows a group; whole rows through RowWriter in each output
layout (--layout vlen / flat).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time

from bench_common import vocab_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import h5py  # noqa: E402
import numpy as np  # noqa: E402
from h5py import h5s, h5t  # noqa: E402

BATCH = 1 << 16


def median_us(fn, rows, repeats=3):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1e6 * statistics.median(times) / rows, 3)


def hdf5_pieces(n, d):
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 50257, n * 8).astype(np.int32)
    text = np.zeros((n, 36), np.uint8)
    text[:, :35] = rng.integers(97, 123, (n, 35))
    text = text.reshape(-1)
    vint = h5t.vlen_create(h5t.NATIVE_INT32)
    vstr = h5t.C_S1.copy()
    vstr.set_size(h5t.VARIABLE)
    vstr.set_cset(h5t.CSET_UTF8)
    names = np.frombuffer(b"length\0", np.uint8)
    perm = rng.permutation(n)
    out = {}

    def column(name, dtype, write):
        def go():
            with h5py.File(os.path.join(d, "c.h5"), "w") as f:
                ds = f.create_dataset("c", (n,), dtype=dtype)
                for a in range(0, n, BATCH):
                    write(ds, a, min(n, a + BATCH))
        out[name] = median_us(go, n)

    def points(ds, rows):
        space = ds.id.get_space()
        space.select_elements(np.asarray(rows, np.uint64).reshape(-1, 1))
        return h5s.create_simple((len(rows),)), space

    def objects(ds, a, b):
        obj = np.empty(b - a, object)
        obj[:] = list(toks[a * 8:b * 8].reshape(-1, 8))
        ds.write_direct(obj, dest_sel=np.s_[a:b])

    def pairs(rows, a, b):
        p = np.empty(b - a, [("len", "<u8"), ("ptr", "<u8")])
        p["len"] = 8
        p["ptr"] = np.uint64(toks.ctypes.data) + np.arange(a, b, dtype=np.uint64) * 32
        return p

    def raw(order):
        def write(ds, a, b):
            rows = order(a, b)
            mem, space = points(ds, rows)
            ds.id.write(mem, space, pairs(rows, a, b), vint)
        return write

    vlen = h5py.vlen_dtype(np.int32)
    column("tokens vlen int32, h5py write_direct of objects", vlen, objects)
    column("tokens vlen int32, hvl_t pairs, sorted points", vlen, raw(lambda a, b: np.arange(a, b)))
    column("tokens vlen int32, hvl_t pairs, unsorted points", vlen, raw(lambda a, b: perm[a:b]))

    def strings(ds, a, b):
        mem, space = points(ds, np.arange(a, b))
        ds.id.write(mem, space, np.uint64(text.ctypes.data) + np.arange(a, b, dtype=np.uint64) * 36, vstr)
    column("text vlen str (35 bytes), char pointers", h5py.string_dtype(), strings)

    def reason_vlen(ds, a, b):
        mem, space = points(ds, np.arange(a, b))
        ds.id.write(mem, space, np.full(b - a, names.ctypes.data, np.uint64), vstr)
    column("finish_reason vlen str (format 1)", h5py.string_dtype(), reason_vlen)

    def reason_s7(ds, a, b):
        mem, space = points(ds, np.arange(a, b))
        ds.id.write(mem, space, np.full(b - a, b"length", "S7"))
    column("finish_reason S7 (format 2)", "S7", reason_s7)

    def flags(ds, a, b):
        mem, space = points(ds, np.arange(a, b))
        ds.id.write(mem, space, np.ones(b - a, np.uint8))
    column("done uint8", np.uint8, flags)
    return out


def text_pieces(vocab_dir):
    from gpt2job.files.text import TokenText, row_text
    from gpt2job.model.tokenizer import load_tokenizer
    enc = load_tokenizer(vocab_dir)
    tt = TokenText(enc)
    rng = np.random.default_rng(1)
    n = 1 << 17
    toks = rng.integers(0, enc.n_vocab, n * 8).astype(np.int32)
    fin = np.zeros(n, np.uint8)
    off = np.arange(4097, dtype=np.int64) * 8

    def batch():
        for a in range(0, n, 4096):
            tt.batch_text(off, toks[a * 8:(a + 4096) * 8], fin[a:a + 4096])

    def one_by_one():
        for i in range(0, 20000):
            row_text(enc, toks[i * 8:i * 8 + 8], 0)
    return {"text: TokenText.batch_text, 4,096 rows a call": median_us(batch, n),
            "text: row_text, a row at a time": median_us(one_by_one, 20000)}


def layout_pieces(vocab_dir, d, n=1 << 19, group=8192):
    """Whole rows through the writer's RowWriter in each output layout (run --layout): 8 tokens a row, the text
    made beforehand by RowText (as the text process does), groups of 8,192 rows in a shuffled order, each a range of
    rows with 8% holes whose rows come as copies in other groups (greedy dedup: repeated prompts anywhere in the
    input); us a row for RowWriter.prepare and RowWriter.write, each."""
    from gpt2job.chunks import Completions
    from gpt2job.files.h5write import RowWriter, create_output, make_header
    from gpt2job.files.text import RowText, TokenText
    from gpt2job.model.tokenizer import load_tokenizer
    tt = TokenText(load_tokenizer(vocab_dir))
    rng = np.random.default_rng(3)
    holes = rng.permutation(n)[:n // 12]          # rows that are copies of a row of another group
    is_hole = np.zeros(n, bool)
    is_hole[holes] = True
    src_group = rng.integers(0, n // group, len(holes))
    out = {}
    for layout in ("vlen", "flat"):
        def go(spent):
            key = {"settings": {"layout": layout} if layout == "flat" else {}}
            f = create_output(make_header(os.path.join(d, "l.h5"), n, key, {}, True, None, 2.0),
                              np.full(n, 16, np.int32))
            w, rt = RowWriter(f, tt, None), RowText(tt, None)
            for c in rng.permutation(n // group).tolist():
                rows = np.arange(c * group, (c + 1) * group, dtype=np.int64)
                rows = rows[~is_hole[rows]]
                copies = holes[src_group == c]
                comp = Completions(-1, rows, np.arange(len(rows) + 1, dtype=np.int64) * 8,
                                   rng.integers(0, 50000, len(rows) * 8).astype(np.int32), np.zeros(len(rows), np.uint8),
                                   copies.astype(np.int64), rng.integers(0, len(rows), len(copies)))
                text = rt.make(rows, comp.offsets, comp.tokens, comp.finish)
                t0 = time.perf_counter()
                prepared = list(w.prepare(comp, text))
                t1 = time.perf_counter()
                w.write(prepared)
                spent[0] += t1 - t0
                spent[1] += time.perf_counter() - t1
            t1 = time.perf_counter()
            w.flush()         # (the flat layout's scattered rows wait until then)
            spent[1] += time.perf_counter() - t1
            f.close()
        runs = []
        for _ in range(3):
            spent = [0.0, 0.0]
            go(spent)
            runs.append(spent)
        for i, what in enumerate(("prepare", "write")):
            out[f"rows, layout {layout}: RowWriter.{what} (tokens, text, flags)"] = round(
                1e6 * statistics.median(r[i] for r in runs) / n, 3)
    return out


def journal_piece(d):
    from gpt2job.chunks import Completions
    from gpt2job.files.journal import Journal
    rng = np.random.default_rng(2)
    comps = [Completions(k, np.arange(k * 546, k * 546 + 546), np.arange(547, dtype=np.int64) * 8,
                         rng.integers(0, 50257, 546 * 8).astype(np.int32), np.zeros(546, np.uint8))
             for k in range(15 * 64)]

    def go():
        j = Journal(os.path.join(d, "j"), header={"k": 1})
        for a in range(0, len(comps), 15):
            j.append_many(comps[a:a + 15])
        j.close()
    return {"journal: encode, write, fsync; groups of 15 x 546 rows": median_us(go, 546 * len(comps))}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1 << 20)
    ap.add_argument("--vocab-dir", default=vocab_dir())
    ap.add_argument("--json", help="append the JSON lines here")
    a = ap.parse_args()
    load = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory(prefix="gpt2job-costs-") as d:
        res = hdf5_pieces(a.rows, d)
        if a.vocab_dir and os.path.isfile(os.path.join(a.vocab_dir, "vocab.bpe")):
            res.update(text_pieces(a.vocab_dir))
            res.update(layout_pieces(a.vocab_dir, d))
        res.update(journal_piece(d))
    lines = [{"bench": "store_costs", "piece": k, "us_per_row": v, "rows_per_s": round(1e6 / v) if v else None,
              "date": time.strftime("%Y-%m-%d"), "load_before": load} for k, v in res.items()]
    for x in lines:
        print(json.dumps(x))
    if a.json:
        with open(a.json, "a") as f:
            f.writelines(json.dumps(x) + "\n" for x in lines)


if __name__ == "__main__":
    main()
