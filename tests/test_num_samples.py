"""--num-samples N: output rows [prompts * N] (row r: sample r % N of prompt r // N, datasets prompt_index and
sample_index), sampling by output row (reproducible for any chunking and rank count), a prompt's samples in one
chunk, resume, show/export, and the CUDA prefix-share plan computing a repeated prompt once."""
import json

import h5py
import numpy as np
import pytest

from conftest import TINY_HF, job_env, read_output, run_gpt2job, write_token_input
from gpt2job.backends.cuda import prefix_share
from gpt2job.backends.cuda.plan import kv_groups
from gpt2job.cluster.scheduler import Scheduler, WorkerState
from gpt2job.files.prompts import PromptSet

N = 3
SAMPLED = ["--temperature", 1.2, "--top-k", 40, "--seed", 11]


def prompts(n=7, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 1000, rng.integers(2, 9)).astype(np.int32) for _ in range(n)]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A sampled N = 3 job of 7 prompts (one process, default chunks): (input, its prompts, the output)."""
    d = tmp_path_factory.mktemp("samples")
    inp, out = d / "in.h5", d / "out.h5"
    ps = prompts()
    write_token_input(inp, ps)
    run_gpt2job(args(inp, out), check=0)
    return inp, ps, out


def args(inp, out, *more):
    return ["run", inp, out, "--model", TINY_HF, "--backend", "numpy", "--max-new-tokens", 6, "--num-samples", N,
            *SAMPLED, *more]


def tokens(path):
    return [t.tolist() for t in read_output(path)["tokens"]]


def test_layout_and_indices(job, tmp_path):
    inp, ps, out = job
    with h5py.File(out) as f:
        n = len(ps) * N
        assert f["done"].shape == (n,) and f["done"][()].all() and f.attrs["num_samples"] == N
        assert f.attrs["n_rows"] == n
        assert f["prompt_index"].dtype == np.int64 and f["sample_index"].dtype == np.int32
        np.testing.assert_array_equal(f["prompt_index"][()], np.arange(n) // N)
        np.testing.assert_array_equal(f["sample_index"][()], np.arange(n) % N)
        np.testing.assert_array_equal(f["prompt_length"][()], np.repeat([len(p) for p in ps], N))
        assert json.loads(f.attrs["settings"])["num_samples"] == N
    toks = tokens(out)
    for p in range(len(ps)):      # sampling: the samples of a prompt differ
        assert len({tuple(t) for t in toks[p * N:(p + 1) * N]}) > 1
    plain = tmp_path / "plain.h5"  # without the flag: today's layout, no new datasets or attributes
    run_gpt2job(["run", inp, plain, "--model", TINY_HF, "--backend", "numpy", "--max-new-tokens", 6, *SAMPLED],
                check=0)
    with h5py.File(plain) as f:
        assert "prompt_index" not in f and "sample_index" not in f and "num_samples" not in f.attrs
        assert "num_samples" not in json.loads(f.attrs["settings"]) and len(f["done"]) == len(ps)


def test_same_samples_for_any_chunk_size_and_rank_count(job, tmp_path):
    inp, _, out = job
    want = tokens(out)
    for np_, chunk in ((None, 1), (None, 5), (3, 2), (3, 4)):
        other = tmp_path / f"o-{np_}-{chunk}.h5"
        run_gpt2job(args(inp, other, "--chunk-size", chunk), np_=np_, check=0)
        assert tokens(other) == want, (np_, chunk)


def test_each_row_draws_with_its_output_row():
    """The rule both backends follow (uniform(seed, row, step), CUDA's sampling.cu the same hash): a chunk's rows are
    output rows, so row r of N samples draws what a lone prompt at row r would: the NumPy backend on a chunk
    the scheduler made equals generating each row by itself with its output row index."""
    from gpt2job.backends.base import compute
    from gpt2job.backends.numpy_backend import NumpyBackend, generate_batch
    from gpt2job.model.weights import load_config, load_params
    from gpt2job.settings import JobSettings
    ps = prompts(4, seed=1)
    s = JobSettings(input="", output="", model=str(TINY_HF), max_new_tokens=5, temperature=1.2, top_k=40, seed=11,
                    num_samples=N)
    cfg = load_config(s.model)
    gs = s.generation(cfg.eos_token_id)
    params = load_params(s.model)
    sched = Scheduler(PromptSet.from_lists(ps, "t"), np.arange(len(ps) * N), chunk_size=7, num_samples=N)
    chunk = sched.next_chunk(WorkerState(rank=1), 1)
    assert len(chunk.rows) == 6 and (np.bincount(chunk.rows // N) % N == 0).all()   # 7 would split a prompt's samples
    for i, r in enumerate(chunk.rows):
        np.testing.assert_array_equal(chunk.prompts()[i], ps[r // N])
    comp = compute(NumpyBackend(params, gs), chunk)
    for i, r in enumerate(chunk.rows):
        alone, _ = generate_batch(params, [ps[r // N]], [int(r)], gs)
        assert comp.row_tokens(i).tolist() == list(alone[0]), r


def test_scheduler_keeps_a_prompts_samples_in_one_chunk():
    rng = np.random.default_rng(2)
    ps = PromptSet.from_lists([rng.integers(0, 50, rng.integers(1, 20)) for _ in range(50)], "t")
    for n, chunk_size, done in ((4, 0, ()), (4, 10, ()), (5, 3, ()), (4, 9, (1, 2, 9, 17, 18, 19))):
        rows = np.setdiff1d(np.arange(50 * n), done)     # a resumed job: some samples done already
        sched = Scheduler(ps, rows, chunk_size, num_samples=n)
        seen = []
        while (c := sched.next_chunk(WorkerState(rank=1, preferred_chunk=16), 3)) is not None:
            seen += c.rows.tolist()
            for i, r in enumerate(c.rows):
                np.testing.assert_array_equal(c.prompts()[i], ps.prompt(r // n))
            if len(c.rows) >= n:      # never a prompt's samples in two chunks, unless a chunk holds fewer than n
                pr = c.rows // n
                assert not np.isin(pr, np.asarray(seen[:-len(c.rows)], np.int64) // n).any()
        assert sorted(seen) == rows.tolist()
        lens = ps.lengths[np.asarray(seen) // n]
        assert (np.diff(lens) <= 0).all()                    # still the longest prompts first


def test_chunks_of_equal_work_keep_a_long_prompt_s_samples_together():
    """Chunks cut by estimated work (ragged prompts, the default chunk size): one long prompt's 4 samples outweigh a
    chunk's share of the work, and the chunk holds all 4 (it held 3, and the long prefill was computed twice)."""
    from gpt2job.cluster.scheduler import position_cost
    ps = PromptSet.from_lists([np.arange(900) % 50] + [np.arange(5)] * 7, "t")
    sched = Scheduler(ps, np.arange(8 * 4), 0, num_samples=4, max_new_tokens=16,
                      position_cost=position_cost("float16", 768))
    assert sched.by_cost
    chunks = []
    while (c := sched.next_chunk(WorkerState(rank=1, preferred_chunk=64), 2)) is not None:
        chunks.append(c.rows // 4)
    assert all(not np.isin(a, b).any() for i, a in enumerate(chunks) for b in chunks[i + 1:])
    assert chunks[0].tolist() == [0, 0, 0, 0] and sorted(np.concatenate(chunks).tolist()) == sorted(list(range(8)) * 4)


def test_greedy_samples_are_identical_and_computed_once(tmp_path):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    ps = prompts(5, seed=3)
    write_token_input(inp, ps + [ps[0]])                     # and a repeated prompt: dedup keeps the layout
    p = run_gpt2job(["run", inp, out, "--model", TINY_HF, "--backend", "numpy", "--max-new-tokens", 5,
                     "--num-samples", 4], check=0)
    assert "identical samples" in p.stderr
    assert "19 rows of identical greedy samples or repeated prompts: each distinct prompt is computed once" in p.stderr
    assert "repeat an earlier prompt" not in p.stderr   # (said of samples, it read as a user's repeated prompts)
    assert "starting: 5 rows to compute" in p.stderr and " of 24 in " in p.stderr   # rows, not prompts
    assert "19 rows copied from an identical prompt's" in p.stdout   # (it said "duplicate prompts")
    res = read_output(out)
    toks = [t.tolist() for t in res["tokens"]]
    assert len(toks) == 24 and all(toks[4 * (r // 4)] == t for r, t in enumerate(toks))
    assert toks[20:24] == toks[0:4]
    sm = json.loads(res["attrs"]["summary"])
    assert sm["duplicate_prompts"] == 24 - 5 and sum(w["rows"] for w in sm["workers"]) == 24
    ref = tmp_path / "ref.h5"
    run_gpt2job(["run", inp, ref, "--model", TINY_HF, "--backend", "numpy", "--max-new-tokens", 5], check=0)
    assert [t.tolist() for t in read_output(ref)["tokens"]] == toks[::4]


def test_per_row_settings_hold_for_every_sample(tmp_path):
    inp, out = tmp_path / "in.h5", tmp_path / "out.h5"
    ps = prompts(4, seed=4)
    write_token_input(inp, ps)
    with h5py.File(inp, "a") as f:
        f["max_new_tokens"] = np.array([2, -1, 5, 1], np.int32)
        f["temperature"] = np.array([0, np.nan, 1.0, 0.7], np.float32)
    run_gpt2job(["run", inp, out, "--model", TINY_HF, "--backend", "numpy", "--max-new-tokens", 3, "--ignore-eos",
                 "--temperature", 0.9, "--seed", 5, "--num-samples", 3, "--chunk-size", 4], check=0)
    toks = tokens(out)
    assert [len(t) for t in toks] == [2] * 3 + [3] * 3 + [5] * 3 + [1] * 3
    assert toks[0] == toks[1] == toks[2]                     # row 0 is greedy: its samples agree
    assert len({tuple(t) for t in toks[6:9]}) > 1


def test_resume_gives_the_clean_output(job, tmp_path):
    inp, _, clean = job
    out = tmp_path / "out.h5"
    p = run_gpt2job(args(inp, out, "--chunk-size", N), env=job_env(GPT2JOB_FAULT="0:4:raise"))
    assert p.returncode == 3, p.stderr
    with h5py.File(out) as f:
        kept = int(f["done"][()].sum())
    assert 0 < kept < 21 and kept % N == 0
    run_gpt2job(args(inp, out, "--chunk-size", N), check=0)
    assert tokens(out) == tokens(clean)
    with h5py.File(out) as f, h5py.File(clean) as g:
        for k in ("prompt_index", "sample_index", "prompt_length", "finish_reason"):
            np.testing.assert_array_equal(f[k][()], g[k][()])
        assert json.loads(f.attrs["summary"])["rows_resumed"] == kept
    p = run_gpt2job(["run", inp, out, "--model", TINY_HF, "--backend", "numpy", "--max-new-tokens", 6,
                     "--num-samples", 2, *SAMPLED])
    assert p.returncode == 2 and "--num-samples: was 3, now 2" in p.stderr, p.stderr   # another N: another job


def test_show_and_export_name_prompt_and_sample(job, tmp_path):
    inp, ps, out = job
    shown = run_gpt2job(["show", out, "--start", 3, "--limit", 2], check=0).stdout
    assert "[3] prompt 1 sample 0 " in shown and "[4] prompt 1 sample 1 " in shown
    jl = tmp_path / "o.jsonl"
    run_gpt2job(["export", out, jl], check=0)
    recs = [json.loads(x) for x in jl.read_text().splitlines()]
    assert len(recs) == len(ps) * N
    for r in recs:
        assert list(r)[:3] == ["row", "prompt_index", "sample_index"]
        assert (r["prompt_index"], r["sample_index"]) == divmod(r["row"], N)
        assert r["prompt_tokens"] == ps[r["row"] // N].tolist()


def test_cli_range():
    for bad in (0, 1001):
        p = run_gpt2job(["run", "in.h5", "out.h5", "--num-samples", bad])
        assert p.returncode == 2 and "--num-samples" in p.stderr


# ---------------------------------------------------------------- the CUDA backend's plan (CPU: pure NumPy)

def flat(rows):
    offsets = np.zeros(len(rows) + 1, np.int64)
    offsets[1:] = np.cumsum([len(r) for r in rows])
    return offsets, np.concatenate(rows).astype(np.int32)


def chunk_rows(ps, n):
    """The chunk the scheduler makes of every sample: its prompts, longest first, samples adjacent."""
    sched = Scheduler(PromptSet.from_lists(ps, "t"), np.arange(len(ps) * n), chunk_size=len(ps) * n, num_samples=n)
    c = sched.next_chunk(WorkerState(rank=1), 1)
    return c.offsets, c.tokens


def check_copies(sp, offsets, tokens):
    """Every copied key/value row comes from an earlier prompt that computes it, with the same tokens up to there."""
    pr = [tokens[offsets[b]:offsets[b + 1]] for b in sp.perm]
    for dst, src, pos in sp.copies.tolist():
        assert src < dst and sp.skip[src] <= pos < sp.lens[src]
        assert (pr[src][:pos + 1] == pr[dst][:pos + 1]).all()
    assert (np.diff(sp.copy_off) == sp.skip).all()


@pytest.mark.parametrize("n", [2, 4, 16])
def test_plan_computes_a_repeated_prompt_once(n):
    """A prompt's n samples cost one prefill plus one token each (its last: each sample's own logits row); the
    other positions are copied."""
    rng = np.random.default_rng(n)
    ps = [rng.integers(0, 50257, 16) for _ in range(64)]
    offsets, tokens = chunk_rows(ps, n)
    sp = prefix_share.plan(offsets, tokens, lambda need: kv_groups(need, 0, 1, 10 ** 9), extra=np.full(64 * n, 8))
    assert sp is not None and len(sp.groups) == 1
    assert int(sp.offsets[-1]) == 64 * 16 + 64 * (n - 1)
    check_copies(sp, offsets, tokens)


def test_plan_shares_samples_of_mixed_lengths_in_many_kv_groups():
    """Mixed lengths whose KV cache needs several groups: the lexicographic order would need more groups than the
    chunk's (the plan used to decline, computing every sample's prompt); with identical prompts the plan keeps the
    chunk's order of lengths (its groups) and still computes each prompt once (+1 token a sample)."""
    rng = np.random.default_rng(7)
    ps = [rng.integers(0, 50257, int(L)) for L in rng.integers(8, 64, 40)]
    n = 4
    offsets, tokens = chunk_rows(ps, n)
    need = np.diff(offsets) + 16
    groups_of = lambda need: kv_groups(need, 0, 1, 2000)          # noqa: E731
    perm, _ = prefix_share.lexicographic(offsets, tokens)
    assert len(groups_of(need[perm])) > len(groups_of(need)) > 1
    sp = prefix_share.plan(offsets, tokens, groups_of, extra=np.full(len(need), 16))
    assert sp is not None and len(sp.groups) == len(groups_of(need))
    one = sum(len(p) for p in ps)
    assert int(sp.offsets[-1]) <= one + len(ps) * (n - 1) + sum(sp.lens[b0] for b0, _ in sp.groups)
    check_copies(sp, offsets, tokens)
    assert all(sp.skip[b0] == 0 for b0, _ in sp.groups)
