"""Per-row settings (chunks.RowParams), stop token ids and stop strings on the CPU: the NumPy backend, the synthetic
backend, the stop-string matcher (model/stops.py), chunks in halves with their params, the CUDA upload layout's
per-row part, and the real CUDA Runner over test_cuda_oom's stand-in device (per-row limits, stops, progress)."""
import dataclasses

import numpy as np
import pytest

from gpt2job.backends.base import Pause, compute, drive
from gpt2job.backends.cuda import prefix_share
from gpt2job.backends.cuda.plan import Layout, check_prompts, join_completions, kv_groups, split_chunk
from gpt2job.backends.numpy_backend import NumpyBackend
from gpt2job.backends.synthetic import SyntheticBackend
from gpt2job.chunks import (FINISH_LENGTH, FINISH_STOP, FINISH_STOP_STRING, Chunk, Completions, RowParams,
                            merge_chunks, split_completions, unpack_stops)
from gpt2job.errors import UserError
from gpt2job.model.config import GPT2Config
from gpt2job.model.sampling import RowSettings
from gpt2job.model.stops import StopStrings, token_bytes
from gpt2job.model.weights import random_params
from gpt2job.settings import GenerationSettings, SamplingSettings

V = 60


@pytest.fixture(scope="module")
def tiny():
    p = random_params(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=V), 3)
    p.wte *= 4   # spread the logits: no near ties
    return p


def chunk_of(prompts, rows=None, params=None, chunk_id=0):
    offsets = np.zeros(len(prompts) + 1, np.int64)
    offsets[1:] = np.cumsum([len(p) for p in prompts])
    rows = np.arange(len(prompts), dtype=np.int64) * 3 + 1 if rows is None else np.asarray(rows, np.int64)
    return Chunk(chunk_id, rows, offsets, np.concatenate(prompts).astype(np.int32), params)


def params_of(B, **over):
    a = dict(max_new_tokens=np.full(B, 6), temperature=np.zeros(B), top_k=np.zeros(B), top_p=np.ones(B),
             seed=np.zeros(B), repetition_penalty=np.ones(B))
    stops = over.pop("stops", None)
    a.update(over)
    return RowParams.of(stops=stops, **a)


def prompts_of(n, seed=0, vocab=V):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, rng.integers(1, 7)) for _ in range(n)]


GS = GenerationSettings(max_new_tokens=6, ignore_eos=True, eos_token_id=V - 1)


# ---------------------------------------------------------------- NumPy backend

def test_per_row_max_new_tokens_end_each_row_at_its_own_limit(tiny):
    prompts = prompts_of(7)
    full = compute(NumpyBackend(tiny, GS), chunk_of(prompts))
    mnt = np.array([1, 6, 3, 2, 5, 1, 4])
    got = compute(NumpyBackend(tiny, GS, batch_size=4), chunk_of(prompts, params=params_of(7, max_new_tokens=mnt)))
    for b in range(7):   # greedy: a shorter limit is a prefix of the longer run (rows leave, the rest computes on)
        assert got.row_tokens(b).tolist() == full.row_tokens(b)[:mnt[b]].tolist()
    assert (got.finish == FINISH_LENGTH).all()


def test_per_row_sampling_settings_in_one_batch_match_each_row_alone(tiny):
    prompts = prompts_of(6, seed=1)
    pr = params_of(6, temperature=[0, 1.2, 0.8, 0, 1.0, 0.7], top_k=[0, 10, 0, 0, 5, 0], top_p=[1, 0.9, 1, 1, 1, 0.8],
                   seed=[0, 5, 6, 7, 8, 2 ** 40], repetition_penalty=[1, 1.3, 1, 2.0, 0.9, 1],
                   max_new_tokens=[6, 5, 4, 6, 3, 6])
    ch = chunk_of(prompts, params=pr)
    got = compute(NumpyBackend(tiny, GS), ch)
    for b in range(6):   # each row alone, with the job's settings set to its own
        gs = dataclasses.replace(GS, max_new_tokens=int(pr.max_new_tokens[b]),
                                 repetition_penalty=float(pr.repetition_penalty[b]),
                                 sampling=SamplingSettings(float(pr.temperature[b]), int(pr.top_k[b]),
                                                           float(pr.top_p[b]), int(pr.seed[b])))
        alone = compute(NumpyBackend(tiny, gs), chunk_of([prompts[b]], rows=[ch.rows[b]]))
        assert got.row_tokens(b).tolist() == alone.row_tokens(0).tolist(), b
    # the penalty changes a greedy row's tokens (row 3: penalty 2)
    plain = compute(NumpyBackend(tiny, GS), chunk_of([prompts[3]], rows=[ch.rows[3]]))
    assert got.row_tokens(3).tolist() != plain.row_tokens(0).tolist()


