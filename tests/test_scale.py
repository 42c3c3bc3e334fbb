"""Large jobs, at a size CI runs in well under a minute (issue 15 §3; benchmarks/scale_run.py does 10 million rows):
200,000 W1-like prompts with the synthetic backend (the output then goes through the writer process). The master's
memory grows by a bounded amount per row; a kill at about half way resumes to the very output of a clean run (and the
writer process dies with its master); a full disk midway is one clear line, exit 2, with every counted row in the
journal, and the same command completes once there is room. Also the pieces: batch text equals row_text, dedup stays
exact when keys collide, journal blocks stop at a damaged record, the synthetic backend's tokens."""
import json
import os
import resource
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import ROOT, VOCAB_DIR, alive, job_env, proc_stat
from gpt2job.chunks import FINISH_LENGTH, FINISH_STOP, Chunk, Completions
from gpt2job.files.journal import Journal, JournalReader
from gpt2job.files.writer import TEXT_PROCESSES

N = 200_000


def write_w1_like(path, n, seed=0):
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, 50257, (n, 16)).astype(np.int32)
    dup = np.flatnonzero(rng.random(n) < 0.08)
    dup = dup[dup > 0]
    toks[dup] = toks[(rng.random(len(dup)) * dup).astype(np.int64)]
    with h5py.File(path, "w") as f:
        f.create_dataset("prompt_tokens", data=toks)


def cmd(inp, out):
    """The job (with its text, and so the writer's text process, where the vocabulary files are present)."""
    text = ["--vocab-dir", str(VOCAB_DIR)] if (VOCAB_DIR / "vocab.bpe").is_file() else []
    return [sys.executable, "-m", "gpt2job", "run", str(inp), str(out), "--backend", "synthetic", "--max-new-tokens",
            "8", "--chunk-size", "546", "--progress-interval", "0.1"] + text


def contents(path):
    with h5py.File(path, "r") as f:
        out = {k: [x.tolist() if isinstance(x, np.ndarray) else bytes(x) for x in f[k][()]] for k in f
               if k not in ("done", "text_exact", "prompt_length")}
        out.update({k: f[k][()].tolist() for k in ("done", "text_exact", "prompt_length") if k in f})
        return out, json.loads(f.attrs["summary"]) if "summary" in f.attrs else None


