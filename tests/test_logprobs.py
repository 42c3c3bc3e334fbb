"""--logprobs / --top-logprobs K: the reference (model/logprobs.py: log_softmax of the raw logits, top K descending
with ties to the lower id), the NumPy backend end to end against values computed directly from the model, the MPI
buffers, the journal records, dedup copies, a resume after a crash, and export. CPU only, fast."""
import dataclasses
import json

import h5py
import numpy as np
import pytest

from conftest import crash_after_a_kept_chunk, job_env, run_gpt2job, write_token_input
from gpt2job.backends.base import compute
from gpt2job.backends.numpy_backend import NumpyBackend
from gpt2job.chunks import Chunk, Completions, decode_completions, encode_completions
from gpt2job.files.journal import Journal, read_journal, records_of
from gpt2job.model import reference
from gpt2job.model.logprobs import log_softmax, token_logprobs
from gpt2job.model.weights import load_params
from gpt2job.settings import GenerationSettings, SamplingSettings

MODEL = "random:n_layer=2,n_head=2,n_embd=32,vocab_size=50257"
K = 3


# ---------------------------------------------------------------- the reference

def test_golden_values():
    lg = np.array([[1.0, 2.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]], np.float32)
    lp, ids, top = token_logprobs(lg, [0, 3], k=3)
    lse = np.log(np.exp(1) + np.exp(2) + 2 * np.exp(3))
    np.testing.assert_allclose(lp, [1 - lse, np.log(0.25)], rtol=1e-6)
    assert ids.tolist() == [[2, 3, 1], [0, 1, 2]]               # descending, ties: the lower id first
    np.testing.assert_allclose(top[0], [3 - lse, 3 - lse, 2 - lse], rtol=1e-6)
    assert lp.dtype == top.dtype == np.float32 and ids.dtype == np.int32
    # a chosen token outside the top K keeps its own value; K = 0: no top arrays
    lp, ids, top = token_logprobs(lg[:1], [0], k=0)
    assert ids.shape == top.shape == (1, 0) and lp[0] == np.float32(1 - lse)
    # large logits: log_softmax in float64 stays finite and sums to 1
    big = np.array([[1000.0, 999.0, -1000.0]], np.float32)
    np.testing.assert_allclose(np.exp(log_softmax(big)).sum(), 1.0)


def test_top_k_ties_at_the_boundary():
    lg = np.zeros((1, 50), np.float32)
    lg[0, [7, 30, 31, 40]] = [5, 2, 2, 2]
    _, ids, _ = token_logprobs(lg, [7], k=3)
    assert ids.tolist() == [[7, 30, 31]]


# ---------------------------------------------------------------- NumPy backend against the model directly

def direct(params, prompt, tokens, k):
    """Each generated token's log-probability and top k, from the model's logits at that position (a fresh prefill
    of the prompt and the tokens before it)."""
    lps, ids, tops = [], [], []
    for s in range(len(tokens)):
        seq = np.concatenate([prompt, tokens[:s]]).astype(np.int32)
        _, _, logits = reference.prefill(params, [seq], len(seq))
        lp, i, t = token_logprobs(logits, [tokens[s]], k)
        lps.append(lp[0]), ids.append(i[0]), tops.append(t[0])
    return np.array(lps), np.array(ids).reshape(-1, k), np.array(tops).reshape(-1, k)


@pytest.fixture(scope="module")
def params():
    return load_params(MODEL)


def chunk_of(prompts, rows=None):
    offsets = np.zeros(len(prompts) + 1, np.int64)
    offsets[1:] = np.cumsum([len(p) for p in prompts])
    rows = np.arange(len(prompts)) if rows is None else rows
    return Chunk(0, np.asarray(rows, np.int64), offsets, np.concatenate(prompts).astype(np.int32))