def test_stop_token_ids_end_the_row_and_keep_the_token(tiny):
    prompts = prompts_of(5, seed=2)
    full = compute(NumpyBackend(tiny, GS), chunk_of(prompts))
    stop = int(full.row_tokens(0)[2])
    gs = dataclasses.replace(GS, stop_token_ids=(stop,))
    got = compute(NumpyBackend(tiny, gs), chunk_of(prompts))
    for b in range(5):
        t = full.row_tokens(b).tolist()
        n = t.index(stop) + 1 if stop in t else len(t)
        assert got.row_tokens(b).tolist() == t[:n]
        assert got.finish[b] == (FINISH_STOP if stop in t else FINISH_LENGTH)


def test_pauses_after_each_micro_batch_count_the_tokens_so_far(tiny):
    be = NumpyBackend(tiny, GS, batch_size=2)
    be.submit(chunk_of(prompts_of(5), params=params_of(5, max_new_tokens=[1, 2, 3, 4, 5])))
    seen = []

    def on_pause(p):
        assert isinstance(p, Pause) and p.submit and p.ready()
        seen.append(p.generated)

    comp = drive(be.run(), on_pause)
    assert seen == [3, 10, 15] and comp.n_generated == 15


# ---------------------------------------------------------------- stop strings

TABLE = [b"ab", b"c", b"de", b"\xe2\x82", b"\xac!", b"x"]   # token 3 + 4: the euro sign, split across tokens


def test_stop_strings_match_across_token_boundaries():
    s = StopStrings([("cd",), ("\u20ac",), ("zz", "bc"), ()], TABLE)
    toks = np.array([[0, 1, 2], [5, 3, 4], [0, 1, 2], [0, 1, 2]])
    ends = [s.ends(np.arange(4), toks[:, k], lambda b: toks[b, :k]).tolist() for k in range(3)]
    assert ends[0] == [False] * 4
    assert ends[1] == [False, False, True, False]                        # "bc": row 2 ends at its second token
    assert ends[2][:2] == [True, True] and not ends[2][3]                # the euro sign: UTF-8 bytes of two tokens
    assert StopStrings.of([(), ()], None, 10) is None                    # no stop strings: no tokenizer needed


def text_model(vocab_dir):
    p = random_params(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=50257), 1)
    p.wte *= 4
    return p


def boundary_stop(table, toks):
    """A stop string made of the last byte of token k-1 and the first of token k, found in the generated bytes
    first after token k: (k, the string)."""
    for k in range(1, len(toks)):
        a, b = table[toks[k - 1]], table[toks[k]]
        if not a or not b:
            continue
        s = a[-1:] + b[:1]
        try:
            text = s.decode("utf-8")
        except UnicodeDecodeError:
            continue
        if s not in b"".join(table[t] for t in toks[:k]) and s not in b and s.isascii():
            return k, text
    pytest.skip("no usable token boundary")


def test_numpy_backend_stop_strings_and_stop_ids(vocab_dir):
    params = text_model(vocab_dir)
    gs = GenerationSettings(max_new_tokens=10, ignore_eos=True, vocab_dir=vocab_dir)
    prompts = [np.array([464, 3290, 318]), np.array([40, 588]), np.array([1212, 318, 257, 1332])]
    ch = chunk_of(prompts)
    full = compute(NumpyBackend(params, gs), ch)
    table = token_bytes(vocab_dir, 50257)
    toks = full.row_tokens(0).tolist()
    k, stop = boundary_stop(table, toks)
    prompt_text = b"".join(table[t] for t in prompts[1]).decode("utf-8", "replace")
    # job-wide stop strings: row 0 ends at token k; a string only in row 1's prompt stops nothing
    got = compute(NumpyBackend(params, dataclasses.replace(gs, stop=(stop, prompt_text))), ch)
    assert got.row_tokens(0).tolist() == toks[:k + 1] and got.finish[0] == FINISH_STOP_STRING
    for b in (1, 2):
        t = full.row_tokens(b).tolist()
        text = b"".join(table[x] for x in t)
        if stop.encode() not in text and prompt_text.encode() not in text:
            assert got.row_tokens(b).tolist() == t and got.finish[b] == FINISH_LENGTH
    # per-row stop strings (RowParams.stops): only row 0 has it
    pr = params_of(3, max_new_tokens=[10] * 3, stops=[(stop,), (), ("\x00never",)])
    got = compute(NumpyBackend(params, gs), chunk_of(prompts, params=pr))
    assert got.row_tokens(0).tolist() == toks[:k + 1] and got.finish[0] == FINISH_STOP_STRING
    assert got.row_tokens(1).tolist() == full.row_tokens(1).tolist() and got.finish[1] == FINISH_LENGTH
    # a stop id at the token that completes the stop string wins
    got = compute(NumpyBackend(params, dataclasses.replace(gs, stop=(stop,), stop_token_ids=(toks[k],))), ch)
    assert got.row_tokens(0).tolist()[-1] == toks[k] and got.finish[0] == FINISH_STOP


