"""Greedy jobs compute each distinct prompt once: the copies of a prompt get its completion, the output
equals a --no-dedup run's, the workers receive fewer rows, sampling never deduplicates, and a resume
finishes every row (also one whose earlier run computed a prompt but not its copies)."""
import json
import re

import h5py
import numpy as np
import pytest

from conftest import TINY_HF, job_env, read_output, run_gpt2job, write_token_input
from gpt2job.chunks import Completions
from gpt2job.files.dedup import Copies, group_identical
from gpt2job.files.prompts import PromptSet

SUBMITTED = re.compile(r"rank \d+: chunk \d+ \((\d+) prompts\) submitted")


def make_rows():
    """30 rows: 14 distinct valid prompts, 14 copies of them, and an empty (invalid) prompt twice."""
    rng = np.random.default_rng(5)
    base = [rng.integers(0, 1000, n).tolist() for n in (3, 7, 5, 5, 1, 9, 4, 6, 2, 8, 5, 3)]
    base += [[5, 6], [5, 6, 7]]                          # a prefix of another prompt is not a copy
    copy_of = [0, 2, 2, 3, 4, 7, 9, 9, 9, 12, 13, 5, 0, 1]
    rows = base + [base[i] for i in copy_of] + [[], []]
    order = np.random.default_rng(6).permutation(len(rows))   # copies before, after, between
    return [rows[i] for i in order]


ROWS = make_rows()
N = len(ROWS)
N_INVALID = 2
N_DISTINCT = len({tuple(r) for r in ROWS if r})
N_COPIES = N - N_INVALID - N_DISTINCT      # 14


@pytest.fixture(scope="module")
def inp(tmp_path_factory):
    path = tmp_path_factory.mktemp("dedup") / "in.h5"
    write_token_input(path, ROWS)
    return path


def args(inp, out, *extra):
    return ["run", inp, out, "--model", TINY_HF, "--max-new-tokens", 6, "--chunk-size", 2, "--backend", "numpy",
            "--skip-invalid", *extra]


def datasets(path):
    with h5py.File(path, "r") as f:
        return {name: [x.tolist() if isinstance(x, np.ndarray) else x for x in f[name][()]]
                for name in f if isinstance(f[name], h5py.Dataset)}


def summary(path):
    return json.loads(read_output(path)["attrs"]["summary"])


def computed_rows(stderr):
    """Prompts the workers were handed, from the GPT2JOB_TRACE lines."""
    return sum(int(n) for n in SUBMITTED.findall(stderr))


def test_group_identical():
    p = PromptSet.from_lists([[1, 2], [3], [1, 2], [1, 2, 0], [3], [1, 2], [], []], "t")
    reps, copies = group_identical(p, np.arange(len(p)))
    assert reps.tolist() == [0, 1, 3, 6]
    assert {k: v.tolist() for k, v in copies.as_dict().items()} == {0: [2, 5], 1: [4], 6: [7]}
    reps, copies = group_identical(p, np.array([2, 3, 4, 5]))      # only among the rows given
    assert reps.tolist() == [2, 3, 4] and {k: v.tolist() for k, v in copies.as_dict().items()} == {2: [5]}
    reps, copies = group_identical(p, np.array([0, 1, 3]))
    assert reps.tolist() == [0, 1, 3] and copies.as_dict() == {}


def test_ragged_prompts_are_keyed_a_bounded_block_of_tokens_at_a_time(monkeypatch):
    """prompt_keys of ragged prompts works on about KEY_TOKENS tokens at a time (4M prompts of ~34 tokens held ~500 MB
    of temporaries with blocks of 262,144 rows): the keys, and so the groups, do not depend on the block."""
    import gpt2job.files.dedup as D
    p = PromptSet.from_lists(ROWS, "t")
    rows = np.arange(N)[::-1].copy()
    keys, sub, groups = D.prompt_keys(p), D.prompt_keys(p, rows), group_identical(p, np.arange(N))
    monkeypatch.setattr(D, "KEY_TOKENS", 7)        # blocks of one or two prompts
    assert D.prompt_keys(p).tolist() == keys.tolist() and D.prompt_keys(p, rows).tolist() == sub.tolist()
    reps, copies = group_identical(p, np.arange(N))
    assert reps.tolist() == groups[0].tolist() and len(copies) == N_COPIES + 1 == len(groups[1])


def test_with_copies_appends_identical_rows():
    copies = Copies(np.array([4, 7]), np.array([0, 1, 3]), np.array([5, 9, 11]))   # 4 -> [5], 7 -> [9, 11]
    comp = Completions.from_lists(3, [4, 6, 7], [[1, 2, 3], [8], [5, 5]], [1, 0, 0])
    out = copies.attach(comp).expanded()
    assert out.chunk_id == 3 and out.rows.tolist() == [4, 6, 7, 5, 9, 11]
    assert [out.row_tokens(i).tolist() for i in range(6)] == [[1, 2, 3], [8], [5, 5], [1, 2, 3], [5, 5], [5, 5]]
    assert out.finish.tolist() == [1, 0, 0, 1, 0, 0]


