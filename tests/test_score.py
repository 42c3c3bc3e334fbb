"""`python -m gpt2job score IN OUT`: per-token log-likelihoods against log_softmax computed directly from the
reference model (a small random model and the tiny HF checkpoint), context + continuation, --prepend-eos, sums and
counts, validation, mpirun, a resume after a crash, export, and the CUDA path's host-side parts. CPU only, fast."""
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from conftest import crash_after_a_kept_chunk, job_env, run_gpt2job, write_token_input
from gpt2job.backends.cuda.score import completions, score_rows
from gpt2job.backends.base import compute
from gpt2job.backends.numpy_backend import NumpyBackend
from gpt2job.chunks import Chunk
from gpt2job.model import reference
from gpt2job.model.logprobs import log_softmax
from gpt2job.model.weights import load_params
from gpt2job.settings import GenerationSettings

MODEL = "random:n_layer=2,n_head=2,n_embd=32,vocab_size=50257"
TINY_HF = Path(__file__).parent / "fixtures" / "tiny-hf"


def direct(params, row):
    """log P(row[t] | row[:t]) for t = 1..L-1, from the reference's full logits (float64 log_softmax)."""
    row = np.asarray(row, np.int64)
    logits = reference.full_logits(params, row[None])[0]                      # [L, V]
    lp = log_softmax(logits[:-1])                                             # [L-1, V]
    return lp[np.arange(len(row) - 1), row[1:]].astype(np.float32)


def chunk_of(rows):
    offsets = np.zeros(len(rows) + 1, np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    return Chunk(5, np.arange(len(rows), dtype=np.int64) + 10, offsets,
                 np.concatenate([np.asarray(r, np.int32) for r in rows]))


def rows_of(seed, n, lo=2, hi=12, vocab=50257):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(lo, hi)).astype(np.int32) for _ in range(n)]


@pytest.fixture(scope="module")
def params():
    return load_params(MODEL)


def test_numpy_backend_scores_match_direct(params):
    rows = rows_of(0, 7)
    rows[3] = rows[1][:len(rows[1])]                     # equal lengths share a forward pass
    be = NumpyBackend(params, GenerationSettings(max_new_tokens=1, logprobs=True, score=True), batch_size=3)
    comp = compute(be, chunk_of(rows))
    assert comp.rows.tolist() == list(range(10, 17)) and comp.finish.tolist() == [0] * 7
    for b, r in enumerate(rows):
        a, z = comp.offsets[b], comp.offsets[b + 1]
        assert comp.tokens[a:z].tolist() == r[1:].tolist()
        np.testing.assert_allclose(comp.logprobs[a:z], direct(params, r), rtol=0, atol=1e-5)


def score_job(inp, out, *extra, model=MODEL):
    return ["score", inp, out, "--model", model, "--backend", "numpy", *extra]


def read_score(path):
    with h5py.File(path, "r") as f:
        assert f.attrs["finished"] == 1 and "completion_tokens" not in f
        return {"tokens": [np.asarray(x) for x in f["scored_tokens"][()]],
                "lp": [np.asarray(x) for x in f["token_logprobs"][()]], "sum": f["sum_logprob"][()],
                "n": f["n_tokens"][()], "finish": [x.decode() for x in f["finish_reason"][()]],
                "settings": json.loads(f.attrs["settings"])}


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    d = tmp_path_factory.mktemp("score")
    rows = rows_of(1, 9)
    inp = d / "in.h5"
    write_token_input(inp, rows)
    clean = d / "clean.h5"
    p = run_gpt2job(score_job(inp, clean, "--chunk-size", 2), check=0)
    return inp, rows, clean, p


def test_job_output_sums_and_counts(workload, params):
    inp, rows, clean, p = workload
    got = read_score(clean)
    n = sum(len(r) - 1 for r in rows)   # the progress and summary lines say scored, not generated
    assert f"{n} tokens scored" in p.stderr and f"{n} tokens scored" in p.stdout and "scored tokens/s" in p.stdout
    assert "generated" not in p.stdout + p.stderr
    assert got["settings"]["score"] is True and got["settings"]["prepend_eos"] is False
    for b, r in enumerate(rows):
        assert got["tokens"][b].tolist() == r[1:].tolist()
        np.testing.assert_allclose(got["lp"][b], direct(params, r), atol=1e-5)
        assert got["n"][b] == len(r) - 1
        assert got["sum"][b] == pytest.approx(float(got["lp"][b].astype(np.float64).sum()), abs=1e-9)
    assert set(got["finish"]) == {"length"}