# ---------------------------------------------------------------- synthetic backend

def test_synthetic_backend_per_row_limits_and_stop_ids():
    cfg = GPT2Config(n_layer=1, n_head=1, n_embd=8, n_positions=64, vocab_size=7)
    gs = GenerationSettings(max_new_tokens=9, ignore_eos=True, eos_token_id=6)
    prompts = prompts_of(20, vocab=7)
    full = compute(SyntheticBackend(cfg, gs), chunk_of(prompts))
    mnt = np.arange(20) % 9 + 1
    got = compute(SyntheticBackend(cfg, dataclasses.replace(gs, stop_token_ids=(3,))),
                  chunk_of(prompts, params=params_of(20, max_new_tokens=mnt)))
    for b in range(20):
        t = full.row_tokens(b)[:mnt[b]].tolist()
        n = t.index(3) + 1 if 3 in t else len(t)
        assert got.row_tokens(b).tolist() == t[:n]
        assert got.finish[b] == (FINISH_STOP if 3 in t else FINISH_LENGTH)


# ---------------------------------------------------------------- CUDA planning (pure NumPy)

def test_split_and_join_carry_the_params():
    prompts = prompts_of(5)
    pr = params_of(5, max_new_tokens=[1, 2, 3, 4, 5], stops=[("a",), (), ("b", "c"), (), ("d",)])
    ch = chunk_of(prompts, params=pr)
    a, b = split_chunk(ch)
    assert a.params.max_new_tokens.tolist() == [1, 2] and b.params.max_new_tokens.tolist() == [3, 4, 5]
    assert list(b.params.all_stops()) == [("b", "c"), (), ("d",)]
    parts = [Completions.from_lists(0, c.rows, [[7] * int(m) for m in c.params.max_new_tokens], [0] * len(c.rows))
             for c in (a, b)]
    joined = join_completions(ch, parts)
    assert joined.rows.tolist() == ch.rows.tolist() and np.diff(joined.offsets).tolist() == [1, 2, 3, 4, 5]


def test_merged_chunks_keep_each_rows_prompt_and_settings_and_split_back():
    """chunks.merge_chunks (a worker's chunks as one batch) and split_completions (each chunk's result again), the
    log-probabilities with their tokens."""
    prompts = prompts_of(5)
    a = chunk_of(prompts[:2], rows=[4, 9], chunk_id=7,
                 params=params_of(2, max_new_tokens=[1, 2], stops=[("a",), ("b", "c")]))
    b = chunk_of(prompts[2:], rows=[1, 2, 3], chunk_id=8,
                 params=params_of(3, max_new_tokens=[3, 4, 5], stops=[(), ("d",), ("é",)]))
    m = merge_chunks([a, b])
    assert m.chunk_id == 7 and m.rows.tolist() == [4, 9, 1, 2, 3]
    assert [p.tolist() for p in m.prompts()] == [np.asarray(p).tolist() for p in prompts]
    assert m.params.max_new_tokens.tolist() == [1, 2, 3, 4, 5]
    assert list(m.params.all_stops()) == [("a",), ("b", "c"), (), ("d",), ("é",)]
    comp = Completions.from_lists(7, m.rows, [[r] * int(n) for r, n in zip(m.rows, m.params.max_new_tokens)],
                                  [0, 1, 0, 1, 0])
    comp.logprobs = -np.arange(15, dtype=np.float32)
    pa, pb = split_completions(comp, [(7, 2), (8, 3)])
    assert (pa.chunk_id, pa.rows.tolist(), pa.tokens.tolist(), pa.finish.tolist()) == (7, [4, 9], [4, 9, 9], [0, 1])
    assert (pb.chunk_id, pb.rows.tolist(), pb.finish.tolist()) == (8, [1, 2, 3], [0, 1, 0])
    assert pb.tokens.tolist() == [1] * 3 + [2] * 4 + [3] * 5 and pb.logprobs.tolist() == list(-np.arange(3, 15.0))
    assert merge_chunks([a]) is a


