"""Per-row token selection on the GPU (sampling.cu sample_rows_params, mark_seen) against their NumPy twins
(model/sampling.py), and CudaBackend with per-row settings, repetition penalty, stop ids and stop strings against
NumpyBackend (fp32: identical tokens). Skipped cleanly without pycuda or a GPU, like tests/test_cuda_kernels.py."""
import dataclasses
import os
import zlib

import numpy as np
import pytest

from conftest import cuda_or_skip
from twin_ties import assert_same_but_ties, params_margins

drv, _NGPU = cuda_or_skip()

from gpt2job.backends.base import compute, drive  # noqa: E402
from gpt2job.backends.cuda.options import KernelOptions  # noqa: E402
from gpt2job.backends.cuda.rows import RowSel  # noqa: E402
from gpt2job.backends.numpy_backend import NumpyBackend  # noqa: E402
from gpt2job.chunks import FINISH_STOP, FINISH_STOP_STRING, Chunk, RowParams  # noqa: E402
from gpt2job.model import sampling  # noqa: E402
from gpt2job.model.config import GPT2Config  # noqa: E402
from gpt2job.settings import GenerationSettings, SamplingSettings  # noqa: E402


@pytest.fixture(scope="module")
def K():
    from gpt2job.backends.cuda.kernels import Kernels
    ctx = drv.Device(0).make_context()
    try:
        yield Kernels(KernelOptions())
    finally:
        ctx.pop()
        ctx.detach()


BASE_SEED = int(os.environ.get("TEST_SEED") or np.random.SeedSequence().entropy % 2 ** 32)
RNG = np.random.default_rng(BASE_SEED)


@pytest.fixture(autouse=True)
def seeded_rng(request):
    global RNG
    seed = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2 ** 32
    RNG = np.random.default_rng(seed)
    print(f"RNG seed {seed} (reproduce: TEST_SEED={BASE_SEED} pytest '{request.node.nodeid}')")
    yield


def gpu(a):
    a = np.ascontiguousarray(a)
    g = drv.mem_alloc(max(a.nbytes, 16))
    drv.memcpy_htod(g, a)
    return g


def back(g, shape, dtype):
    out = np.empty(shape, dtype)
    drv.Context.synchronize()
    drv.memcpy_dtoh(out, g)
    return out


def random_row_settings(Q, greedy_share=0.3):
    """Per-sequence settings [Q]: a mix of greedy rows and samplers with and without top-k / top-p / penalty."""
    t = np.where(RNG.random(Q) < greedy_share, 0.0, RNG.uniform(0.5, 2.0, Q))
    k = np.where(RNG.random(Q) < 0.5, 0, RNG.integers(1, 60, Q)).astype(np.int32)
    p = np.where(RNG.random(Q) < 0.5, 1.0, RNG.uniform(0.05, 0.99, Q))
    seed = RNG.integers(0, 2 ** 63, Q).astype(np.uint64)
    seed[0] = np.uint64(2 ** 63 + 5)
    pen = np.where(RNG.random(Q) < 0.3, 1.0, RNG.uniform(0.5, 2.0, Q)).astype(np.float32)
    return t, k, p, seed, pen


@pytest.mark.parametrize("penalty", [False, True])
@pytest.mark.parametrize("V,std,cache", [(1000, 3.0, True), (50257, 3.0, True), (50257, 0.55, True),
                                         (50257, 0.55, False), (70001, 3.0, True)])