def test_tiny_hf_checkpoint(tmp_path):
    p = load_params(str(TINY_HF))
    rows = rows_of(2, 4, vocab=p.config.vocab_size, hi=min(12, p.config.n_positions))
    write_token_input(tmp_path / "in.h5", rows)
    run_gpt2job(score_job(tmp_path / "in.h5", tmp_path / "out.h5", model=str(TINY_HF)), check=0)
    got = read_score(tmp_path / "out.h5")
    for b, r in enumerate(rows):
        np.testing.assert_allclose(got["lp"][b], direct(p, r), atol=1e-5)


def write_pairs(path, ctx, cont):
    with h5py.File(path, "w") as f:
        for name, rs in (("context_tokens", ctx), ("continuation_tokens", cont)):
            d = f.create_dataset(name, (len(rs),), dtype=h5py.vlen_dtype(np.int32))
            for i, r in enumerate(rs):
                d[i] = np.asarray(r, np.int32)


def test_context_continuation_scores_only_the_continuation(tmp_path, params):
    rows = rows_of(3, 5, lo=4)
    ctx, cont = [r[:3] for r in rows], [r[3:] for r in rows]
    ctx[2], cont[2] = rows[2][:0], rows[2]               # no context: the continuation from its second token
    write_pairs(tmp_path / "in.h5", ctx, cont)
    run_gpt2job(score_job(tmp_path / "in.h5", tmp_path / "out.h5", "--chunk-size", 2), check=0)
    got = read_score(tmp_path / "out.h5")
    for b in range(5):
        full = np.concatenate([ctx[b], cont[b]])
        want = direct(params, full)[max(len(ctx[b]), 1) - 1:]
        assert got["tokens"][b].tolist() == full[max(len(ctx[b]), 1):].tolist()
        np.testing.assert_allclose(got["lp"][b], want, atol=1e-5)
        assert got["n"][b] == len(want)
    # --prepend-eos: <|endoftext|> first, so every continuation token is scored (given the context)
    run_gpt2job(score_job(tmp_path / "in.h5", tmp_path / "eos.h5", "--prepend-eos"), check=0)
    got = read_score(tmp_path / "eos.h5")
    assert got["settings"]["prepend_eos"] is True
    for b in range(5):
        full = np.concatenate([[50256], ctx[b], cont[b]])
        assert got["tokens"][b].tolist() == cont[b].tolist()
        np.testing.assert_allclose(got["lp"][b], direct(params, full)[len(ctx[b]):], atol=1e-5)


def test_too_short_rows_are_refused_or_skipped(tmp_path):
    rows = rows_of(4, 3)
    rows[1] = rows[1][:1]
    write_token_input(tmp_path / "in.h5", rows)
    p = run_gpt2job(score_job(tmp_path / "in.h5", tmp_path / "out.h5"), check=2)
    assert "nothing to score" in p.stderr and "row 1" in p.stderr and not (tmp_path / "out.h5").exists()
    run_gpt2job(score_job(tmp_path / "in.h5", tmp_path / "out.h5", "--skip-invalid"), check=0)
    got = read_score(tmp_path / "out.h5")
    assert got["finish"] == ["length", "invalid", "length"] and got["n"][1] == 0 and np.isnan(got["sum"][1])
    long = [np.zeros(1025, np.int32)]                   # GPT-2 shapes: n_positions 1024
    write_token_input(tmp_path / "long.h5", long)
    p = run_gpt2job(score_job(tmp_path / "long.h5", tmp_path / "l.h5"), check=2)
    assert "longer than 1024" in p.stderr


def test_per_row_generation_settings_are_said_to_be_ignored(tmp_path):
    """`run` says what of an input it does not use; `score` said nothing of the per-row settings it ignores."""
    write_token_input(tmp_path / "in.h5", rows_of(2, 3))
    with h5py.File(tmp_path / "in.h5", "a") as f:
        f["max_new_tokens"] = np.array([3, 4, 5], np.int32)
    p = run_gpt2job(score_job(tmp_path / "in.h5", tmp_path / "out.h5"), check=0)
    assert f"gpt2job: warning: {tmp_path / 'in.h5'}: max_new_tokens: per-row generation settings, which `score` " \
        "ignores" in p.stderr, p.stderr