def test_prompt_checks_use_each_rows_own_limit():
    lens = np.array([30, 5])
    check_prompts(lens, np.zeros(35, np.int32), 32, 100, np.array([3, 28]))
    with pytest.raises(UserError, match="prompt length 5 \\+ 29"):
        check_prompts(lens, np.zeros(35, np.int32), 32, 100, np.array([3, 29]))


@pytest.mark.parametrize("share", [False, True])
def test_layout_per_row_part_follows_the_run_order(share):
    rng = np.random.default_rng(5)
    stem = rng.integers(0, 50, 6)
    prompts = [np.concatenate([stem[:rng.integers(1, 7)], rng.integers(0, 50, rng.integers(0, 9))]) for _ in range(21)]
    lens = np.array([len(p) for p in prompts], np.int64)
    offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    tokens = np.concatenate(prompts).astype(np.int32)
    pr = params_of(21, max_new_tokens=rng.integers(1, 9, 21), temperature=rng.random(21), top_k=rng.integers(0, 9, 21),
                   top_p=rng.random(21), seed=rng.integers(0, 2 ** 62, 21), repetition_penalty=rng.random(21) + 0.5)
    rs = RowSettings.of(pr, GS, 21)
    sp = prefix_share.plan(offsets, tokens, lambda need: kv_groups(need, 0, 1, 10 ** 9), extra=rs.max_new_tokens) \
        if share else None
    assert (sp is not None) == share
    order = sp.perm if share else np.arange(21)
    lay = Layout.of(offsets, lens, tokens, np.arange(21, dtype=np.int64), sp, False, rs.take(order))
    host = np.full(lay.nbytes + 8, 0xEE, np.uint8)
    lay.write(host)
    a, B = lay.at_params, 21
    assert a % 8 == 0 and lay.at_ptok % 8 == 0 and host[lay.nbytes] == 0xEE
    np.testing.assert_array_equal(host[a:a + 8 * B].view(np.uint64), pr.seed[order].astype(np.uint64))
    np.testing.assert_array_equal(host[a + 8 * B:a + 16 * B].view(np.float64), pr.temperature[order])
    np.testing.assert_array_equal(host[a + 16 * B:a + 24 * B].view(np.float64), pr.top_p[order])
    np.testing.assert_array_equal(host[a + 24 * B:a + 28 * B].view(np.int32), pr.top_k[order])
    np.testing.assert_array_equal(host[a + 28 * B:a + 32 * B].view(np.float32), pr.repetition_penalty[order])
    TP, t = int(lens.sum()), lay.at_ptok   # every prompt token (shared prefixes too), with its prompt (run order)
    np.testing.assert_array_equal(host[t:t + 4 * TP].view(np.int32), np.concatenate([prompts[i] for i in order]))
    np.testing.assert_array_equal(host[t + 4 * TP:t + 8 * TP].view(np.int32), np.repeat(np.arange(B), lens[order]))
    plain = Layout.of(offsets, lens, tokens, np.arange(21, dtype=np.int64), sp, False)
    assert plain.nbytes == plain.at_params == plain.at_ptok    # no per-row part: the upload of before


# ---------------------------------------------------------------- the real Runner on the stand-in device

oom = pytest.importorskip("test_cuda_oom")
fake = oom.fake


class RowsModel(oom.FakeModel):
    """The stand-in model; rows with their own settings would select with sel (these tests keep the job's)."""

    def select(self, x, n, p_rowidx, idx_base, p_seqidx, p_rows, step, p_out, sampling, sel=None, step_at=0):
        assert sel is None
        super().select(x, n, p_rowidx, idx_base, p_seqidx, p_rows, step, p_out, sampling)


def stand_in_runner(share):
    from gpt2job.backends.cuda.device import Device
    from gpt2job.backends.cuda.runner import Runner
    dev = Device(0)
    dev.open_streams()
    runner = Runner(dev, RowsModel(dev, 64), oom.FakeKernels(), 1 << 20, 4096, share, oom.FakeDrv.Event())
    runner.fit()
    dev.reserve_uploads(2, 20 * 4096)
    return runner