@pytest.mark.parametrize("sampling", [SamplingSettings(), SamplingSettings(1.3, 20, 0.9, 5)])
def test_numpy_backend_matches_the_model(params, sampling):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 50257, rng.integers(1, 6)) for _ in range(5)]
    gs = GenerationSettings(max_new_tokens=4, ignore_eos=True, sampling=sampling, logprobs=True, top_logprobs=K,
                            repetition_penalty=1.3)
    be = NumpyBackend(params, gs, batch_size=2)
    comp = compute(be, chunk_of(prompts))
    assert comp.logprobs.shape == (comp.offsets[-1],) and comp.top_ids.shape == comp.top_logprobs.shape == (20, K)
    for b, p in enumerate(prompts):
        sl = slice(comp.offsets[b], comp.offsets[b + 1])
        lp, ids, top = direct(params, p, comp.row_tokens(b), K)
        np.testing.assert_allclose(comp.logprobs[sl], lp, atol=1e-5)
        assert comp.top_ids[sl].tolist() == ids.tolist()
        np.testing.assert_allclose(comp.top_logprobs[sl], top, atol=1e-5)
    assert (comp.top_logprobs[:, :-1] >= comp.top_logprobs[:, 1:]).all()
    assert (comp.logprobs <= comp.top_logprobs[:, 0] + 1e-6).all()
    # off: nothing stored, the same tokens
    off = compute(NumpyBackend(params, dataclasses.replace(gs, logprobs=False, top_logprobs=0)), chunk_of(prompts))
    assert off.logprobs is None and off.top_ids is None and off.tokens.tolist() == comp.tokens.tolist()


# ---------------------------------------------------------------- the seams

def sample_comp(k=K, copies=True):
    rng = np.random.default_rng(2)
    comp = Completions.from_lists(4, [7, 3, 9], [[1, 2, 3], [], [4, 5]], [0, 1, 0])
    comp.logprobs = -rng.random(5).astype(np.float32)
    if k:
        comp.top_ids = rng.integers(0, 100, (5, k)).astype(np.int32)
        comp.top_logprobs = -rng.random((5, k)).astype(np.float32)
    if copies:
        comp.copy_rows, comp.copy_src = np.array([11, 12], np.int64), np.array([2, 0], np.int64)
    return comp


def same(a, b, names=("rows", "offsets", "tokens", "finish", "logprobs", "top_ids", "top_logprobs")):
    for n in names:
        x, y = getattr(a, n), getattr(b, n)
        assert (x is None) == (y is None), n
        if x is not None:
            np.testing.assert_array_equal(x, y, err_msg=n)


@pytest.mark.parametrize("k", [0, 1, K])
def test_mpi_buffers_round_trip(k):
    comp = dataclasses.replace(sample_comp(k), copy_rows=np.zeros(0, np.int64), copy_src=np.zeros(0, np.int64))
    back, us = decode_completions(encode_completions(comp, 17))
    assert us == 17
    same(back, comp)
    plain = Completions.from_lists(4, [7, 3], [[1, 2, 3], [5]], [0, 1])
    buf = encode_completions(plain)     # off: the message of before (header, rows, offsets, finish, tokens)
    assert len(buf) == 4 + 2 + 3 + 2 + 2
    back, _ = decode_completions(buf)
    assert back.logprobs is None and back.top_ids is None
    with pytest.raises(ValueError):
        decode_completions(encode_completions(comp)[:-1])


@pytest.mark.parametrize("k", [0, K])
def test_journal_records_and_dedup_copies(k, tmp_path):
    comp = sample_comp(k)
    (back,) = records_of(Journal.encode([comp]))
    same(back, comp)
    np.testing.assert_array_equal(back.copy_rows, comp.copy_rows)
    full = back.expanded()              # copies as rows: their source's log-probabilities
    assert full.rows.tolist() == [7, 3, 9, 11, 12]
    np.testing.assert_array_equal(full.logprobs, np.concatenate([comp.logprobs, comp.logprobs[3:5],
                                                                 comp.logprobs[0:3]]))
    if k:
        np.testing.assert_array_equal(full.top_ids[5:7], comp.top_ids[3:5])
    # a plain record stays GJR2 (the bytes of before)
    plain = Completions.from_lists(1, [0], [[5, 6]], [0])
    assert Journal.encode([plain])[:4] == b"GJR2" and Journal.encode([comp])[:4] == b"GJR3"
    j = Journal(str(tmp_path / "j"), header={"a": 1})
    j.append_many([comp, plain])
    j.close()
    _, recs, _ = read_journal(str(tmp_path / "j"))
    same(recs[0], comp)
    assert recs[1].logprobs is None


def test_dedup_expand_keeps_logprobs():
    from gpt2job.files.dedup import Copies
    comp = sample_comp(K, copies=False)
    got = Copies(np.array([9], np.int64), np.array([0, 2], np.int64), np.array([20, 21], np.int64)).attach(comp)
    assert got.copy_rows.tolist() == [20, 21] and got.logprobs is comp.logprobs and got.top_ids is comp.top_ids