def test_mpirun_equals_one_process(workload, tmp_path):
    inp, _, clean, _ = workload
    p = run_gpt2job(score_job(inp, tmp_path / "mpi.h5", "--chunk-size", 2), np_=3, check=0)
    assert " to score (" in p.stderr and "new each" not in p.stderr, p.stderr   # ('up to 1 new each' before)
    a, b = read_score(clean), read_score(tmp_path / "mpi.h5")
    # the same rows; values to float32 rounding (BLAS under mpirun may split a product over other threads)
    assert [x.tolist() for x in a["tokens"]] == [x.tolist() for x in b["tokens"]] and a["n"].tolist() == b["n"].tolist()
    for x, y in zip(a["lp"], b["lp"]):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-5)
    np.testing.assert_allclose(a["sum"], b["sum"], rtol=0, atol=1e-4)


def test_resume_after_a_crash(workload, tmp_path):
    inp, _, clean, _ = workload
    out = tmp_path / "out.h5"
    crash_after_a_kept_chunk(score_job(inp, out, "--chunk-size", 2), out, job_env())
    p = run_gpt2job(score_job(inp, out, "--chunk-size", 2), check=0)
    assert "resuming" in p.stderr
    a, b = read_score(clean), read_score(out)
    assert [x.tolist() for x in a["lp"]] == [x.tolist() for x in b["lp"]] and a["n"].tolist() == b["n"].tolist()
    # a run (not a score) into the finished score output is another job
    p = run_gpt2job(["run", inp, out, "--model", MODEL, "--backend", "numpy"], check=2)


def test_export(workload, tmp_path):
    _, rows, clean, _ = workload
    run_gpt2job(["export", clean, tmp_path / "o.jsonl"], check=0)
    recs = [json.loads(x) for x in open(tmp_path / "o.jsonl")]
    got = read_score(clean)
    assert [r["row"] for r in recs] == list(range(len(rows)))
    for r in recs:
        assert r["n_tokens"] == len(r["logprobs"]) == len(rows[r["row"]]) - 1
        assert r["logprobs"] == [float(x) for x in got["lp"][r["row"]].astype(str)]
        assert r["sum_logprob"] == pytest.approx(got["sum"][r["row"]])
    p = run_gpt2job(["show", clean, "--limit", 2], check=0)
    assert "score output" in p.stdout and "n_tokens" in p.stdout and "[1]" in p.stdout
    # an unfinished one (a job killed, to be resumed: the run's names, no sums yet) exports the same records
    part = tmp_path / "part.h5"
    run_gpt2job(score_job(workload[0], part, "--chunk-size", 2), env=job_env(GPT2JOB_FAULT="0:3:raise"), check=3)
    run_gpt2job(["export", part, tmp_path / "p.jsonl"], check=0)
    some = [json.loads(x) for x in open(tmp_path / "p.jsonl")]
    assert some and all(r == recs[r["row"]] for r in some), (some[:1], recs[:1])
    run_gpt2job(score_job(workload[0], tmp_path / "eos.h5", "--prepend-eos"), check=0)   # its key: rows with EOS
    p = run_gpt2job(["export", tmp_path / "eos.h5", tmp_path / "eos.jsonl"], check=0)
    assert "other prompts" not in p.stderr, p.stderr
    p = run_gpt2job(["show", part, "--limit", 40], check=0)
    assert "score output" in p.stdout and "unfinished" in p.stdout and "(not done)" in p.stdout, p.stdout


def test_text_input(tmp_path, vocab_dir, params):
    (tmp_path / "in.txt").write_text("Hello world, how are you?\nA second line\n")
    run_gpt2job(score_job(tmp_path / "in.txt", tmp_path / "out.h5", "--vocab-dir", vocab_dir), check=0)
    got = read_score(tmp_path / "out.h5")
    from gpt2job.model.tokenizer import load_tokenizer
    enc = load_tokenizer(vocab_dir)
    for b, text in enumerate(["Hello world, how are you?", "A second line"]):
        ids = enc.encode(text)
        np.testing.assert_allclose(got["lp"][b], direct(params, ids), atol=1e-5)