def journal_rows(out):
    return sum(len(c.all_rows) for c in JournalReader(str(out) + ".journal").records())


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    inp = d / "in.h5"
    write_w1_like(inp, N)
    clean = d / "clean.h5"
    p = subprocess.run(cmd(inp, clean), env=job_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    return d, inp, contents(clean)


def test_master_memory_per_row_is_bounded(job):
    d, inp, (_, sm) = job
    small = d / "small_in.h5"
    write_w1_like(small, N // 10, seed=1)
    p = subprocess.run(cmd(small, d / "small.h5"), env=job_env(), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    with h5py.File(d / "small.h5", "r") as f:
        small_mb = json.loads(f.attrs["summary"])["master_peak_rss_mb"]
    per_row = (sm["master_peak_rss_mb"] - small_mb) * 2**20 / (N - N // 10)
    # README: about 170 bytes a row of 16 prompt tokens (the tokens are 64 of them) beyond a fixed ~200 MB
    assert per_row < 400, (sm["master_peak_rss_mb"], small_mb, per_row)
    assert sm["output_writer"]["process"] and sm["duplicate_prompts"] > 0


def test_kill_at_half_then_resume_is_identical_and_the_writer_dies_with_its_master(job):
    d, inp, (want, _) = job
    out = d / "kill.h5"
    # the worker hangs at its 250th chunk of ~370 (past a quarter of the rows): the job cannot end before the kill (one
    # chunk a batch: merged, a batch counts once, and there would be ~25)
    p = subprocess.Popen(cmd(inp, out), env=job_env(GPT2JOB_FAULT="0:250:hang", GPT2JOB_MERGE_CHUNKS=0),
                         stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    # killed once its journal holds a quarter of the rows (it stalls at ~70%); a progress line past half came only
    # where the master happened to print one before the hang, and the test then waited out the chunk timeout
    deadline = time.time() + 120
    while not (os.path.exists(str(out) + ".journal") and journal_rows(out) >= N // 4) and time.time() < deadline:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGSTOP)     # the master stops journaling now; its writer processes are found, then killed
    writers = [pid for pid in os.listdir("/proc") if pid.isdigit() and _is_writer_of(pid, p.pid)]
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    deadline = time.time() + 10
    while any(os.path.exists(f"/proc/{w}") and alive(w) for w in writers) and time.time() < deadline:
        time.sleep(0.05)
    assert ("completions" in want) == (VOCAB_DIR / "vocab.bpe").is_file()
    assert len(writers) == (1 + TEXT_PROCESSES if "completions" in want else 1)   # the writer, and text processes
    assert not any(alive(w) for w in writers), "the writer process outlived its master"
    kept = journal_rows(out)
    assert 0 < kept < N
    r = subprocess.run(cmd(inp, out), env=job_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got, sm = contents(out)
    assert sm["rows_resumed"] == kept and got == want


def _is_writer_of(pid, parent):
    st = proc_stat(pid)
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read()
    except OSError:
        return False
    return st is not None and int(st[1]) == parent and (
        b"gpt2job.files.writer" in cmd or b"gpt2job.files.text_process" in cmd)


def test_full_disk_midway_is_one_line_then_the_resume_completes(job):
    d, inp, (want, _) = job
    out = d / "disk.h5"
    limit = os.path.getsize(d / "clean.h5") // 2

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    p = subprocess.run(cmd(inp, out), env=job_env(), capture_output=True, text=True, timeout=300,
                       preexec_fn=small_disk)
    errors = [x for x in p.stderr.splitlines() if x.startswith("gpt2job: error:")]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert len(errors) == 1 and "completed rows are kept" in errors[0] and "free disk space" in errors[0]
    kept = journal_rows(out)
    assert 0 < kept
    r = subprocess.run(cmd(inp, out), env=job_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got, sm = contents(out)
    assert sm["rows_resumed"] == kept and got == want


N_DISK = 200_000


def test_full_disk_under_mpirun_releases_every_rank(tmp_path):
    """Results on their way when the master stops for a full disk: it receives them, so no rank waits for ever
    (without that, MPI_Finalize hung with the workers blocked in their sends)."""
    from conftest import require_mpirun
    require_mpirun()
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    # 200,000 rows: the journal alone outgrows the 4 MB limit, so the job stops mid-way whatever the HDF5 writer's lag
    # (with 60,000 the synthetic workers sometimes had every row journaled before the writer's error came back)
    write_w1_like(inp, N_DISK)

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))

    p = subprocess.run(["mpirun", "-np", "3", "--oversubscribe"] + cmd(inp, out) + ["--chunk-size", "200"],
                       env=job_env(GPT2JOB_WRITER="process"), capture_output=True, text=True, timeout=120,
                       preexec_fn=small_disk)
    errors = [x for x in p.stderr.splitlines() if x.startswith("gpt2job: error:")]
    assert p.returncode == 2 and len(errors) == 1 and "free disk space" in errors[0], p.stderr[-3000:]
    assert 0 < journal_rows(out) < N_DISK


# ---------------------------------------------------------------- the pieces

def test_batch_text_is_row_text(vocab_dir):
    from gpt2job.files.text import TokenText, row_text
    from gpt2job.model.tokenizer import load_tokenizer
    enc = load_tokenizer(vocab_dir)
    tt = TokenText(enc)
    single = [t for t in range(enc.n_vocab) if len(enc.decode_single_token_bytes(t)) == 1]   # raw bytes, NUL too
    rng = np.random.default_rng(3)
    plain = np.flatnonzero(tt.plain)       # a batch of these alone has no row to check: the other path
    for mix in (0.0, 0.3, 0.9, None):
        rows = [rng.choice(plain, k) if mix is None else
                np.where(rng.random(k) < mix, rng.choice(single, k), rng.integers(0, enc.n_vocab + 2, k))
                for k in rng.integers(0, 10, 3000)]
        offsets = np.zeros(len(rows) + 1, np.int64)
        np.cumsum([len(r) for r in rows], out=offsets[1:])
        finish = rng.integers(0, 3, len(rows)).astype(np.uint8)
        buf, starts, sizes, exact = tt.batch_text(offsets, np.concatenate(rows).astype(np.int32), finish)
        for b, r in enumerate(rows):
            s = int(starts[b])
            assert sizes[b] == int(np.argmax(buf[s:] == 0))        # the string ends at its first NUL
            got = bytes(buf[s:s + sizes[b]]).decode()
            assert (got, bool(exact[b])) == row_text(enc, r.astype(np.int32), finish[b]), (r, finish[b])


def test_take_ragged_gathers_items_in_order_with_repeats_and_empty_items():
    from gpt2job.chunks import take_ragged
    rng = np.random.default_rng(5)
    for _ in range(500):
        lens = rng.integers(0, 4, rng.integers(1, 7))          # empty items among them
        offsets = np.zeros(len(lens) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        values = rng.integers(0, 1000, (int(offsets[-1]), 2)).astype(np.int32)     # 2-D values: rows are items' parts
        idx = rng.integers(0, len(lens), rng.integers(0, 9))
        out, got = take_ragged(offsets, values, idx)
        want = [values[offsets[i]:offsets[i + 1]] for i in idx]
        assert out.tolist() == np.cumsum([0] + [len(w) for w in want]).tolist()
        assert got.dtype == values.dtype and got.shape == (int(out[-1]), 2)
        assert got.tolist() == (np.concatenate(want).tolist() if want else [])


def test_dedup_stays_exact_when_keys_collide(monkeypatch):
    from gpt2job.files import dedup
    from gpt2job.files.prompts import PromptSet
    weak = dedup.prompt_keys
    monkeypatch.setattr(dedup, "prompt_keys", lambda p, *rows: weak(p, *rows) & np.uint64(3))   # 4 keys in all
    rng = np.random.default_rng(4)
    for width in (None, 3, 4):
        pool = [rng.integers(0, 3, width if width else rng.integers(0, 4)).tolist() for _ in range(12)]
        rows = [pool[i] for i in rng.integers(0, len(pool), 200)]
        p = PromptSet.from_lists(rows, "t")
        sel = np.sort(rng.choice(len(rows), 150, replace=False))
        reps, copies = dedup.group_identical(p, sel)
        first, want = {}, {}
        for r in sel.tolist():
            rep = first.setdefault(tuple(rows[r]), r)
            if rep != r:
                want.setdefault(rep, []).append(r)
        assert reps.tolist() == sorted(first.values())
        assert {k: v.tolist() for k, v in copies.as_dict().items()} == want


def test_journal_blocks_stop_at_a_cut_or_damaged_record(tmp_path):
    path = str(tmp_path / "j")
    comps = [Completions(k, np.arange(k * 3, k * 3 + 3), np.array([0, 2, 2, 5]), np.arange(5, dtype=np.int32) + k,
                         np.array([FINISH_LENGTH, FINISH_STOP, FINISH_LENGTH], np.uint8),
                         np.array([100 + k]), np.array([2])) for k in range(6)]
    j = Journal(path, header={"k": 1})
    j.append_many(comps[:2])
    j.submit(Journal.encode(comps[2:]))       # the group commit in the background
    j.wait()
    j.close()
    ends = [os.path.getsize(path) - sum(len(Journal.encode([c])) for c in comps[k:]) for k in range(7)]
    got = [c for comps_, _ in JournalReader(path).blocks(size=50) for c in comps_]
    assert [c.chunk_id for c in got] == list(range(6)) and got[3].copy_rows.tolist() == [103]
    assert got[5].expanded().rows.tolist() == [15, 16, 17, 105] and got[5].n_generated == 8
    with open(path, "r+b") as f:
        f.truncate(ends[5] + 7)                    # the last record cut short
    r = JournalReader(path)
    assert len(list(r.records())) == 5 and r.end == ends[5]
    with open(path, "r+b") as f:
        f.seek(ends[2] + 30)                        # a damaged byte in the third record
        f.write(b"\xff")
    r = JournalReader(path)
    assert len(list(r.records())) == 2 and r.end == ends[2]


def test_synthetic_tokens_depend_on_the_prompt_not_on_the_chunk():
    from gpt2job.backends.base import compute
    from gpt2job.backends.synthetic import SyntheticBackend
    from gpt2job.model.config import GPT2Config
    from gpt2job.settings import GenerationSettings, SamplingSettings
    rng = np.random.default_rng(5)
    toks = rng.integers(0, 50257, (40, 6)).astype(np.int32)
    toks[30] = toks[3]

    def run(settings, rows):
        be = SyntheticBackend(GPT2Config(vocab_size=100, eos_token_id=7), settings)
        c = compute(be, Chunk(0, rows, np.arange(len(rows) + 1, dtype=np.int64) * 6, toks[rows].reshape(-1)))
        return [c.row_tokens(i).tolist() for i in range(len(rows))], c.finish.tolist()

    greedy = GenerationSettings(max_new_tokens=50, eos_token_id=7)
    whole, fin = run(greedy, np.arange(40))
    assert whole == run(greedy, np.arange(20))[0] + run(greedy, np.arange(20, 40))[0]
    assert whole[30] == whole[3] and whole[3] != whole[4] and all(0 <= t < 100 for r in whole for t in r)
    assert all((r[-1] == 7) == (f == FINISH_STOP) and 7 not in r[:-1] for r, f in zip(whole, fin))
    assert FINISH_STOP in fin and FINISH_LENGTH in fin
    sampled = GenerationSettings(max_new_tokens=50, eos_token_id=7, sampling=SamplingSettings(temperature=1.0, seed=2))
    s = run(sampled, np.arange(40))[0]
    assert s[30] != s[3] and s == run(sampled, np.arange(40))[0]


def test_the_output_readers_see_what_h5py_would_have_written(tmp_path, vocab_dir):
    """RowWriter's raw HDF5 writes (hvl_t pairs, char pointers, copies sharing their source's) read back with plain
    h5py as the rows written one by one would."""
    from gpt2job.files.h5write import RowWriter, create_output, make_header, token_text
    n = 50
    hdr = make_header(str(tmp_path / "o.h5"), n, {"k": 1}, {}, True, vocab_dir, 2.0)
    f = create_output(hdr, np.full(n, 4))
    rng = np.random.default_rng(6)
    rows = rng.permutation(n)[:30]
    lens = rng.integers(0, 6, 30)
    offsets = np.zeros(31, np.int64)
    np.cumsum(lens, out=offsets[1:])
    comp = Completions(0, rows, offsets, rng.integers(0, 50257, offsets[-1]).astype(np.int32),
                       rng.integers(0, 3, 30).astype(np.uint8), np.setdiff1d(np.arange(n), rows)[:10],
                       rng.integers(0, 30, 10))
    RowWriter(f, token_text(hdr)).put(comp)
    f.close()
    full = comp.expanded()
    with h5py.File(tmp_path / "o.h5", "r") as g:
        toks, fin, done, text = g["completion_tokens"][()], g["finish_reason"][()], g["done"][()], g["completions"][()]
        assert g["finish_reason"].dtype == np.dtype("S7")
    names = {0: b"length", 1: b"stop", 2: b"invalid"}
    from gpt2job.files.text import row_text
    from gpt2job.model.tokenizer import load_tokenizer
    enc = load_tokenizer(vocab_dir)
    for i, r in enumerate(full.rows):
        assert toks[r].tolist() == full.row_tokens(i).tolist() and done[r] == 1 and fin[r] == names[full.finish[i]]
        assert text[r].decode() == row_text(enc, full.row_tokens(i), full.finish[i])[0]
    untouched = np.setdiff1d(np.arange(n), full.rows)
    assert all(len(toks[r]) == 0 and done[r] == 0 and fin[r] == b"" for r in untouched)


@pytest.mark.parametrize("layout,texts", [("runs", 1), ("scattered", 1), ("runs", 2)])
def test_the_writer_process_and_its_text_process_write_what_the_thread_writes(tmp_path, vocab_dir, layout, texts):
    """The same results through WriterThread (text made in place) and WriterProcess (text made by its text process,
    or two of them taking turns, batches in flight): the same file. Chunks of 546 rows with a gap after each (a
    write of 5 chunks: 5 runs, selected as hyperslabs), and every other row (a run per row, more than MAX_RUNS:
    selected as points)."""
    from gpt2job.files.h5write import MAX_RUNS, make_header, token_text
    from gpt2job.files.writer import WriterProcess, WriterThread
    n = 12_000
    rng = np.random.default_rng(7)
    rows = (np.arange(n).reshape(-1, 600)[:, :546].reshape(-1) if layout == "runs" else np.arange(0, n, 2))
    assert 5 * 546 > MAX_RUNS      # scattered: every row of a write (5 chunks) is a run of its own
    comps = []
    for k, a in enumerate(range(0, len(rows), 546)):
        r = rows[a:a + 546]
        lens = rng.integers(0, 9, len(r))
        offsets = np.zeros(len(r) + 1, np.int64)
        np.cumsum(lens, out=offsets[1:])
        comps.append(Completions(k, r, offsets, rng.integers(0, 50257, offsets[-1]).astype(np.int32),
                                 rng.integers(0, 3, len(r)).astype(np.uint8)))
    got = []
    for kind in (WriterThread, WriterProcess):
        hdr = make_header(str(tmp_path / f"{kind.__name__}.h5"), n, {"k": 1}, {}, True, vocab_dir, 60)
        w = kind(hdr, np.full(n, 16, np.int32),
                 **({"text_processes": texts} if kind is WriterProcess else {"text": token_text(hdr)}))
        for a in range(0, len(comps), 5):
            w.put(comps[a:a + 5], Journal.encode(comps[a:a + 5]))
            if a == 10:
                w.wait()     # a sync between results
        w.finish({})
        got.append(contents(hdr["path"])[0])
        if kind is WriterProcess:
            assert len(w.procs) == 1 + texts
            with h5py.File(hdr["path"], "r") as f:
                spent = json.loads(f.attrs["summary"])["output_writer"]["text_process"]
            for x in ([spent] if texts == 1 else spent):
                assert set(x) == {"peak_rss_mb", "wait_s", "text_s", "send_s"}
    assert got[0] == got[1]
    done = np.zeros(n, bool)
    done[rows] = True
    assert got[0]["done"] == done.astype(int).tolist()
    assert sum(len(t) for t in got[0]["completion_tokens"]) == sum(len(c.tokens) for c in comps)


@pytest.mark.parametrize("texts", [1, 2])
def test_the_text_process_batches_results_with_copies_and_logprobs_into_what_the_thread_writes(tmp_path, vocab_dir,
                                                                                              texts):
    """Several chunks per message, each with copies (deduplicated prompts) and log-probabilities (top 2), through the
    text process's batches (one process, or two taking turns): the file is the thread writer's."""
    from gpt2job.files.h5write import make_header, token_text
    from gpt2job.files.writer import WriterProcess, WriterThread
    n, k = 4_000, 2
    rng = np.random.default_rng(8)
    comps = []
    for c, a in enumerate(range(0, n, 400)):     # rows a..a+299 computed, a+300..a+399 copies of some of them
        lens = rng.integers(0, 7, 300)
        offsets = np.zeros(301, np.int64)
        np.cumsum(lens, out=offsets[1:])
        t = int(offsets[-1])
        comp = Completions(c, np.arange(a, a + 300), offsets, rng.integers(0, 50257, t).astype(np.int32),
                           rng.integers(0, 3, 300).astype(np.uint8), np.arange(a + 300, a + 400),
                           rng.integers(0, 300, 100))
        comp.logprobs = -rng.random(t).astype(np.float32)
        comp.top_ids = rng.integers(0, 50257, (t, k)).astype(np.int32)
        comp.top_logprobs = -rng.random((t, k)).astype(np.float32)
        comps.append(comp)
    got = []
    for kind in (WriterThread, WriterProcess):
        hdr = make_header(str(tmp_path / f"{kind.__name__}.h5"), n,
                          {"k": 1, "settings": {"logprobs": True, "top_logprobs": k}}, {}, True, vocab_dir, 60)
        w = kind(hdr, np.full(n, 16, np.int32),
                 **({"text_processes": texts} if kind is WriterProcess else {"text": token_text(hdr)}))
        for a in range(0, len(comps), 4):
            w.put(comps[a:a + 4], Journal.encode(comps[a:a + 4]))
        w.finish({})
        got.append(contents(hdr["path"])[0])
    assert got[0] == got[1]
    assert got[0]["done"] == [1] * n and "top_logprobs" in got[0]
    assert got[0]["completion_tokens"][350] == got[0]["completion_tokens"][int(comps[0].copy_src[50])]


def test_an_error_of_the_text_process_reaches_the_master_and_both_processes_end(tmp_path):
    """The text process fails (here: no tokenizer files): the writer passes its error line on, the master raises
    it, and neither process is left behind."""
    from gpt2job.files.h5write import make_header
    from gpt2job.files.writer import WriterProcess
    hdr = make_header(str(tmp_path / "o.h5"), 10, {"k": 1}, {}, True, str(tmp_path / "no-vocab"), 60)
    for texts in (1, 2):
        w = WriterProcess(hdr, np.ones(10, np.int32), text_processes=texts)
        with pytest.raises(RuntimeError, match="vocab.bpe: --vocab-dir: missing"):
            w.wait()
        w.close()
        codes = [p.poll() for p in w.procs]       # (each text process fails on its own; the writer relays the first)
        assert codes[0] == codes[-1] == 1 and None not in codes


def test_the_writer_reads_the_text_processes_in_the_turn_the_master_dealt_their_units():
    """pipes.InTurn: H and P from the first pipe, then a unit from each pipe in turn (an R and its T, or an S), the
    X's of every pipe before F. Once a unit's last message is handed out, `box` is the next unit's pipe: the writer
    waits for input there (it waited on the pipe just read, and so for that text process's next unit, while the other's
    was ready)."""
    from gpt2job.files.pipes import MSG, Inbox, InTurn, Relayed

    def pipe(*msgs):
        r, w = os.pipe()
        os.write(w, b"".join(MSG.pack(k, len(p)) + p for k, p in msgs))
        os.close(w)
        return Inbox(r, {"wait_s": 0.0})
    a = pipe((b"H", b"h"), (b"P", b"p"), (b"R", b"r0"), (b"T", b"t0"), (b"R", b"r2"), (b"T", b"t2"), (b"X", b"x0"),
             (b"F", b"f"))
    b = pipe((b"S", b"s1"), (b"X", b"x1"), (b"F", b"f"))
    turns = InTurn([a, b])
    got = [(payload, turns.turn) for kind, payload in turns]
    assert [g[0] for g in got] == [b"h", b"p", b"r0", b"t0", b"s1", b"r2", b"t2", b"x0", b"x1", b"f"]
    assert [g[1] for g in got[:7]] == [0, 0, 0, 1, 0, 0, 1]     # after t0: b's turn; after s1: a's; after t2: b's
    with pytest.raises(Relayed, match="error 0 boom"):      # a text process's error, in its turn
        list(InTurn([pipe((b"H", b"h"), (b"P", b"p"), (b"S", b"")), pipe((b"E", b"error 0 boom\n"))]))


def test_inbox_returns_messages_whole_and_in_order_however_the_pipe_splits_them():
    """pipes.Inbox: messages of 0 B to 3 MB (a large one's rest is read straight into its own buffer), written in
    pieces of random sizes with pauses; waiting() is true once a message has begun; a message cut off by the end of
    input gives None."""
    import threading
    import time

    from gpt2job.files.pipes import MSG, Inbox
    rng = np.random.default_rng(6)
    sizes = [0, 1, 5, 1 << 20, 3 << 20, 17, (1 << 20) - 9, 2 << 20, 0, 4096]
    msgs = [(bytes([65 + i]), rng.integers(0, 256, n, dtype=np.uint8).tobytes()) for i, n in enumerate(sizes)]
    blob = b"".join(MSG.pack(k, len(p)) + p for k, p in msgs) + MSG.pack(b"R", 100) + b"cut"
    r, w = os.pipe()

    def write():
        at = 0
        while at < len(blob):
            n = int(rng.integers(1, 3 << 20))
            at += os.write(w, blob[at:at + n])
            if rng.random() < 0.3:
                time.sleep(0.01)
        os.close(w)
    t = threading.Thread(target=write)
    t.start()
    box = Inbox(r, {"wait_s": 0.0})
    got = []
    while (m := box.next()) is not None:
        got.append((m[0], bytes(m[1])))
    t.join()
    os.close(r)
    assert got == msgs                             # all of them, whole, in order; the cut one: None
    r, w = os.pipe()
    box = Inbox(r, {"wait_s": 0.0})
    assert not box.waiting()
    os.write(w, MSG.pack(b"R", 4) + b"ab")         # begun, not whole: waiting, and next() waits for the rest
    assert box.waiting()
    threading.Timer(0.05, lambda: (os.write(w, b"cd"), os.close(w))).start()
    assert box.next() == (b"R", b"abcd") and box.next() is None
    os.close(r)


def test_select_rows_takes_runs_points_and_repeated_rows(tmp_path):
    """select_rows: rows in a few runs (hyperslabs), in many runs (points), and a row repeated within a write
    (points: an OR of runs would merge it and select fewer elements than the buffer holds), each written in order."""
    from h5py import h5s

    from gpt2job.files.h5write import MAX_RUNS, select_rows
    with h5py.File(tmp_path / "s.h5", "w") as f:
        ds = f.create_dataset("c", (4 * MAX_RUNS,), dtype=np.int32)
        for rows in ([3, 4, 5, 9, 10, 20], list(range(0, 4 * MAX_RUNS, 2)), [5, 5, 6, 7]):
            ds[...] = -1
            r = np.asarray(rows, np.uint64).reshape(-1, 1)
            space = ds.id.get_space()
            select_rows(space, r)
            assert space.get_select_npoints() == len(rows)
            vals = np.arange(100, 100 + len(rows), dtype=np.int32)
            ds.id.write(h5s.create_simple((len(rows),)), space, vals)
            want = np.full(4 * MAX_RUNS, -1, np.int32)
            want[np.asarray(rows)] = vals                     # (a repeated row: the last value)
            assert ds[...].tolist() == want.tolist()


@pytest.mark.parametrize("text", [False, True])
def test_the_writer_process_flushes_rows_of_a_quiet_job(tmp_path, vocab_dir, text):
    """Rows written, then no message for a while: the writer flushes them once flush_interval has passed, so a kill
    of the job then leaves them in the file (the journal has them anyway)."""
    from gpt2job.files.h5write import make_header
    from gpt2job.files.writer import WriterProcess
    hdr = make_header(str(tmp_path / "q.h5"), 200, {"k": 1}, {}, text, vocab_dir, 0.3)
    w = WriterProcess(hdr, np.ones(200, np.int32))
    w.wait()       # its processes up and the file made (a busy machine starts them slowly): the sleep is the flush's
    comps = [Completions.from_lists(0, list(range(100)), [[5, 6, 7]] * 100, [FINISH_LENGTH] * 100)]
    w.put(comps, Journal.encode(comps))
    time.sleep(2.5)
    for p in w.procs:
        p.kill()
    for p in w.procs:
        p.wait()
    with h5py.File(hdr["path"], "r") as f:
        assert int(f["done"][()].sum()) == 100


def test_a_ctrl_c_at_the_terminal_does_not_reach_the_writer_s_processes(tmp_path, vocab_dir):
    """The writer and text processes run in a session of their own: a SIGINT to the master's process group (Ctrl-C)
    cannot interrupt them while they import (it printed their tracebacks); the master closes them."""
    from gpt2job.files.h5write import make_header
    from gpt2job.files.writer import WriterProcess
    hdr = make_header(str(tmp_path / "c.h5"), 10, {"k": 1}, {}, True, vocab_dir, 60)
    w = WriterProcess(hdr, np.ones(10, np.int32), text_processes=2)
    try:
        assert len(w.procs) == 3
        for p in w.procs:
            assert os.getpgid(p.pid) == p.pid != os.getpgid(0)
    finally:
        w.finish({})
        w.close()


def test_the_writer_s_processes_end_with_a_killed_master(tmp_path, vocab_dir):
    """In sessions of their own no group signal reaches them: a master killed (SIGKILL) ends them through
    PR_SET_PDEATHSIG (pipes.die_with_parent)."""
    code = (f"import sys, time, numpy as np; from gpt2job.files.h5write import make_header; "
            f"from gpt2job.files.writer import WriterProcess; "
            f"w = WriterProcess(make_header({str(tmp_path / 'm.h5')!r}, 10, {{'k': 1}}, {{}}, True, {vocab_dir!r}, 60),"
            f" np.ones(10, np.int32), text_processes=2); w.wait(); print(*[p.pid for p in w.procs], flush=True); "
            f"time.sleep(60)")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=job_env(),
                         cwd=str(ROOT), start_new_session=True)
    try:
        children = [int(x) for x in p.stdout.readline().split()]
        assert len(children) == 3 and all(alive(c) for c in children)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
        deadline = time.time() + 20
        while any(alive(c) for c in children) and time.time() < deadline:
            time.sleep(0.05)
        assert not any(alive(c) for c in children)
    finally:
        if p.poll() is None:
            p.kill()


def test_a_killed_text_process_is_named_in_the_master_s_error(tmp_path, vocab_dir):
    from gpt2job.files.h5write import make_header
    from gpt2job.files.writer import WriterProcess
    hdr = make_header(str(tmp_path / "k.h5"), 10, {"k": 1}, {}, True, vocab_dir, 60)
    w = WriterProcess(hdr, np.ones(10, np.int32), text_processes=2)
    w.wait()
    w.procs[0].kill()
    w.procs[0].wait()
    with pytest.raises(RuntimeError, match="text process ended unexpectedly \\(signal 9\\)"):
        w.finish({})
    w.close()


@pytest.mark.parametrize("batch_rows", [0, 1000])
def test_the_master_benchmark_s_simulated_workers_answer_for_their_chunks(tmp_path, batch_rows):
    """benchmarks/master_scale.py: every row of the input comes back once (its simulated workers once answered with
    rows shifted by a word, which made every result take the master's slow path and lose a row); also when they
    compute merged batches (--batch-rows: 2 x 5 chunks out with each)."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "master_scale.py"), "--workers", "3", "--rows", "20000",
                        "--chunk-size", "200", "--no-text", "--dir", str(tmp_path), "--batch-rows", str(batch_rows)],
                       capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    res = json.loads([x for x in p.stdout.splitlines() if x.startswith("{")][-1])
    assert res["rows"] == 20000 and res["tokens"] == 20000 * 8 and res["batch_rows"] == batch_rows


def test_a_killed_writer_process_is_one_line_whose_fix_is_to_rerun(tmp_path, monkeypatch):
    """The writer process killed (out of memory, by hand): the job's error names it and says the rows are kept and a
    rerun resumes (it said "check the path and its permissions", a QA helper found)."""
    from gpt2job import envs
    from gpt2job.chunks import FINISH_LENGTH, Completions
    from gpt2job.errors import UserError
    from gpt2job.files.output import OutputStore
    monkeypatch.setattr(envs, "get", lambda name, _get=envs.get: "process" if name == "GPT2JOB_WRITER" else _get(name))
    st = OutputStore(str(tmp_path / "o.h5"), 10, {"k": 1}, np.ones(10, np.int32))
    st.add_many([Completions.from_lists(0, np.arange(5), [[7, 8]] * 5, [FINISH_LENGTH] * 5)])
    for p in st.writer.procs:
        p.kill()
        p.wait()
    with pytest.raises(UserError) as e:
        st.add_many([Completions.from_lists(1, np.arange(5, 10), [[7, 8]] * 5, [FINISH_LENGTH] * 5)])
        st.finish({})
    assert "ended unexpectedly (signal 9); completed rows are kept" in str(e.value), str(e.value)
    assert "run the same command again to resume" in str(e.value) and "permissions" not in str(e.value)
    st.close()