def expected(chunk, gs, mnt, stops=None, table=None):
    """test_cuda_oom's reference, each row cut at its own limit, its first stop id, its stop string."""
    full = oom.reference(chunk, dataclasses.replace(gs, max_new_tokens=int(max(mnt)), ignore_eos=True))
    out, fin = [], []
    ids = set(gs.stop_ids())
    for b in range(len(chunk.rows)):
        t, why, text = full.row_tokens(b).tolist()[:mnt[b]], FINISH_LENGTH, b""
        for i, x in enumerate(t):
            text += table[x] if table else b""
            if x in ids:
                t, why = t[:i + 1], FINISH_STOP
                break
            if stops and any(s.encode() in text for s in stops[b]):
                t, why = t[:i + 1], FINISH_STOP_STRING
                break
        out.append(t)
        fin.append(why)
    return Completions.from_lists(chunk.chunk_id, chunk.rows, out, fin)


@pytest.mark.parametrize("share", [False, True])
def test_runner_per_row_limits_stop_ids_stop_strings_and_progress(fake, monkeypatch, share):
    import gpt2job.model.stops as stops_mod
    table = [bytes([97 + t % 26]) for t in range(oom.V)]                  # token t: one letter
    monkeypatch.setattr(stops_mod, "token_bytes", lambda d, v: table)
    rng = np.random.default_rng(2)
    stem = rng.integers(0, oom.V, 5)
    prompts = [np.concatenate([stem[:rng.integers(1, 6)], rng.integers(0, oom.V, rng.integers(1, 6))])
               for _ in range(23)]
    mnt = rng.integers(1, 8, 23)
    doubled = tuple(c * 2 for c in "abcdefghij")                           # a letter twice: from two tokens
    stops = [("ab", "q") if b % 3 == 0 else doubled if b % 3 == 1 else () for b in range(23)]
    gs = GenerationSettings(max_new_tokens=4, ignore_eos=False, eos_token_id=oom.EOS, stop_token_ids=(11,))
    ch = chunk_of(prompts, params=params_of(23, max_new_tokens=mnt, stops=stops))
    runner = stand_in_runner(share)
    runner.submit(ch, gs)
    progress = []
    got = drive(runner.run(), lambda p: (progress.append(p.generated), p.ready()))
    want = expected(ch, gs, mnt, stops, table)
    oom.assert_same(got, want)
    assert {FINISH_LENGTH, FINISH_STOP, FINISH_STOP_STRING} <= set(want.finish.tolist())
    assert progress == sorted(progress) and progress[-1] <= got.n_generated and max(progress) > 0
    if share:
        assert runner.timeline[-1]["shared_prefix_tokens"] > 0


def test_runner_halves_keep_each_rows_params(fake):
    """Out of memory: the two halves carry their rows' limits (split_chunk takes the params)."""
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, oom.V, rng.integers(1, 6)) for _ in range(9)]
    mnt = rng.integers(1, 8, 9)
    gs = GenerationSettings(max_new_tokens=3, ignore_eos=True, eos_token_id=oom.EOS)
    ch = chunk_of(prompts, params=params_of(9, max_new_tokens=mnt))
    runner = stand_in_runner(False)
    real_prepare = runner.prepare
    calls = []

    def prepare(chunk, settings, share):   # the whole chunk runs out of memory once
        calls.append(len(chunk.rows))
        if len(calls) == 1:
            raise oom.FakeDrv.MemoryError("out of memory")
        return real_prepare(chunk, settings, share)
    runner.prepare = prepare
    runner.submit(ch, gs)
    got = drive(runner.run())
    assert calls[:3] == [9, 4, 5]
    oom.assert_same(got, expected(ch, gs, mnt))