def test_join_completions_halves():
    from gpt2job.backends.cuda.plan import join_completions
    comp = sample_comp(K, copies=False)
    a, b = comp.take([0]), comp.take([1, 2])
    same(join_completions(chunk_of([[1], [2], [3]], comp.rows), [a, b]), comp)


# ---------------------------------------------------------------- jobs: output, resume, export

def job(inp, out, *extra):
    return ["run", inp, out, "--model", MODEL, "--backend", "numpy", "--max-new-tokens", 5, "--ignore-eos",
            "--logprobs", "--top-logprobs", K, *extra]


def read_lp(path):
    with h5py.File(path, "r") as f:
        assert f["top_logprobs"].attrs["top_logprobs_k"] == K == f["top_logprob_ids"].attrs["top_logprobs_k"]
        return ([np.asarray(x) for x in f["completion_tokens"][()]], [np.asarray(x) for x in
                f["completion_logprobs"][()]], [np.asarray(x).reshape(-1, K) for x in f["top_logprob_ids"][()]],
                [np.asarray(x).reshape(-1, K) for x in f["top_logprobs"][()]], json.loads(f.attrs["settings"]))


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    d = tmp_path_factory.mktemp("lp")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 50257, rng.integers(1, 6)) for _ in range(10)]
    prompts[7] = prompts[2]                             # a copy (greedy dedup)
    inp = d / "in.h5"
    write_token_input(inp, prompts)
    clean = d / "clean.h5"
    run_gpt2job(job(inp, clean, "--chunk-size", 3), check=0)
    return inp, prompts, clean


def test_job_output_matches_the_model(workload, params):
    inp, prompts, clean = workload
    toks, lps, ids, tops, settings = read_lp(clean)
    assert settings["logprobs"] is True and settings["top_logprobs"] == K
    for b, p in enumerate(prompts):
        lp, i, t = direct(params, p, toks[b], K)
        np.testing.assert_allclose(lps[b], lp, atol=1e-5)
        assert ids[b].tolist() == i.tolist() and ids[b][:, 0].tolist() == toks[b].tolist()   # greedy: top 1
        np.testing.assert_allclose(tops[b], t, atol=1e-5)
    assert lps[7].tolist() == lps[2].tolist() and ids[7].tolist() == ids[2].tolist()        # the copy


def test_output_without_logprobs_keeps_its_layout(workload, tmp_path):
    """Without --logprobs the file has the clean run's datasets less the three log-probability ones (whether text
    datasets are there depends on the tokenizer files this machine has, the same for both runs)."""
    inp, _, clean = workload
    out = tmp_path / "plain.h5"
    run_gpt2job(job(inp, out)[:-3], check=0)
    with h5py.File(clean, "r") as f:
        with_lp = set(f.keys())
    with h5py.File(out, "r") as f:
        assert {"completion_tokens", "done", "finish_reason", "prompt_length"} <= set(f.keys())
        assert set(f.keys()) == with_lp - {"completion_logprobs", "top_logprob_ids", "top_logprobs"}
        assert "logprobs" not in f.attrs["settings"]


@pytest.mark.parametrize("process", [False, True])
def test_resume_after_a_crash_gives_the_clean_file(workload, tmp_path, process):
    """The process is killed once a chunk is journaled; the journal's records carry the log-probabilities; the
    rerun's file is the clean run's (with the writer in a thread and in a process of its own)."""
    inp, _, clean = workload
    out = tmp_path / "out.h5"
    env = {"GPT2JOB_WRITER": "process"} if process else {}
    crash_after_a_kept_chunk(job(inp, out, "--chunk-size", 2), out, job_env(**env))
    _, recs, _ = read_journal(str(out) + ".journal")
    assert recs and all(r.logprobs is not None and r.top_ids.shape[1] == K for r in recs)
    run_gpt2job(job(inp, out, "--chunk-size", 2), env=job_env(**env), check=0)
    for a, b in zip(read_lp(out)[:4], read_lp(clean)[:4]):
        assert [x.tolist() for x in a] == [x.tolist() for x in b]