def test_cuda_host_side_rows_and_completions():
    rows = [np.array([5, 6, 7]), np.array([8, 9]), np.array([1, 2, 3, 4])]
    ch = chunk_of(rows)
    ridx, tgt = score_rows(ch.offsets, ch.tokens, 0, 3)
    assert ridx.tolist() == [0, 1, 3, 5, 6, 7] and tgt.tolist() == [6, 7, 9, 2, 3, 4]
    ridx, tgt = score_rows(ch.offsets, ch.tokens, 1, 3)          # a pass of prompts 1, 2 (rows 3..8)
    assert ridx.tolist() == [3, 5, 6, 7] and tgt.tolist() == [9, 2, 3, 4]
    lp_at = np.arange(9, dtype=np.float32)                       # the value predicting flat token t is t
    comp = completions(ch, ch.offsets, ch.tokens, lp_at)
    assert comp.offsets.tolist() == [0, 2, 3, 6] and comp.tokens.tolist() == [6, 7, 9, 2, 3, 4]
    assert comp.logprobs.tolist() == [1, 2, 4, 6, 7, 8] and comp.rows.tolist() == [10, 11, 12]


def test_jsonl_context_continuation(tmp_path, params):
    lines = [{"context": [1, 2, 3], "continuation": [4, 5]}, {"context": [], "continuation": [7, 8, 9]}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    run_gpt2job(score_job(tmp_path / "in.jsonl", tmp_path / "out.h5"), check=0)
    got = read_score(tmp_path / "out.h5")
    assert [t.tolist() for t in got["tokens"]] == [[4, 5], [8, 9]]
    np.testing.assert_allclose(got["lp"][0], direct(params, [1, 2, 3, 4, 5])[2:], atol=1e-5)
    np.testing.assert_allclose(got["lp"][1], direct(params, [7, 8, 9]), atol=1e-5)
    (tmp_path / "bad.jsonl").write_text('{"context": "a", "continuation": [1]}\n')
    p = run_gpt2job(score_job(tmp_path / "bad.jsonl", tmp_path / "bad.h5"), check=2)
    assert "both be texts or both token id lists" in p.stderr
    (tmp_path / "bad.jsonl").write_text('{"context": "a", "continuation": "b"}\n{bad\n')   # read a line at a time
    p = run_gpt2job(score_job(tmp_path / "bad.jsonl", tmp_path / "bad.h5"), check=2)
    assert f"{tmp_path / 'bad.jsonl'}: line 2: not JSON (" in p.stderr, p.stderr


def test_refused_starts_are_one_line(tmp_path):
    """The synthetic backend has no model to score with; a JSONL of pairs for an output in a missing folder: one
    line each, exit 2, nothing written."""
    write_token_input(tmp_path / "in.h5", rows_of(5, 2))
    p = run_gpt2job(["score", tmp_path / "in.h5", tmp_path / "o.h5", "--model", MODEL, "--backend", "synthetic"],
                    check=2)
    assert "--backend" in p.stderr and "Traceback" not in p.stderr and not (tmp_path / "o.h5").exists()
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"context": "The cat", "continuation": " sat"}\n')
    p = run_gpt2job(score_job(pairs, tmp_path / "missing" / "o.h5"), check=2)
    assert "folder does not exist" in p.stderr and "Traceback" not in p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["in.h5", "pairs.jsonl"]


def test_pair_readers_fixes_name_the_pairs_datasets(tmp_path):
    """A reader's fix quotes the prompts' two datasets; for a pair it names that pair's: 'context' and
    'context_tokens', never 'context' twice or a prompts name."""
    from gpt2job.errors import UserError
    from gpt2job.files.score_input import read_score_input
    path = tmp_path / "pairs.h5"
    with h5py.File(path, "w") as f:
        f.create_group("context")
        f.create_dataset("continuation", data=np.array([b" sat"], dtype=object), dtype=h5py.string_dtype())
    with pytest.raises(UserError) as e:
        read_score_input(path, lambda: None)
    assert e.value.field == "context" and "is a group" in e.value.message
    assert "'context' (UTF-8 strings) or 'context_tokens' (int token rows)" in e.value.fix
    with h5py.File(path, "w") as f:
        f.create_dataset("context_tokens", data=np.ones((1, 3), np.int32))
        f.create_group("continuation_tokens")
    with pytest.raises(UserError) as e:
        read_score_input(path, lambda: None)
    assert e.value.field == "continuation_tokens"
    assert "'continuation' (UTF-8 strings) or 'continuation_tokens' (int token rows)" in e.value.fix