class SelModel(oom.FakeModel):
    """The stand-in model with a stand-in per-row rule read through sel's device pointers: a seen token (per the
    bitmap) of a penalized row moves to the next id, then a sampled row (temperature > 0) adds seed % 5."""

    def select(self, x, n, p_rowidx, idx_base, p_seqidx, p_rows, step, p_out, sampling, sel=None, step_at=0):
        super().select(x, n, p_rowidx, idx_base, p_seqidx, p_rows, step, p_out, sampling)
        if sel is None or not n:
            return
        heap = oom.FakeDrv.heap
        if step:   # a decode step: sampling reads the step's number on the GPU (a replayed graph's own)
            assert step_at and heap.i32(step_at, 1)[0] == step
        q = heap.i32(p_seqidx, n).copy()
        Q = int(q.max()) + 1
        seed = heap.view(sel.seed, 8 * Q).view(np.uint64)
        temp = heap.view(sel.temp, 8 * Q).view(np.float64)
        pen = heap.view(sel.penalty, 4 * Q).view(np.float32)
        out = heap.i32(p_out, n)
        for i in range(n):
            t = int(out[i])
            if sel.seen and pen[q[i]] != 1:
                word = heap.view(sel.seen + 4 * ((q[i] - sel.seq_base) * sel.words + t // 32), 4).view(np.uint32)[0]
                t = (t + 1) % oom.V if (word >> (t % 32)) & 1 else t
            if temp[q[i]] > 0:
                t = (t + int(seed[q[i]]) % 5) % oom.V
            out[i] = t


class SelKernels(oom.FakeKernels):
    def mark_seen(self, stream, tok, seq, n, seq_base, bits, words):
        heap = oom.FakeDrv.heap
        for t, s in zip(heap.i32(tok, n).copy(), heap.i32(seq, n).copy()):
            w = heap.view(bits + 4 * ((int(s) - seq_base) * words + int(t) // 32), 4).view(np.uint32)
            w[0] |= np.uint32(1 << (int(t) % 32))


@pytest.mark.parametrize("share", [False, True])
def test_runner_per_row_selection_reads_its_rows_settings_and_seen_tokens(fake, monkeypatch, share):
    """The per-row path through the real Runner: each row's settings at the upload's per-row part (run order, also
    with shared prefixes), its seen bitmap set from its whole prompt and each step's input tokens."""
    from gpt2job.backends.cuda.device import Device
    from gpt2job.backends.cuda.runner import Runner

    def memset(ptr, value, n, stream=None):
        oom.FakeDrv.heap.view(int(ptr), 4 * n).view(np.uint32)[:] = value
    monkeypatch.setattr(oom.FakeDrv, "memset_d32_async", staticmethod(memset), raising=False)
    rng = np.random.default_rng(6)
    stem = rng.integers(0, oom.V, 6)
    prompts = [np.concatenate([stem[:rng.integers(1, 7)], rng.integers(0, oom.V, rng.integers(1, 5))])
               for _ in range(17)]
    pr = params_of(17, max_new_tokens=rng.integers(1, 8, 17), temperature=np.where(np.arange(17) % 2, 0.8, 0.0),
                   seed=rng.integers(0, 1000, 17), repetition_penalty=np.where(np.arange(17) % 3, 1.5, 1.0))
    ch = chunk_of(prompts, params=pr)
    gs = GenerationSettings(max_new_tokens=3, ignore_eos=True, eos_token_id=oom.EOS)
    dev = Device(0)
    dev.open_streams()
    runner = Runner(dev, SelModel(dev, 64), SelKernels(), 1 << 20, 4096, share, oom.FakeDrv.Event())
    runner.fit()
    dev.reserve_uploads(2, 20 * 4096)
    runner.submit(ch, gs)
    got = drive(runner.run())
    want = []
    for b, p in enumerate(prompts):
        seq, seen, gen = [int(t) for t in p], set(int(t) for t in p), []
        for _ in range(int(pr.max_new_tokens[b])):
            t = oom.mix(oom.key(seq[j], j) for j in range(len(seq))) % oom.V
            if pr.repetition_penalty[b] != 1 and t in seen:
                t = (t + 1) % oom.V
            if pr.temperature[b] > 0:
                t = (t + int(pr.seed[b]) % 5) % oom.V
            gen.append(t)
            seq.append(t)
            seen.add(t)
        want.append(gen)
    oom.assert_same(got, Completions.from_lists(0, ch.rows, want, [FINISH_LENGTH] * 17))
    if share:
        assert runner.timeline[-1]["shared_prefix_tokens"] > 0


def test_every_row_s_stop_strings_decode_as_each_row_alone():
    stops = [(".", " the"), (), (".", " the"), ("é\n",), (), ("", "x")]
    p = params_of(6, stops=stops)
    assert p.all_stops() == tuple(unpack_stops(p.stop_bytes[p.stop_offsets[b]:p.stop_offsets[b + 1]]) for b in range(6))
    assert p.all_stops() == ((".", " the"), (), (".", " the"), ("é\n",), (), ("", "x"))
    assert params_of(0).all_stops() == ()