def test_sample_rows_params(K, penalty, V, std, cache):
    """The row in shared memory (cache, where V fits: penalized there) or in global memory (penalized in place)."""
    R, Q, base = 64, 80, 9
    lg = (RNG.standard_normal((R, V), dtype=np.float32) * std).astype(np.float32)
    lg[:, :40] = 4.0 * std / 3                                         # ties and seen tokens near the top
    rows = RNG.integers(0, 10 ** 6, Q).astype(np.int64)
    seqidx = (RNG.permutation(Q - base)[:R] + base).astype(np.int32)   # sequences base.. of this group
    t, k, p, seed, pen = random_row_settings(Q)
    if not penalty:
        pen[:] = 1.0
    W = sampling.seen_words(V)
    bits = np.zeros((Q - base, W), np.uint32)
    n = 3000
    sampling.mark_seen(bits, RNG.integers(0, V, n), RNG.integers(base, Q, n), base)
    out = gpu(np.full(R, -7, np.int32))
    dbits = gpu(bits)
    arrs = [gpu(a) for a in (seed, t, p, k, pen)]                       # held: freed when the test ends
    sel = RowSel(*(int(a) for a in arrs), int(dbits), W, base)
    K.sample_params(None, gpu(lg), V, V, gpu(rows), gpu(seqidx), 7, sel, out, R, cache=cache)
    got = back(out, R, np.int32)
    ref = sampling.sample_rows_params(lg, rows, seqidx, 7, seed, t, k, p, pen, bits, base)
    assert_same_but_ties(got, ref, params_margins(lg, rows, seqidx, 7, seed, t, k, p, pen, bits, base))
    greedy = t[seqidx] <= 0                                            # temperature 0 rows: the penalized argmax
    seen = sampling.seen_mask(bits, V)[seqidx - base]
    pl = sampling.penalize(lg, seen, pen[seqidx])
    np.testing.assert_array_equal(got[greedy], pl[greedy].argmax(1))
    # without a bitmap (seen 0): no penalty
    out2 = gpu(np.full(R, -7, np.int32))
    K.sample_params(None, gpu(lg), V, V, gpu(rows), gpu(seqidx), 7, dataclasses.replace(sel, seen=0), out2, R,
                    cache=cache)
    assert_same_but_ties(back(out2, R, np.int32),
                         sampling.sample_rows_params(lg, rows, seqidx, 7, seed, t, k, p, pen, None, base),
                         params_margins(lg, rows, seqidx, 7, seed, t, k, p, pen, None, base))


@pytest.mark.parametrize("n", [1, 700, 20000])
def test_mark_seen(K, n):
    V, S, base = 50257, 37, 5
    W = sampling.seen_words(V)
    bits = RNG.integers(0, 2 ** 32, (S, W), dtype=np.uint64).astype(np.uint32) * (RNG.random((S, W)) < 0.1)
    bits = bits.astype(np.uint32)
    tok = RNG.integers(0, V, n).astype(np.int32)
    seq = RNG.integers(base, base + S, n).astype(np.int32)
    dbits = gpu(bits)
    K.mark_seen(None, gpu(tok), gpu(seq), n, base, dbits, W)
    want = bits.copy()
    sampling.mark_seen(want, tok, seq, base)
    np.testing.assert_array_equal(back(dbits, (S, W), np.uint32), want)


# ---------------------------------------------------------------- end to end

def tiny_params(seed=0, **over):
    from gpt2job.model.weights import random_params
    cfg = GPT2Config(**{"n_layer": 2, "n_head": 4, "n_embd": 64, "n_positions": 64, "vocab_size": 1000, **over})
    p = random_params(cfg, seed)
    p.wte *= 10
    return p


def stem_chunk(B, V, seed=0, chunk_id=0, params=None):
    """Prompts that share prefixes (so the share plan reorders them), rows not in order."""
    rng = np.random.default_rng(seed)
    stem = rng.integers(0, V, 12)
    prompts = [np.concatenate([stem[:rng.integers(1, 12)], rng.integers(0, V, rng.integers(0, 9))]) for _ in range(B)]
    offsets = np.zeros(B + 1, np.int64)
    offsets[1:] = np.cumsum([len(p) for p in prompts])
    rows = rng.permutation(B).astype(np.int64) * 5 + 3
    return Chunk(chunk_id, rows, offsets, np.concatenate(prompts).astype(np.int32), params)


def mixed_params(B, seed=0, penalty=True, stops=None):
    rng = np.random.default_rng(seed)
    return RowParams.of(
        stops=stops, max_new_tokens=rng.integers(1, 9, B),
        temperature=np.where(np.arange(B) % 3 == 0, 0.0, rng.uniform(0.6, 1.5, B)),
        top_k=np.where(np.arange(B) % 2 == 0, 0, rng.integers(1, 40, B)),
        top_p=np.where(np.arange(B) % 4 == 1, rng.uniform(0.3, 0.95, B), 1.0),
        seed=rng.integers(0, 2 ** 62, B), repetition_penalty=rng.uniform(0.7, 1.8, B) if penalty else np.ones(B))


