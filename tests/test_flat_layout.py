"""`run --layout flat` (files/h5flat.py): the same rows as the default layout, column for column, through the writer
thread and the writer process, with stops, repeated prompts, log-probabilities; export and show give the same
lines; a resume rebuilds it; a resume with the other layout is refused."""
import json
import re

import h5py
import numpy as np
import pytest

from conftest import TINY_TEXT_MODEL, job_env, read_output, run_gpt2job, write_token_input
from gpt2job.files import h5flat

re_kept = re.compile(r"(\d+) of \d+ rows are complete and kept")
COLUMNS = ("completion_tokens", "completions", "completion_logprobs", "top_logprob_ids", "top_logprobs")


def columns(path):
    """Every per-row column of an output, in either layout, as plain lists."""
    with h5py.File(path, "r") as f:
        n = len(f["done"])
        out = {k: [np.asarray(v).tolist() if not isinstance(v, bytes) else v for v in h5flat.rows(f, k, 0, n)]
               for k in COLUMNS if h5flat.has(f, k)}
        for k in ("done", "finish_reason", "text_exact", "stop_reason", "prompt_length"):
            if k in f:
                out[k] = f[k][()].tolist()
        out["layout"] = "flat" if h5flat.is_flat(f) else "vlen"
    return out


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    rows = [rng.integers(0, 50257, int(rng.integers(1, 9))).tolist() for _ in range(n)]
    for i in range(0, n, 7):      # repeated prompts: the greedy job computes them once (dedup copies)
        rows[i] = rows[0]
    return rows


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_flat_layout_holds_the_same_rows(tmp_path, vocab_dir, writer):
    inp = tmp_path / "in.h5"
    write_token_input(inp, prompts(300))
    common = ["--model", TINY_TEXT_MODEL, "--backend", "numpy", "--max-new-tokens", "6", "--vocab-dir", vocab_dir,
              "--stop", "e", "--stop-token-ids", "13", "--top-logprobs", "2", "--chunk-size", "37"]
    got = {}
    for layout in ("vlen", "flat"):
        out = tmp_path / f"{layout}.h5"
        run_gpt2job(["run", inp, out, "--layout", layout, *common], env=job_env(GPT2JOB_WRITER=writer), check=0)
        got[layout] = columns(out)
    vlen, flat = got["vlen"], got["flat"]
    assert flat.pop("layout") == "flat" and vlen.pop("layout") == "vlen"
    assert set(vlen) == set(flat) and set(COLUMNS) <= set(flat)
    assert vlen == flat
    assert all(vlen["done"]) and any(r == b"stop" for r in vlen["finish_reason"])
    with h5py.File(tmp_path / "flat.h5", "r") as f:     # dedup copies point at their source's data
        start, count = f["completion_tokens_start"][()], f["completion_tokens_count"][()]
        assert start[7] == start[0] and count[7] == count[0] > 0
        assert len(f["completion_tokens_data"]) < count.sum()
        assert "completion_tokens" not in f and "completions" not in f
    for cmd in ("export", "show"):
        lines = {}
        for layout in ("vlen", "flat"):
            out = tmp_path / f"{layout}.h5"
            args = ["export", out, tmp_path / f"{layout}.jsonl"] if cmd == "export" else ["show", out, "--limit", "20"]
            p = run_gpt2job(args, check=0)
            lines[layout] = ((tmp_path / f"{layout}.jsonl").read_text() if cmd == "export"     # show: its rows
                             else "\n".join(x for x in p.stdout.splitlines() if x.startswith(("[", "      "))))
        assert lines["vlen"] == lines["flat"], cmd
    assert len(lines["flat"].splitlines()) > 20


def test_flat_layout_resumes_and_refuses_the_other_layout(tmp_path):
    inp, out, full = tmp_path / "in.h5", tmp_path / "out.h5", tmp_path / "full.h5"
    write_token_input(inp, prompts(120, seed=1))
    args = ["--model", "random:n_layer=2,n_head=2,n_embd=32,vocab_size=50257", "--backend", "numpy",
            "--max-new-tokens", "5", "--chunk-size", "16", "--layout", "flat", "--logprobs"]
    run_gpt2job(["run", inp, full, *args], check=0)
    run_gpt2job(["run", inp, out, *args], check=0)
    with h5py.File(out, "r+") as f:        # as if killed with the journal lost: rows 40.. not done
        f["done"][40:] = 0
        f.attrs["finished"] = 0
        at = int(f["completion_tokens_start"][1])   # a kept row's value (row 0's data is shared by its copies): it
        # must come back as kept, not recomputed
        f["completion_logprobs_data"][at] = 0.0
    p = run_gpt2job(["run", inp, out, *args[:-3], "--layout", "vlen", "--logprobs"])
    assert p.returncode == 2 and "--overwrite" in p.stderr and "Traceback" not in p.stderr
    run_gpt2job(["run", inp, out, *args], check=0)
    assert json.loads(read_output(out)["attrs"]["summary"])["rows_resumed"] == 40
    a, b = columns(full), columns(out)
    assert b["completion_logprobs"][1][0] == 0.0 != a["completion_logprobs"][1][0]
    b["completion_logprobs"][1][0] = a["completion_logprobs"][1][0]
    # the rows computed again (40..) ran in other batches, where the numpy backend's BLAS may round a sum another way
    # (OpenBLAS 0.3.31: 4 rows' log-probabilities 1 ulp apart): those within 1e-5; the kept rows and every other
    # column exactly
    lp_a, lp_b = a.pop("completion_logprobs"), b.pop("completion_logprobs")
    assert lp_a[:40] == lp_b[:40] and [len(r) for r in lp_a] == [len(r) for r in lp_b]
    assert all(np.allclose(r, s, rtol=0, atol=1e-5) for r, s in zip(lp_a[40:], lp_b[40:]))
    assert a == b and all(b["done"])
    assert json.loads(read_output(out)["attrs"]["settings"])["layout"] == "flat"