def test_a_token_pair_is_handed_back_by_the_read_ahead_child(tmp_path, monkeypatch):
    """The child read a token pair, then the master read it again: it now hands both datasets' arrays back (a grid
    and ragged rows here), and the master reads them itself only where the child gave nothing."""
    from gpt2job.files import read_ahead, score_input
    path = tmp_path / "pairs.h5"
    ctx = [np.arange(1 + i % 3, dtype=np.int32) + 7 for i in range(5)]
    with h5py.File(path, "w") as f:
        d = f.create_dataset("context_tokens", (5,), dtype=h5py.vlen_dtype(np.int32))
        for i, r in enumerate(ctx):
            d[i] = r
        f.create_dataset("continuation_tokens", data=np.arange(10, dtype=np.int32).reshape(5, 2))
    own = score_input.read_token_dataset
    reads = []
    monkeypatch.setattr(score_input, "read_token_dataset", lambda *a: reads.append(a) or own(*a))
    ps, starts = score_input.read_score_input(path, lambda: None)
    assert reads == []   # the child's arrays, not a second read
    want = [np.concatenate([c, [2 * i, 2 * i + 1]]).tolist() for i, c in enumerate(ctx)]
    assert [ps.prompt(i).tolist() for i in range(5)] == want and starts.tolist() == [1, 2, 3, 1, 2]
    monkeypatch.setattr(read_ahead, "CHILD", "import sys; sys.exit(1)")   # a child that gives nothing
    again, _ = score_input.read_score_input(path, lambda: None)
    assert len(reads) == 2 and again.fingerprint() == ps.fingerprint()


def test_a_pair_dataset_that_cannot_be_read_is_one_line(tmp_path):
    """A dangling link (or other damage) in place of a pair's dataset was a KeyError's traceback; now one line naming
    the dataset."""
    from gpt2job.errors import UserError
    from gpt2job.files.score_input import read_score_input
    path = tmp_path / "pairs.h5"
    with h5py.File(path, "w") as f:
        f["context_tokens"] = h5py.SoftLink("/nowhere")
        f.create_dataset("continuation_tokens", data=np.full((2, 2), 5, np.int32))
    with pytest.raises(UserError) as e:
        read_score_input(path, lambda: None)
    assert e.value.field == "context_tokens" and "cannot be read" in e.value.message


def test_a_pair_input_is_read_ahead_with_a_deadline(tmp_path, monkeypatch):
    """`score`'s context + continuation were read by the master alone: a file on which HDF5 loops would have hung
    it. The read-ahead child (files/read_ahead.py, with its deadline) reads the pair's datasets first."""
    from gpt2job.errors import UserError
    from gpt2job.files import read_ahead
    from gpt2job.files.score_input import read_score_input
    path = tmp_path / "pairs.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("context_tokens", data=np.ones((2, 3), np.int32))
        f.create_dataset("continuation_tokens", data=np.full((2, 2), 5, np.int32))
    seen = tmp_path / "argv"
    monkeypatch.setattr(read_ahead, "CHILD", f"import sys; open({str(seen)!r}, 'w').write(' '.join(sys.argv[6:]))")
    ps, starts = read_score_input(path, lambda: None)
    assert seen.read_text() == "context_tokens continuation_tokens" and ps.prompt(0).tolist() == [1, 1, 1, 5, 5]
    monkeypatch.setattr(read_ahead, "DEADLINE_S", 1)
    monkeypatch.setattr(read_ahead, "DEADLINE_S_PER_GB", 0)
    monkeypatch.setattr(read_ahead, "CHILD", "import time; time.sleep(60)")
    with pytest.raises(UserError, match="did not finish within 1 s"):
        read_score_input(path, lambda: None)