def assert_same(a, b):
    for f in ("rows", "offsets", "tokens", "finish"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


def run_cuda(params, gs, chunks, **kw):
    from gpt2job.backends.cuda.backend import CudaBackend
    be = CudaBackend(params, gs, dtype="float32", **kw.pop("backend", {}))
    try:
        if kw.get("kv_budget"):
            be.runner.kv_budget = kw["kv_budget"]
        return [compute(be, c) for c in chunks], be.timeline
    finally:
        be.close()


@pytest.mark.parametrize("penalty", [False, True])
@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("small", [False, True])
def test_backend_per_row_params_match_numpy(penalty, share, small):
    """One chunk, every row its own max_new_tokens / temperature (0 among them) / top-k / top-p / seed / penalty:
    the same tokens as the NumPy backend, with and without shared prefixes, in one KV group or one per row."""
    params = tiny_params(1)
    gs = GenerationSettings(max_new_tokens=4, ignore_eos=True, eos_token_id=999,
                            sampling=SamplingSettings(0.9, 0, 1.0, 1))
    chunks = [stem_chunk(30, 1000, seed=s, chunk_id=s, params=mixed_params(30, seed=s, penalty=penalty))
              for s in range(2)]
    kw = {"backend": {"options": KernelOptions(prefix_share=share)}}
    if small:
        kw["backend"].update(max_prefill_rows=40, head_rows=3)
        kw["kv_budget"] = 1
    got, timeline = run_cuda(params, gs, chunks, **kw)
    for g, c in zip(got, chunks):
        assert_same(g, compute(NumpyBackend(params, gs), c))
        assert np.diff(g.offsets).tolist() == c.params.max_new_tokens.tolist()
    if share and not small:
        assert timeline[-1]["shared_prefix_tokens"] > 0


def test_backend_job_wide_penalty_and_stop_ids_match_numpy():
    params = tiny_params(2)
    chunk = stem_chunk(25, 1000, seed=3)
    for sam in (SamplingSettings(), SamplingSettings(1.1, 30, 0.9, 4)):
        gs = GenerationSettings(max_new_tokens=8, ignore_eos=True, eos_token_id=999, sampling=sam,
                                repetition_penalty=1.4)
        ref = compute(NumpyBackend(params, gs), chunk)
        stop = int(ref.row_tokens(0)[2])
        gs = dataclasses.replace(gs, stop_token_ids=(stop, int(ref.row_tokens(1)[4])))
        ref = compute(NumpyBackend(params, gs), chunk)
        assert (ref.finish == FINISH_STOP).any()
        assert_same(run_cuda(params, gs, [chunk])[0][0], ref)
        # a config's eos_token_id list: its other ids end rows as EOS does (GenerationSettings.more_eos_ids)
        gs = dataclasses.replace(gs, ignore_eos=False, stop_token_ids=(), more_eos_ids=(stop,))
        ref = compute(NumpyBackend(params, gs), chunk)
        assert (np.diff(ref.offsets) < 8).any()   # rows ended by it
        assert_same(run_cuda(params, gs, [chunk])[0][0], ref)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_chunk_of_more_prompts_than_the_head_rows_takes_no_new_memory(dtype):
    """A chunk may hold more prompts than the buffers of one decode step (--chunk-size, or a chunk of cheap rows:
    scheduler.py): its KV groups stop at plan.group_rows, the size Runner.reserve gave each decode buffer (the
    penalty's seen bitmap among them), so after warm_up the chunk allocates nothing, and its tokens are the NumPy
    backend's."""
    from gpt2job.backends.cuda.backend import CudaBackend
    params = tiny_params(2)
    chunk = stem_chunk(40, 1000, seed=3)
    gs = GenerationSettings(max_new_tokens=6, ignore_eos=True, eos_token_id=999, repetition_penalty=1.3)
    be = CudaBackend(params, gs, dtype=dtype, head_rows=8)
    try:
        be.warm_up()
        epoch = be.device.pool_epoch
        got = compute(be, chunk)
        assert be.device.pool_epoch == epoch
        assert [b - a for a, b in be.runner.kv_groups(np.full(40, 20), 6)] == [20, 20]   # at most 4 x 8 rows
    finally:
        be.close()
    if dtype == "float32":
        assert_same(got, compute(NumpyBackend(params, gs), chunk))


def test_backend_stop_strings_match_numpy(vocab_dir):
    """Stop strings (job-wide and per row) on a tiny model with the real vocabulary: the CUDA runner checks each
    step's tokens on the host as the NumPy backend does."""
    from gpt2job.model.stops import token_bytes
    params = tiny_params(3, vocab_size=50257)
    gs = GenerationSettings(max_new_tokens=10, ignore_eos=True, vocab_dir=vocab_dir)
    chunk = stem_chunk(20, 50257, seed=4)
    ref = compute(NumpyBackend(params, gs), chunk)
    table = token_bytes(vocab_dir, 50257)
    # stop strings: two bytes across a token boundary of some rows' completions (ASCII only)
    stops = set()
    for b in range(20):
        t = ref.row_tokens(b).tolist()
        for i in range(3, len(t)):
            s = table[t[i - 1]][-1:] + table[t[i]][:1]
            if len(s) == 2 and s.isascii() and s.decode().isprintable():
                stops.add(s.decode())
                break
        if len(stops) >= 3:
            break
    gs = dataclasses.replace(gs, stop=tuple(sorted(stops)))
    ref = compute(NumpyBackend(params, gs), chunk)
    assert (ref.finish == FINISH_STOP_STRING).any()
    assert_same(run_cuda(params, gs, [chunk])[0][0], ref)
    per_row = [tuple(sorted(stops))[:b % 3] for b in range(20)]
    pchunk = dataclasses.replace(chunk, params=mixed_params(20, seed=5, stops=per_row))
    assert_same(run_cuda(params, gs, [pchunk])[0][0], compute(NumpyBackend(params, gs), pchunk))


def test_backend_greedy_params_keep_the_fast_path_float16():
    """A chunk whose rows all decode greedily without a penalty (per-row max_new_tokens only) selects with the
    fused fp16 argmax head: the same tokens as the job-wide run, cut at each row's limit."""
    from gpt2job.backends.cuda.backend import CudaBackend
    params = tiny_params(4)
    gs = GenerationSettings(max_new_tokens=8, ignore_eos=True)
    chunk = stem_chunk(30, 1000, seed=6)
    mnt = np.arange(30) % 8 + 1
    pr = RowParams.of(max_new_tokens=mnt, temperature=np.zeros(30), top_k=np.zeros(30), top_p=np.ones(30),
                      seed=np.arange(30), repetition_penalty=np.ones(30))
    be = CudaBackend(params, gs, dtype="float16")
    try:
        full = compute(be, chunk)
        got = compute(be, dataclasses.replace(chunk, params=pr))
        assert be.runner.head == "argmax"
    finally:
        be.close()
    for b in range(30):
        assert got.row_tokens(b).tolist() == full.row_tokens(b)[:mnt[b]].tolist()


@pytest.mark.parametrize("per_row", [False, True])
def test_backend_tempered_head_matches_the_selection_kernels_float16(per_row, monkeypatch):
    """fp16 rows sampled with a temperature and neither top-k nor top-p take sampling rule 6 in the LM head's
    epilogue (EPI_TEMPERED): the same tokens as the logits and the selection kernels (fuse_argmax off), job-wide and
    with per-row settings (greedy rows among them); a row with top-k among them sends the batch to the selection
    kernels, which give its rule-6 rows the same tokens. Job-wide, the fused head's buffers are reserved before the
    first chunk: after warm_up it allocates nothing (the pool's epoch stays, so captured decode graphs stay valid)."""
    from gpt2job.backends.cuda import model
    from gpt2job.backends.cuda.backend import CudaBackend
    monkeypatch.setattr(model, "TEMPERED_MIN_ROWS", 1)   # the fused head at this test's 40 rows too
    params = tiny_params(5)
    gs = GenerationSettings(max_new_tokens=6, ignore_eos=True, sampling=SamplingSettings(0.9, 0, 1.0, 3))
    B = 40
    t = np.where(np.arange(B) % 3 == 0, 0.0, np.random.default_rng(2).uniform(0.3, 1.5, B))
    pr = RowParams.of(max_new_tokens=np.arange(B) % 6 + 1, temperature=t, top_k=np.zeros(B), top_p=np.ones(B),
                      seed=np.arange(B) * 7, repetition_penalty=np.ones(B))
    chunk = stem_chunk(B, 1000, seed=8, params=pr if per_row else None)
    outs = []
    for fuse in (True, False):
        be = CudaBackend(params, gs, dtype="float16", options=KernelOptions(fuse_argmax=fuse))
        try:
            be.warm_up()                  # as the worker does before it says it is ready
            epoch = be.device.pool_epoch
            outs.append(compute(be, chunk))
            if not per_row:
                assert be.runner.head == "tempered" and be.device.pool_epoch == epoch
                assert ("tempered" in be.device._bufs) == fuse
            if per_row:   # one row with top-k: the batch's logits are written, rule 6 still picks the others
                k = np.zeros(B, np.int32)
                k[1] = 5
                outs.append(compute(be, dataclasses.replace(chunk, params=dataclasses.replace(pr, top_k=k))))
        finally:
            be.close()
    assert_same(outs[0], outs[len(outs) // 2])
    if per_row:
        assert_same(outs[1], outs[3])
        for b in range(B):
            if b != 1 and outs[1].rows[b] == outs[0].rows[b]:
                assert outs[1].row_tokens(b).tolist() == outs[0].row_tokens(b).tolist()


def test_progress_within_a_chunk():
    """Pause.generated counts the chunk's tokens that reached the host, never more than the completions hold."""
    from gpt2job.backends.cuda.backend import CudaBackend
    params = tiny_params(5)
    gs = GenerationSettings(max_new_tokens=6, ignore_eos=True)
    be = CudaBackend(params, gs, dtype="float32")
    try:
        be.submit(stem_chunk(20, 1000, seed=7))
        seen = []
        comp = drive(be.run(), lambda p: seen.append(p.generated))
    finally:
        be.close()
    assert seen == sorted(seen) and max(seen) > 0 and seen[-1] <= comp.n_generated == 120


# ---------------------------------------------------------------- log-probabilities (logprobs.cu)

@pytest.mark.parametrize("k", [0, 1, 5, 20])
@pytest.mark.parametrize("V", [1000, 50257])
def test_token_logprobs(K, k, V):
    """logprobs.cu token_logprobs against model/logprobs.py: the chosen token's value, the top k (ties at the top
    and at the boundary: the lower id first), a chosen token outside the top k, rows of a padded leading dimension."""
    from gpt2job.model.logprobs import token_logprobs
    R, ld = 37, V + 64
    lg = (RNG.standard_normal((R, ld), dtype=np.float32) * 4).astype(np.float32)
    lg[:5, 3:30:3] = 9.5                                               # ties at the top
    lg[5:9, :] = 0.0                                                   # all equal
    lg[9, -200:] = 50.0                                                # big values at the end
    tok = RNG.integers(0, V, R).astype(np.int32)
    tok[:3] = lg[:3, :V].argmax(1)
    lp, ids, vals = gpu(np.zeros(R, np.float32)), gpu(np.zeros(R * max(k, 1), np.int32)), gpu(np.zeros(R * max(k, 1),
                                                                                                     np.float32))
    K.logprobs(None, gpu(lg), ld, V, gpu(tok), k, lp, ids, vals, R)
    ref_lp, ref_ids, ref_top = token_logprobs(lg[:, :V], tok, k)
    np.testing.assert_allclose(back(lp, R, np.float32), ref_lp, atol=2e-5, rtol=1e-6)
    if k:
        np.testing.assert_array_equal(back(ids, (R, k), np.int32), ref_ids)
        np.testing.assert_allclose(back(vals, (R, k), np.float32), ref_top, atol=2e-5, rtol=1e-6)


@pytest.mark.parametrize("k", [0, 3])
def test_token_logprobs_greedy(K, k):
    """greedy=True: token_logprobs writes the row's argmax (argmax_rows' rule: the lowest id on ties) as the token,
    then its log-probability and the top k, as the kernel does given that token."""
    from gpt2job.model.logprobs import token_logprobs
    R, V = 29, 50257
    ld = V + 47
    lg = (RNG.standard_normal((R, ld), dtype=np.float32) * 4).astype(np.float32)
    lg[:4, 100:4000:700] = 11.0                                        # ties at the top: the lowest id wins
    lg[4:6, :] = -1.0                                                  # all equal: id 0
    want = lg[:, :V].argmax(1).astype(np.int32)
    tok = gpu(np.full(R, -5, np.int32))
    lp, ids, vals = gpu(np.zeros(R, np.float32)), gpu(np.zeros(R * max(k, 1), np.int32)), gpu(np.zeros(R * max(k, 1),
                                                                                                     np.float32))
    K.logprobs(None, gpu(lg), ld, V, tok, k, lp, ids, vals, R, greedy=True)
    np.testing.assert_array_equal(back(tok, R, np.int32), want)
    ref_lp, ref_ids, ref_top = token_logprobs(lg[:, :V], want, k)
    np.testing.assert_allclose(back(lp, R, np.float32), ref_lp, atol=2e-5, rtol=1e-6)
    if k:
        np.testing.assert_array_equal(back(ids, (R, k), np.int32), ref_ids)


@pytest.mark.parametrize("k", [0, 4])
@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_backend_logprobs_match_numpy(k, sampled, dtype):
    """CUDA fp32 --logprobs (--top-logprobs k) equals the NumPy backend within 1e-4 (tokens identical), greedy and
    sampled, with shared prefixes and small head groups / KV groups; fp16: the greedy tokens of the fast path and
    log-probabilities close to fp32's. Their pinned host room is taken before the first chunk (Runner.reserve)."""
    params = tiny_params(6)
    sam = SamplingSettings(1.2, 30, 0.9, 3) if sampled else SamplingSettings()
    gs = GenerationSettings(max_new_tokens=6, ignore_eos=True, eos_token_id=999, sampling=sam, logprobs=True,
                            top_logprobs=k)
    chunks = [stem_chunk(25, 1000, seed=8), stem_chunk(25, 1000, seed=9, chunk_id=1,
                                                        params=mixed_params(25, seed=2, penalty=True))]
    refs = [compute(NumpyBackend(params, gs), c) for c in chunks]
    from gpt2job.backends.cuda.backend import CudaBackend
    for kw in ({}, {"max_prefill_rows": 40, "head_rows": 3}) if dtype == "float32" else ({},):
        be = CudaBackend(params, gs, dtype=dtype, **kw)
        try:
            if kw:
                be.runner.kv_budget = 1
            pinned = be.device.lp_host
            got = [compute(be, c) for c in chunks]
            assert kw or (pinned is not None and be.device.lp_host is pinned)
        finally:
            be.close()
        for g, r in zip(got, refs):
            if dtype == "float16":
                assert g.logprobs.shape == (g.offsets[-1],) and np.isfinite(g.logprobs).all()
                if not sampled and r.tokens.tolist() == g.tokens.tolist():
                    np.testing.assert_allclose(g.logprobs, r.logprobs, atol=0.05)
                continue
            assert_same(g, r)
            np.testing.assert_allclose(g.logprobs, r.logprobs, atol=1e-4)
            if k:
                np.testing.assert_array_equal(g.top_ids, r.top_ids)
                np.testing.assert_allclose(g.top_logprobs, r.top_logprobs, atol=1e-4)
            else:
                assert g.top_ids is None and r.top_ids is None
    off = run_cuda(params, dataclasses.replace(gs, logprobs=False, top_logprobs=0), chunks[:1])[0][0]
    assert off.logprobs is None and off.tokens.tolist() == refs[0].tokens.tolist()


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_backend_score_matches_numpy(dtype):
    """`score` (GenerationSettings.score, backends/cuda/score.py): CUDA fp32 log P(token_t | tokens_<t) of every
    position 1..L-1 equals the NumPy backend within 1e-4 (the same tokens and offsets), in one KV group and pass and
    with small prefill passes, head groups and KV groups; fp16 within 0.05."""
    params = tiny_params(7)
    gs = GenerationSettings(max_new_tokens=1, eos_token_id=999, logprobs=True, score=True)
    chunks = [stem_chunk(25, 1000, seed=10), stem_chunk(7, 1000, seed=11, chunk_id=1)]
    refs = [compute(NumpyBackend(params, gs), c) for c in chunks]
    from gpt2job.backends.cuda.backend import CudaBackend
    for kw in ({}, {"max_prefill_rows": 40, "head_rows": 3}) if dtype == "float32" else ({},):
        be = CudaBackend(params, gs, dtype=dtype, **kw)
        try:
            if kw:
                be.runner.kv_budget = 1
            else:   # the pool reserve took holds what scoring uses: after warm_up it allocates nothing
                be.warm_up()
                epoch = be.device.pool_epoch
            got = [compute(be, c) for c in chunks]
            assert kw or (be.runner.head == "logits" and be.device.pool_epoch == epoch)
        finally:
            be.close()
        for g, r in zip(got, refs):
            assert g.rows.tolist() == r.rows.tolist() and g.offsets.tolist() == r.offsets.tolist()
            assert g.tokens.tolist() == r.tokens.tolist() and g.finish.tolist() == r.finish.tolist()
            np.testing.assert_allclose(g.logprobs, r.logprobs, atol=1e-4 if dtype == "float32" else 0.05)