@pytest.mark.parametrize("np_", [None, 3])
def test_dedup_output_equals_no_dedup_and_workers_compute_each_prompt_once(tmp_path, inp, np_):
    env = job_env(GPT2JOB_TRACE=1)
    a, b = tmp_path / "dedup.h5", tmp_path / "all.h5"
    pa = run_gpt2job(args(inp, a), np_=np_, env=env, check=0)
    pb = run_gpt2job(args(inp, b, "--no-dedup"), np_=np_, env=env, check=0)
    da, db = datasets(a), datasets(b)
    assert da == db
    assert all(da["done"]) and da["finish_reason"].count(b"invalid") == N_INVALID
    for i, r in enumerate(ROWS):      # the copies really are copies
        j = ROWS.index(r)
        assert da["completion_tokens"][i] == da["completion_tokens"][j]
    assert computed_rows(pa.stderr) == N_DISTINCT
    assert computed_rows(pb.stderr) == N - N_INVALID
    sa, sb = summary(a), summary(b)
    assert sa["duplicate_prompts"] == N_COPIES and sb["duplicate_prompts"] == 0
    assert f"{N_COPIES} prompts repeat an earlier prompt" in pa.stderr
    assert f"{N_COPIES} rows copied from an identical prompt's" in pa.stdout
    assert "computed, copies aside)" in pa.stdout and "copies aside" not in pb.stdout   # the copies' figure apart
    assert "repeat an earlier prompt" not in pb.stderr and "copied from" not in pb.stdout
    # delivered rows and tokens: the same whether or not copies were computed once
    for s in (sa, sb):
        assert sum(w["rows"] for w in s["workers"]) == N - N_INVALID
    assert sa["generated_tokens"] == sb["generated_tokens"] == sum(len(t) for t in da["completion_tokens"])
    assert sum(w["computed_tokens"] for w in sa["workers"]) < sa["generated_tokens"]
    assert sum(w["computed_tokens"] for w in sb["workers"]) == sb["generated_tokens"]


def test_sampling_never_deduplicates(tmp_path, inp):
    out = tmp_path / "s.h5"
    p = run_gpt2job(args(inp, out, "--temperature", 1.5, "--seed", 3), env=job_env(GPT2JOB_TRACE=1), check=0)
    assert computed_rows(p.stderr) == N - N_INVALID
    assert summary(out)["duplicate_prompts"] == 0 and "repeat an earlier prompt" not in p.stderr
    toks = [t.tolist() for t in read_output(out)["tokens"]]
    pairs = [(i, ROWS.index(r)) for i, r in enumerate(ROWS) if r and ROWS.index(r) != i]
    assert any(toks[i] != toks[j] for i, j in pairs)      # per-row seeds: copies sample differently


def test_prepare_schedules_only_representatives(tmp_path, inp):
    from gpt2job.cluster.master import Master
    from gpt2job.settings import JobSettings
    cases = (({}, N_DISTINCT), ({"dedup": False}, N - N_INVALID), ({"temperature": 0.7}, N - N_INVALID))
    for k, (kw, total) in enumerate(cases):
        s = JobSettings(input=str(inp), output=str(tmp_path / f"p{k}.h5"), model=str(TINY_HF),
                        max_new_tokens=6, backend="numpy", skip_invalid=True, **kw)
        m = Master(s, None)
        m.prepare()
        try:
            assert m.sched.total == total
            assert m.n_copies == N - N_INVALID - total
            assert sorted(list(m.sched.queue) + m.copies.rows.tolist()) == \
                [i for i, r in enumerate(ROWS) if r]
        finally:
            m.store.close()
    assert "dedup" not in JobSettings(input="a", output="b").result_settings()


@pytest.mark.parametrize("first", ["--no-dedup", "dedup"])
def test_resume_of_an_interrupted_job_with_copies_finishes_every_row(tmp_path, inp, first):
    clean = tmp_path / "clean.h5"
    run_gpt2job(args(inp, clean, "--no-dedup"), check=0)
    out = tmp_path / "out.h5"
    extra = ["--no-dedup"] if first == "--no-dedup" else []
    p = run_gpt2job(args(inp, out, *extra), env=job_env(GPT2JOB_FAULT="0:3:raise"))   # 2 chunks, then it fails
    assert p.returncode == 3 and "no worker is left" in p.stderr, p.stderr
    done = read_output(out)["done"].astype(bool)
    kept = int(done.sum())
    assert N_INVALID < kept < N
    if first == "--no-dedup":   # the case to cover: some prompt is done but a copy of it is not
        assert any(done[i] != done[ROWS.index(r)] for i, r in enumerate(ROWS) if r)
    p = run_gpt2job(args(inp, out), env=job_env(GPT2JOB_TRACE=1), check=0)
    assert datasets(out) == datasets(clean)
    s = summary(out)
    assert s["rows_resumed"] == kept
    assert sum(w["rows"] for w in s["workers"]) == N - kept          # every row delivered once
    todo = [tuple(r) for i, r in enumerate(ROWS) if not done[i]]
    assert computed_rows(p.stderr) == len(set(todo))                  # dedup only among the rows not done
    assert s["duplicate_prompts"] == len(todo) - len(set(todo))