def test_rows_marked_done_past_the_values_written_say_resume_not_overwrite(tmp_path):
    """A job stopped mid-write can leave rows marked done whose values never reached the file (HDF5 is not written in
    order): export, show and validate failed with an IndexError traceback on the flat layout (and called the default
    layout's file damaged, advising --overwrite: every completed row lost). Now one line; with the job's journal
    there (an unfinished output), the fix is the rerun that rebuilds the file."""
    from gpt2job.errors import UserError
    from gpt2job.files.export import export
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    write_token_input(inp, prompts(60, seed=2))
    run_gpt2job(["run", inp, out, "--model", "random:n_layer=1,n_head=2,n_embd=32,vocab_size=50257", "--backend",
                 "numpy", "--max-new-tokens", "5", "--layout", "flat", "--no-dedup"], check=0)
    with h5py.File(out, "r+") as f:
        data = f["completion_tokens_data"]
        data.resize((len(data) - 7,))   # the last rows' tokens cut off
        f.attrs["finished"] = 0
    with pytest.raises(UserError) as e:
        export(str(out), str(tmp_path / "o.jsonl"), True)
    assert "the file is damaged" in str(e.value) and "past the end of completion_tokens_data" in str(e.value)
    (tmp_path / "out.h5.journal").write_bytes(b"")   # its job's journal: an unfinished output
    p = run_gpt2job(["export", out, tmp_path / "o.jsonl"])
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("error") == 1, p.stderr
    assert "cannot be read: its job stopped while writing it" in p.stderr and "--overwrite" not in p.stderr, p.stderr
    assert f"run the same command again: it resumes, rebuilding the file from {out}.journal" in p.stderr, p.stderr


def test_text_span_and_gather():
    buf = np.frombuffer(b"ab\0\0xyz\0c\0", np.uint8)
    blob, st, sizes = h5flat.text_span(buf, np.array([0, 3, 4, 8]), np.array([2, 0, 3, 1]))    # consecutive: one slice
    assert blob.tobytes() == buf.tobytes() and st.tolist() == [0, 3, 4, 8] and sizes.tolist() == [2, 0, 3, 1]
    blob, st, sizes = h5flat.text_span(buf, np.array([8, 0, 0]), np.array([1, 2, 2]))          # out of order, repeated
    assert [blob[s:s + n].tobytes() for s, n in zip(st, sizes)] == [b"c", b"ab", b"ab"] and len(blob) == 5
    redone = np.frombuffer(b"ab\0stale text\0c\0new\0", np.uint8)  # row 1 decoded again: its first text is not kept
    blob, st, sizes = h5flat.text_span(redone, np.array([0, 16, 14]), np.array([2, 3, 1]))
    assert blob.tobytes() == b"ab\0c\0new\0"
    assert [blob[s:s + n].tobytes() for s, n in zip(st, sizes)] == [b"ab", b"new", b"c"]
    rng = np.random.default_rng(3)
    for _ in range(50):   # rows in any order, some of one string, some strings unused: every byte kept is used
        words = [bytes(rng.integers(1, 255, rng.integers(0, 6), dtype=np.uint8)) + b"\0" for _ in range(12)]
        pos = np.cumsum([0] + [len(w) for w in words])
        take = rng.integers(0, 12, rng.integers(1, 20))
        blob, st, sizes = h5flat.text_span(np.frombuffer(b"".join(words), np.uint8), pos[take],
                                           np.array([len(words[t]) - 1 for t in take]))
        assert [blob[s:s + n + 1].tobytes() for s, n in zip(st, sizes)] == [words[t] for t in take]
        assert len(blob) == sum(len(words[t]) for t in set(take.tolist()))
    far = np.concatenate([buf, np.ones(10000, np.uint8), buf])           # far apart: gathered
    blob, st, sizes = h5flat.text_span(far, np.array([10008, 0, 10004]) + len(buf) * np.array([1, 0, 1]),
                                       np.array([1, 2, 3]))
    assert len(blob) == 9 and [blob[s:s + n].tobytes() for s, n in zip(st, sizes)] == [b"c", b"ab", b"xyz"]
    data = np.arange(1000)
    start, count = np.array([900, 0, 5, 400, 0]), np.array([3, 2, 4, 0, 0])
    old, h5flat.READ_GAP = h5flat.READ_GAP, 10       # far apart: separate reads
    try:
        flat, at = h5flat._gather(data, start, count)
    finally:
        h5flat.READ_GAP = old
    assert len(flat) < 20
    assert [flat[s:s + c].tolist() for s, c in zip(at, count)] == [data[s:s + c].tolist() for s, c in zip(start, count)]