def test_resume_without_a_journal_reads_them_back(workload, tmp_path):
    """An unfinished output whose journal is gone: its rows (log-probabilities too) come back from the file."""
    import shutil
    inp, _, clean = workload
    out = tmp_path / "out.h5"
    shutil.copy(clean, out)
    with h5py.File(out, "r+") as f:          # as if the job had stopped after some rows
        f["done"][[1, 4, 8]] = 0
        f["completion_logprobs"][0] = np.zeros(5, np.float32)     # a kept row's values: they must come back as kept
        f.attrs["finished"] = 0
    p = run_gpt2job(job(inp, out, "--chunk-size", 2), check=0)
    assert json.loads(h5py.File(out, "r").attrs["summary"])["rows_resumed"] == 7, p.stderr
    got, want = read_lp(out), read_lp(clean)
    assert got[1][0].tolist() == [0.0] * 5
    for a, b in zip(got[:4], want[:4]):      # rows 1, 4, 8 ran in other batches: equal up to rounding
        for x, y in zip(a[1:], b[1:]):
            np.testing.assert_allclose(x, y, atol=1e-5)


def test_export_and_show(workload, tmp_path):
    _, _, clean = workload
    js = tmp_path / "o.jsonl"
    run_gpt2job(["export", clean, js], check=0)
    rows = [json.loads(line) for line in js.read_text().splitlines()]
    toks, lps, ids, tops, _ = read_lp(clean)
    for r in rows:
        b = r["row"]
        assert r["logprobs"] == [float(x) for x in lps[b].astype(str)]
        assert [[d["id"] for d in step] for step in r["top_logprobs"]] == ids[b].tolist()
        np.testing.assert_allclose([[d["logprob"] for d in step] for step in r["top_logprobs"]], tops[b], rtol=1e-6)
        assert not {"completion_logprobs", "top_logprob_ids"} & set(r)
    p = run_gpt2job(["show", clean, "--limit", 2], check=0)
    assert "logprobs -" in p.stdout and "top at token 0:" in p.stdout


def test_cuda_step_logprobs_layout():
    """backends/cuda/logprobs.py without a GPU: what a selection writes where LogprobOut points (head groups of 2
    rows), downloaded by slot, lands at its rows and steps; attach() flattens them in the chunk's order."""
    from gpt2job.backends.cuda.logprobs import StepLogprobs
    mem = np.zeros(1 << 12, np.uint8)                  # the "device": addresses are offsets into mem

    class Drv:
        pagelocked_empty = staticmethod(np.empty)

        @staticmethod
        def memcpy_dtoh_async(host, src, stream):
            host[:] = mem[src:src + host.nbytes].view(host.dtype)

    class Dev:
        drv, compute, lp_host = Drv, None, None

        @staticmethod
        def buf(name, nbytes):
            return 64

        @classmethod
        def step_buffers(cls, n, lp_words):           # the runner's call before a group's (Device.step_buffers)
            cls.lp_host = np.empty(2 * lp_words, np.float32)

    def write(o, rows, vals):                          # a head group's kernel: rows of o.at(0)
        for g in range(0, len(rows), 2):
            lp, ids, top = o.at(g)
            for j, r in enumerate(rows[g:g + 2]):
                mem[lp + 4 * j:lp + 4 * j + 4] = np.float32([vals[r]]).view(np.uint8)
                mem[ids + 4 * o.k * j:ids + 4 * o.k * (j + 1)] = np.int32([r, r + 100]).view(np.uint8)
                mem[top + 4 * o.k * j:top + 4 * o.k * (j + 1)] = np.float32([vals[r], -9]).view(np.uint8)

    s = StepLogprobs(Dev, 4, 3, 2)
    Dev.step_buffers(4, s.words(4))
    s.group(4)
    write(s.out(4), [0, 1, 2, 3], {0: -1.0, 1: -2.0, 2: -3.0, 3: -4.0})      # step 0 of rows 0..3
    s.download(4, 0)
    s.take(0, 4, np.ones(4, bool), np.arange(4), 0)
    write(s.out(3), [0, 1, 2], {0: -5.0, 1: -6.0, 2: -7.0})                   # step 1: rows 0, 2, 3 (1 stopped)
    s.download(3, 1)
    s.take(1, 3, np.array([True, False, True]), np.array([0, 3]), 1)
    comp = s.attach(Completions.from_lists(0, [5, 6, 7, 8], [[1, 2], [3], [4], [5, 6]], [0] * 4),
                    np.array([2, 1, 1, 2]))
    assert comp.logprobs.tolist() == [-1, -5, -2, -3, -4, -7]
    assert comp.top_ids[:, 0].tolist() == [0, 0, 1, 2, 3, 2] and comp.top_logprobs[:, 1].tolist() == [-9] * 6
    back = StepLogprobs.of(None, GenerationSettings(), 4, 3).attach(comp, None)   # off: nothing changes
    assert back is comp