def test_flat_layout_under_mpirun_with_samples(tmp_path):
    """A master and two workers, sampled, two samples a prompt: the same rows in both layouts."""
    inp = tmp_path / "in.h5"
    write_token_input(inp, prompts(40, seed=2))
    args = ["--model", "random:n_layer=2,n_head=2,n_embd=32,vocab_size=50257", "--backend", "numpy",
            "--max-new-tokens", "4", "--chunk-size", "7", "--num-samples", "2", "--temperature", "0.8", "--seed", "5"]
    got = {}
    for layout in ("vlen", "flat"):
        run_gpt2job(["run", inp, tmp_path / f"{layout}.h5", "--layout", layout, *args], np_=3, check=0)
        got[layout] = columns(tmp_path / f"{layout}.h5")
        assert got[layout].pop("layout") == layout
    assert got["vlen"] == got["flat"] and len(got["flat"]["done"]) == 80 and all(got["flat"]["done"])


def test_dense_blocks_and_rows_held_back(tmp_path, monkeypatch):
    """dense_blocks: close rows as blocks, far ones alone; RowWriter (flat) holds scattered rows back and writes them
    at LATER_ROWS and at flush(), each row once."""
    from gpt2job.chunks import Completions
    from gpt2job.files import h5write
    a = np.array([5, 9, 12] + list(range(100, 300, 2)), np.int64)
    blocks, rest = h5write.dense_blocks(a.astype(np.uint64))
    assert [(lo, hi) for lo, hi, _, _ in blocks] == [(100, 299)] and a[rest].tolist() == [5, 9, 12]
    monkeypatch.setattr(h5write, "LATER_ROWS", 10)
    n = 60_000
    f = h5write.create_output(h5write.make_header(str(tmp_path / "o.h5"), n, {"settings": {"layout": "flat"}}, {},
                                                  False, None, 60), np.ones(n, np.int32))
    w = h5write.RowWriter(f, None, None)

    def put(r):
        w.put(Completions(0, r, np.arange(len(r) + 1, dtype=np.int64), (r % 1000).astype(np.int32),
                          np.zeros(len(r), np.uint8)))
    put(a)
    assert w.later_n == 3 and f["done"][100] == 1 and f["done"][5] == 0      # the block now, 3 rows held back
    b = np.arange(10_000, 18_000, 1000)
    put(b)                                                                     # 11 held back: all written
    assert w.later_n == 0 and f["done"][5] == 1 and f["done"][17_000] == 1
    put(np.array([50_000]))
    assert w.later_n == 1 and f["done"][50_000] == 0
    w.flush()
    every = np.concatenate([a, b, [50_000]])
    assert f["done"][()].sum() == len(every) and f["done"][50_000] == 1
    got = h5flat.rows(f, "completion_tokens", 0, n)
    assert all(got[int(r)].tolist() == [int(r) % 1000] for r in every)
    f.close()


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_a_job_that_stops_early_leaves_its_kept_rows_in_a_flat_output(tmp_path, writer):
    """A worker error ends the job after some chunks (one process: no other worker): every row the job says it kept
    is in the file, the flat layout's held-back rows (small writes, copies of repeated prompts) included, as with
    the default layout."""
    inp = tmp_path / "in.h5"
    write_token_input(inp, prompts(40))
    got = {}
    for layout in ("vlen", "flat"):
        out = tmp_path / f"{layout}.h5"
        p = run_gpt2job(["run", inp, out, "--layout", layout, "--model", TINY_TEXT_MODEL, "--backend", "numpy",
                         "--max-new-tokens", "4", "--chunk-size", "4"],
                        env=job_env(GPT2JOB_WRITER=writer, GPT2JOB_FAULT="0:4:raise"))
        assert p.returncode == 3, p.stderr
        kept = int(re_kept.search(p.stderr)[1])
        got[layout] = columns(out)
        assert 0 < kept < 40 and sum(got[layout]["done"]) == kept, p.stderr
    got["vlen"].pop("layout"), got["flat"].pop("layout")
    assert got["vlen"] == got["flat"]
