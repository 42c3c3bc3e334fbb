"""Out of device memory in the CUDA backend, on the CPU: the buffer sizes for the memory a worker has
(plan.memory_plan), a chunk in halves (split_chunk, join_completions), and the real Runner and Device recovering
from allocations that fail (tests/test_cuda_faults.py does it on a GPU).

The stand-in for pycuda.driver keeps device memory in NumPy arrays with a byte limit (allocations over it raise
its MemoryError; a freed buffer is never reused, so reading one fails). The stand-in model computes, per row, a
key from its token and position into the KV cache slot, copies shared prefixes (kv_copy), then hashes the slot's
keys 0..pos ('attention'); the token is that hash modulo the vocabulary. So a token is right only when the row's
whole prompt and the tokens before it reached the right cache slot: the pure-Python reference checks that."""
import sys
import types
from bisect import bisect_right

import numpy as np
import pytest

from gpt2job.backends.base import drive
from gpt2job.backends.cuda.plan import (KV_FLOOR, MemoryPlan, join_completions, memory_plan, preferred_chunk,
                                        size_floors, split_chunk)
from gpt2job.chunks import FINISH_STOP, Chunk, Completions
from gpt2job.settings import GenerationSettings

V, C, EOS = 50, 8, 7                  # vocabulary, width (4-byte elements: 32 bytes per row), the stop token
MOD = (1 << 61) - 1


# ---------------------------------------------------------------- memory_plan, split_chunk (pure)

def est(rows, head):       # like Model.activation_bytes of GPT-2 124M fp16
    return rows * 18448 + head * 202752


def pool(rows, head):      # like runner.pool_bytes of a greedy fp16 head
    return rows * 16936 + head * 3652


def test_memory_plan_keeps_the_sizes_asked_for_when_the_gpu_has_room():
    for free in (139 << 30, 80 << 30, 2 * est(131072, 8192)):
        for share in (False, True):
            mp = memory_plan(free, share, 131072, 8192, 1024, est, pool)
            f = 0.4 if share else 0.8   # the formula of the KV budget before sizes followed the memory
            assert mp == MemoryPlan(131072, 8192, max(int(f * (free - est(131072, 8192))), 64 << 20), False)
    # tests' small sizes stay as asked
    mp = memory_plan(1 << 30, False, 20, 3, 64, est, pool)
    assert (mp.prefill_rows, mp.head_rows, mp.reduced) == (20, 3, False)


@pytest.mark.parametrize("free_mib", [4000, 2500, 1700, 900, 300, 40])
def test_memory_plan_shrinks_the_buffers_to_the_memory_left(free_mib):
    free = free_mib << 20
    mp = memory_plan(free, False, 131072, 8192, 1024, est, pool)
    assert mp.reduced and mp.prefill_rows < 131072 and mp.head_rows < 8192
    rmin, hmin = size_floors(131072, 8192, 1024)
    assert mp.prefill_rows >= rmin and mp.head_rows >= hmin
    at_floor = (mp.prefill_rows, mp.head_rows) == (rmin, hmin)
    assert at_floor or 4 * pool(mp.prefill_rows, mp.head_rows) <= free
    assert mp.kv_budget == max(int(0.8 * (free - pool(mp.prefill_rows, mp.head_rows))), KV_FLOOR)
    if free_mib == 2500:   # the case: 124M fp16 with 2.5 GB left (about 1.7 GB after the weights)
        assert mp.prefill_rows >= 16384 and mp.kv_budget > 1 << 30
    print(free_mib, mp)


def test_preferred_chunk_scales_with_the_head_rows():
    assert preferred_chunk(8192, 8192, 8192) == 8192
    assert preferred_chunk(8192, 8192, 1024) == 1024
    assert preferred_chunk(8192, 8192, 64) == 64
    assert preferred_chunk(100, 8192, 64) == 64


def random_chunk(rng, B, maxlen=12, chunk_id=5, stems=True):
    stem = rng.integers(0, V, 8)
    prompts = []
    for i in range(B):
        tail = rng.integers(0, V, int(rng.integers(1, maxlen)))
        prompts.append(np.concatenate([stem[:int(rng.integers(0, 8))], tail]) if stems and i % 3 else tail)
    if B > 3:
        prompts[3] = prompts[1].copy()    # a repeat
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in prompts])]).astype(np.int64)
    return Chunk(chunk_id, np.arange(B, dtype=np.int64) * 3 + 11, offsets, np.concatenate(prompts).astype(np.int32))


def test_split_and_join_give_back_the_chunk():
    rng = np.random.default_rng(0)
    for B in (2, 3, 17):
        c = random_chunk(rng, B)
        a, b = split_chunk(c)
        assert len(a.rows) == B // 2 and len(b.rows) == B - B // 2 and a.chunk_id == b.chunk_id == c.chunk_id
        assert [p.tolist() for p in a.prompts() + b.prompts()] == [p.tolist() for p in c.prompts()]
        comp = [Completions.from_lists(c.chunk_id, p.rows, [np.full(int(r) % 4, r) for r in p.rows],
                                       np.asarray(p.rows) % 2) for p in (a, b)]
        j = join_completions(c, comp)
        whole = Completions.from_lists(c.chunk_id, c.rows, [np.full(int(r) % 4, r) for r in c.rows], c.rows % 2)
        for f in ("rows", "offsets", "tokens", "finish"):
            np.testing.assert_array_equal(getattr(j, f), getattr(whole, f))


# ---------------------------------------------------------------- a stand-in pycuda.driver with limited memory

class Alloc(int):
    def free(self):
        FakeDrv.heap.free(int(self))


class Heap:
    def __init__(self, limit):
        self.limit, self.live, self.next = limit, {}, 1 << 20
        self.fail = None          # fail(nbytes) -> True: this allocation fails (besides the limit)
        self.failed = 0
        self.naming = None        # the pool buffer being allocated (name_allocations)

    def used(self):
        return sum(a.nbytes for a in self.live.values())

    def alloc(self, n):
        if self.used() + n > self.limit or (self.fail is not None and self.fail(n)):
            self.failed += 1
            raise FakeDrv.MemoryError("cuMemAlloc failed: out of memory")
        addr = self.next
        self.next += (n + 255) // 256 * 256 + 256      # never reused: a freed buffer cannot be read by mistake
        self.live[addr] = np.zeros(n, np.uint8)
        return Alloc(addr)

    def free(self, addr):
        assert addr in self.live, "freed twice"
        del self.live[addr]

    def view(self, addr, nbytes):
        bases = sorted(self.live)
        i = bisect_right(bases, addr) - 1
        assert i >= 0, f"address {addr:#x} in no live buffer"
        a = self.live[bases[i]]
        off = addr - bases[i]
        assert off + nbytes <= a.nbytes, f"{nbytes} bytes at {addr:#x} past a live buffer (freed, or too small)"
        return a[off:off + nbytes]

    def i32(self, addr, n):
        return self.view(addr, 4 * n).view(np.int32)


class FakeDrv:
    heap = None
    lost = False      # a sticky CUDA error: every wait raises

    class Error(Exception):
        pass

    class MemoryError(Error):
        pass

    class LogicError(Error):
        pass

    @staticmethod
    def init():
        pass

    class Device:
        @staticmethod
        def count():
            return 1

        def __init__(self, i):
            pass

        def make_context(self):
            return types.SimpleNamespace(pop=lambda: None, detach=lambda: None)

        def name(self):
            return "stand-in GPU"

        def compute_capability(self):
            return (9, 0)

    @staticmethod
    def _wait():
        if FakeDrv.lost:
            raise FakeDrv.LogicError("cuStreamSynchronize failed: an illegal memory access was encountered")

    class Stream:
        def synchronize(self):
            FakeDrv._wait()

        def wait_for_event(self, ev):
            pass

    class Event:
        def record(self, stream=None):
            pass

        def synchronize(self):
            FakeDrv._wait()

        def query(self):
            FakeDrv._wait()
            return True

        def time_since(self, other):
            return 0.0

    @staticmethod
    def mem_get_info():
        return FakeDrv.heap.limit - FakeDrv.heap.used(), FakeDrv.heap.limit

    @staticmethod
    def mem_alloc(n):
        return FakeDrv.heap.alloc(int(n))

    @staticmethod
    def pagelocked_empty(n, dtype):
        return np.zeros(n, dtype)

    @staticmethod
    def memcpy_htod_async(dst, src, stream=None):
        src = np.ascontiguousarray(src).view(np.uint8).reshape(-1)
        FakeDrv.heap.view(int(dst), src.nbytes)[:] = src

    memcpy_htod = memcpy_htod_async

    @staticmethod
    def memcpy_dtoh_async(dst, src, stream=None):
        d = dst.view(np.uint8).reshape(-1)
        d[:] = FakeDrv.heap.view(int(src), d.nbytes)


def key(tok, pos):
    return (int(tok) * 1000003 + int(pos) * 7919 + 12345) % MOD


def mix(keys):
    h = 17
    for k in keys:
        h = (h * 1000003 + int(k)) % MOD
    return h


def reference(chunk, gs):
    """Pure Python: each prompt's tokens as the stand-in model generates them."""
    out, finish = [], []
    for p in chunk.prompts():
        seq, gen, why = [int(t) for t in p], [], 0
        for _ in range(gs.max_new_tokens):
            t = mix(key(seq[j], j) for j in range(len(seq))) % V
            gen.append(t)
            seq.append(t)
            if t == gs.eos_token_id and not gs.ignore_eos:
                why = FINISH_STOP
                break
        out.append(gen)
        finish.append(why)
    return Completions.from_lists(chunk.chunk_id, chunk.rows, out, finish)


class FakeModel:
    """Model's interface (sizes, forward, select) over the stand-in memory; one layer, fp32 elements."""
    elt, prefill_attn, half = 4, False, False

    def __init__(self, dev, head_rows, n_positions=64):
        self.dev = dev
        self.cfg = types.SimpleNamespace(n_embd=C, n_layer=1, n_positions=n_positions, vocab_size=V, d_mlp=4 * C)
        self.V = self.Vpad = V
        self.head_rows = head_rows
        self.p = types.SimpleNamespace(head_rows=head_rows)

    def set_head_rows(self, h):
        self.head_rows = self.p.head_rows = int(h)

    def kv_bytes_per_position(self):
        return 2 * self.cfg.n_layer * C * self.elt

    def activation_bytes(self, rows, head_rows=None):
        return sum(n for _, n in self.activation_buffers(rows, head_rows) + self.head_buffers("argmax", head_rows))

    def activation_buffers(self, rows, head_rows=None):
        hr = self.head_rows if head_rows is None else head_rows
        return [("x", rows * C * 4), ("fc", rows * 4 * C * 4), ("hl", hr * C * 4)]

    def head_buffers(self, head, head_rows=None, lse=False):
        return [("logits", (self.head_rows if head_rows is None else head_rows) * V * 4)]

    def forward(self, R, p_tok, p_pos, p_seq, slot_base, S, kv, tiles=None, copies=None, heads=None):
        heap, buf = FakeDrv.heap, self.dev.buf
        x = buf("x", R * C * 4)
        buf("fc", R * 4 * C * 4)
        tok, pos = heap.i32(p_tok, R), heap.i32(p_pos, R)
        slot = heap.i32(p_seq, R) - slot_base
        ent = heap.i32(copies[0], 3 * copies[1]).reshape(-1, 3) if copies is not None and copies[1] else None
        top = int(slot.max()) + 1 if R else 0
        if ent is not None:
            top = max(top, int(ent[:, :2].max()) - slot_base + 1)
        cache = heap.view(kv[0][0], top * S * C * 4).view(np.int64).reshape(top, S, C // 2)
        for i in range(R):                             # the QKV product: this row's key into its slot
            cache[slot[i], pos[i], 0] = key(tok[i], pos[i])
        if ent is not None:                            # kv_copy: shared prefixes from the prompt that computed them
            for d, s, p in ent:
                cache[d - slot_base, p, 0] = cache[s - slot_base, p, 0]
        xs = heap.view(x, R * C * 4).view(np.int64).reshape(R, C // 2)
        for i in range(R):                             # "attention": the slot's keys up to this row's position
            xs[i, 0] = mix(cache[slot[i], :pos[i] + 1, 0])
        return (x, None, 0) if heads is None else (x, *heads[:2])   # (every row computed: the head rows in place)

    def select(self, x, n, p_rowidx, idx_base, p_seqidx, p_rows, step, p_out, sampling, step_at=0):
        heap = FakeDrv.heap
        self.dev.buf("hl", self.head_rows * C * 4)
        self.dev.buf("logits", self.head_rows * V * 4)
        rows = heap.i32(p_rowidx, n) - idx_base if p_rowidx else np.arange(n)
        xs = heap.view(x, (int(rows.max()) + 1) * C * 4).view(np.int64).reshape(-1, C // 2) if n else None
        if n:
            heap.i32(p_out, n)[:] = (xs[rows, 0] % V).astype(np.int32)


class FakeKernels:
    def gather_tokens(self, stream, src, idx, dst, n):
        heap = FakeDrv.heap
        if n:
            ix = heap.i32(idx, n).copy()
            heap.i32(dst, n)[:] = heap.i32(src, int(ix.max()) + 1)[ix]


@pytest.fixture
def fake(monkeypatch):
    mod = types.ModuleType("pycuda")
    mod.driver = FakeDrv
    monkeypatch.setitem(sys.modules, "pycuda", mod)
    monkeypatch.setitem(sys.modules, "pycuda.driver", FakeDrv)
    monkeypatch.setattr(FakeDrv, "heap", Heap(1 << 30))
    monkeypatch.setattr(FakeDrv, "lost", False)
    import gpt2job.backends.cuda.runner as runner_module
    monkeypatch.setattr(runner_module, "KV_FLOOR", 1 << 12)   # stand-in caches are kilobytes, not 64 MiB
    return FakeDrv


def make_runner(share, kv_budget=1 << 20, rows=4096, head_rows=64, share_gpus=False):
    from gpt2job.backends.cuda.device import Device
    from gpt2job.backends.cuda.runner import Runner
    dev = Device(0)
    dev.open_streams()
    model = FakeModel(dev, head_rows)
    runner = Runner(dev, model, FakeKernels(), kv_budget, rows, share, FakeDrv.Event(), share_gpus=share_gpus)
    runner.fit()
    dev.reserve_uploads(2, 20 * rows)
    return dev, runner


def compute_all(runner, chunks, gs):
    """Like the worker: one chunk submitted while idle, the next at the first pause."""
    out, waiting = [], list(chunks)
    runner.submit(waiting.pop(0), gs)

    def on_pause(pause):
        if pause.submit and waiting and len(runner.pending) < 1:
            runner.submit(waiting.pop(0), gs)
        pause.ready()

    while runner.pending:
        out.append(drive(runner.run(), on_pause))
        if waiting and not runner.pending:
            runner.submit(waiting.pop(0), gs)
    return out


def assert_same(a, b):
    for f in ("rows", "offsets", "tokens", "finish"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f), err_msg=f)


GS = GenerationSettings(max_new_tokens=5, ignore_eos=False, eos_token_id=EOS)


@pytest.mark.parametrize("share", [False, True])
def test_stand_in_runner_matches_the_reference_with_room(fake, share):
    rng = np.random.default_rng(1)
    chunks = [random_chunk(rng, 23, chunk_id=i) for i in range(3)]
    dev, runner = make_runner(share)
    got = compute_all(runner, chunks, GS)
    assert runner.oom_events == 0 and fake.heap.failed == 0
    assert runner.early_starts == len(chunks) - 1   # each next chunk started at the end of the one before
    for g, c in zip(got, chunks):
        assert_same(g, reference(c, GS))
    assert any((reference(c, GS).finish == FINISH_STOP).any() for c in chunks)


def test_the_next_chunk_s_prefill_is_queued_before_the_chunk_ends_and_its_error_stays_its_own(fake):
    """Runner._start_next: once a chunk has queued its last decode step, the next submitted chunk's prefill is
    launched behind it, before the chunk's result is returned; an error of that early start is raised by the next
    chunk's own run(), not by the chunk finishing."""
    rng = np.random.default_rng(7)
    chunks = [random_chunk(rng, 23, chunk_id=i) for i in range(3)]
    dev, runner = make_runner(False)
    log, forward = [], runner.model.forward

    def logged(R, *a, tiles=None, **kw):
        if tiles is not None:                      # a prefill pass (decode steps pass no tiles)
            log.append("prefill")
            if log.count("prefill") == 3:
                raise ValueError("the third chunk's prefill fails")
        return forward(R, *a, tiles=tiles, **kw)
    runner.model.forward = logged
    runner.submit(chunks[0], GS)
    got = []
    for i in range(3):
        def on_pause(pause, i=i):
            if pause.submit and i + 1 < 3 and not runner.pending:
                runner.submit(chunks[i + 1], GS)
        if i < 2:
            got.append(drive(runner.run(), on_pause))
            log.append(f"chunk {i} returned")
        else:
            with pytest.raises(ValueError, match="third chunk"):
                drive(runner.run(), on_pause)
    assert log == ["prefill", "prefill", "chunk 0 returned", "prefill", "chunk 1 returned"]
    for g, c in zip(got, chunks):
        assert_same(g, reference(c, GS))


@pytest.mark.parametrize("share", [False, True])
def test_an_allocation_failing_mid_chunk_computes_it_in_halves(fake, share, capsys):
    """The KV cache is not reserved ahead (ranks sharing the GPU) and a group's cache does not fit: the runner frees,
    shrinks and computes the chunk in halves, recursively; the tokens are the reference's, later chunks run in the
    smaller sizes, and the pool holds no freed buffer."""
    rng = np.random.default_rng(2)
    chunks = [random_chunk(rng, 40, chunk_id=i) for i in range(3)]
    dev, runner = make_runner(share, kv_budget=1 << 20, share_gpus=True)
    big = 6 * (12 + 8 + GS.max_new_tokens) * runner.model.kv_bytes_per_position()   # caches of > 6 prompts fail
    dev.buf = name_allocations(dev)
    fake.heap.fail = lambda n: fake.heap.naming == "kv" and n > big
    got = compute_all(runner, chunks, GS)
    assert runner.oom_events >= 3 and runner.kv_budget < 1 << 20
    for g, c in zip(got, chunks):
        assert_same(g, reference(c, GS))
    assert "out of GPU memory in chunk 0 (40 prompts" in capsys.readouterr().err
    for name, (a, n) in dev._bufs.items():
        assert int(a) in fake.heap.live, name


def test_the_next_chunk_running_out_of_memory_as_it_starts_early_is_computed_in_halves(fake, capsys):
    """The next chunk's KV cache does not fit when its prefill is started behind the chunk before (_start_next): the
    early start frees, shrinks and computes it in halves, the chunk before finishes with its own tokens, and no
    chunk starts early inside the halves."""
    rng = np.random.default_rng(8)
    small, large = random_chunk(rng, 4, chunk_id=0), random_chunk(rng, 40, chunk_id=1)
    dev, runner = make_runner(False, kv_budget=1 << 20, share_gpus=True)
    big = 6 * (12 + 8 + GS.max_new_tokens) * runner.model.kv_bytes_per_position()   # caches of > 6 prompts fail
    dev.buf = name_allocations(dev)
    fake.heap.fail = lambda n: fake.heap.naming == "kv" and n > big
    got = compute_all(runner, [small, large], GS)
    assert runner.early_starts == 1 and runner.oom_events >= 3 and runner.halving == 0
    assert_same(got[0], reference(small, GS))
    assert_same(got[1], reference(large, GS))
    assert "out of GPU memory in chunk 1 (40 prompts" in capsys.readouterr().err


def name_allocations(dev):
    """dev.buf, telling the heap which pool buffer is being allocated (heap.naming)."""
    buf = dev.buf

    def named(name, nbytes):
        FakeDrv.heap.naming = name
        try:
            return buf(name, nbytes)
        finally:
            FakeDrv.heap.naming = None
    return named


def test_an_upload_that_does_not_fit_at_submit_is_computed_in_halves(fake):
    rng = np.random.default_rng(3)
    small, large = random_chunk(rng, 4, chunk_id=0), random_chunk(rng, 60, maxlen=20, chunk_id=1)
    dev, runner = make_runner(True, rows=128)    # uploads of 2,560 bytes: the large chunk's needs a larger one
    fails = [1]
    fake.heap.fail = lambda n: n >= 1 << 16 and bool(fails) and bool(fails.pop())   # (take_upload asks >= 80 kB)
    got = compute_all(runner, [small, large], GS)
    assert fake.heap.failed >= 1 and runner.oom_events >= 1
    assert_same(got[0], reference(small, GS))
    assert_same(got[1], reference(large, GS))
    assert dev._bufs["kv"][1] == runner.kv_budget   # the pool reserved again at the halved sizes, as at the start


def test_a_single_prompt_that_does_not_fit_is_the_chunk_s_error(fake):
    rng = np.random.default_rng(4)
    chunk = random_chunk(rng, 9, chunk_id=0)
    dev, runner = make_runner(False, share_gpus=True)
    fake.heap.fail = lambda n: n >= 2 * runner.model.kv_bytes_per_position()   # no KV cache fits at all
    runner.submit(chunk, GS)
    with pytest.raises(FakeDrv.MemoryError, match="out of memory"):
        for _ in runner.run():
            pass
    assert runner.oom_events == 4               # 9 prompts, then 4, 2 and the first single prompt: its error
    fake.heap.fail = None                        # memory back: the same chunk runs
    assert_same(compute_all(runner, [chunk], GS)[0], reference(chunk, GS))


def test_fit_shrinks_until_the_reserve_fits_and_fails_at_the_floors(fake):
    from gpt2job.backends.cuda.device import Device
    from gpt2job.backends.cuda.runner import Runner
    dev = Device(0)
    dev.open_streams()
    model = FakeModel(dev, 512)
    runner = Runner(dev, model, FakeKernels(), 8 << 20, 8192, True, FakeDrv.Event())
    fake.heap.limit = fake.heap.used() + (5 << 20)
    runner.fit()
    assert runner.kv_budget <= 4 << 20 and fake.heap.used() <= fake.heap.limit
    dev.release()
    assert dev._bufs == {}
    fake.heap.limit = fake.heap.used() + 1000   # not even the floors
    with pytest.raises(FakeDrv.MemoryError):
        runner.fit()
    assert (runner.max_prefill_rows, model.head_rows) == size_floors(8192, 512, 64)


@pytest.mark.parametrize("penalty,k", [(True, None), (False, 3), (True, 3)])
def test_the_reserve_counts_and_takes_the_buffers_of_a_penalty_and_of_logprobs(fake, penalty, k):
    """A job-wide penalty's seen bitmap, --logprobs' step buffer and (both) the raw logits' copy are in the pool
    before the first chunk, and in the bytes memory_plan sizes the KV cache with."""
    from gpt2job.backends.cuda.device import Device
    from gpt2job.backends.cuda.rows import option_buffers
    from gpt2job.backends.cuda.runner import Runner, pool_bytes
    from gpt2job.model.sampling import seen_words
    dev = Device(0)
    dev.open_streams()
    model = FakeModel(dev, 64)
    runner = Runner(dev, model, FakeKernels(), 1 << 20, 4096, False, FakeDrv.Event(), penalty=penalty, logprobs_k=k)
    want = dict(option_buffers(256, 64, model, penalty, k))   # (KV groups of 4 head groups, within 4,096 rows)
    names = {"seen"} if penalty else set()
    if k is not None:
        names |= {"logprobs", "logits_raw"} if penalty else {"logprobs"}
    assert set(want) == names
    assert want.get("seen", 0) == 256 * seen_words(V) * 4 * penalty
    base = pool_bytes(model, "argmax", (False, None), 4096, 64)
    assert pool_bytes(model, "argmax", (penalty, k), 4096, 64) - base == sum(max(n, 16) for n in want.values())
    runner.reserve()
    assert all(dev._bufs[name][1] >= n for name, n in want.items())


def head_stub(head_rows):
    from gpt2job.backends.cuda.model import Model
    p = types.SimpleNamespace(workspaces=lambda hr: [], argmax_tile=lambda m, v, c: "tma192p")
    stub = types.SimpleNamespace(head_rows=head_rows, V=50257, Vpad=50304, cfg=types.SimpleNamespace(n_embd=768), p=p)
    stub.tempered_tile = lambda m: Model.tempered_tile(stub, m)
    stub.tempered_buffers = lambda hr: Model.tempered_buffers(stub, hr)
    return stub


@pytest.mark.parametrize("head,lse", [("argmax", False), ("argmax", True), ("logits", False)])
def test_the_head_reserves_argmax_partials_with_their_sums_for_greedy_logprobs(head, lse):
    """Greedy fp16 with --logprobs alone keeps the fused head: its partials are float4 (max, column, sum of exp)
    instead of float2, and no logits are reserved; a head that is not greedy reserves the logits."""
    from gpt2job.backends.cuda.kernels import F16_TILES
    from gpt2job.backends.cuda.model import Model
    got = dict(Model.head_buffers(head_stub(64), head, 64, lse=lse))
    nch = -(-50257 // F16_TILES["tma192p"].wn)
    assert got == ({"argmax_part": 64 * nch * (16 if lse else 8)} if head == "argmax" else {"logits": 64 * 50304 * 4})


@pytest.mark.parametrize("rows", [511, 512, 8192])
def test_sampling_at_a_temperature_alone_reserves_rule_6s_head_buffers_from_512_rows(rows):
    """Model.select draws rule 6 in the head's epilogue in groups of 512 rows or more: its partials (one per 64
    columns) and keys are reserved before the first chunk (they took ~51 MB inside the first 8,192-row group), beside
    the logits that smaller groups use; fewer head rows never take the fused path, so nothing more is reserved."""
    from gpt2job.backends.cuda.model import Model
    got = dict(Model.head_buffers(head_stub(rows), "tempered", rows))
    want = {"logits": rows * 50304 * 4}
    if rows >= 512:
        want.update(argmax_part=rows * -(-50257 // 64) * 8, tempered=rows * 8)
    assert got == want


@pytest.mark.parametrize("kw,head", [
    (dict(), "argmax"), (dict(logprobs=True), "argmax"), (dict(logprobs=True, top_logprobs=3), "logits"),
    (dict(repetition_penalty=1.2), "logits"), (dict(temperature=0.8), "tempered"),
    (dict(temperature=0.8, top_k=50257), "tempered"), (dict(temperature=0.8, top_k=40), "logits"),
    (dict(temperature=0.8, top_p=0.9), "logits"), (dict(temperature=0.8, logprobs=True), "logits"),
    (dict(temperature=0.8, repetition_penalty=1.2), "logits")])
def test_the_job_settings_pick_the_head_whose_buffers_are_reserved(kw, head):
    from gpt2job.backends.cuda.backend import head_kind
    from gpt2job.settings import JobSettings
    assert head_kind(JobSettings("in.h5", "out.h5", **kw).generation(50256), 50257) == head


@pytest.mark.parametrize("k,lse", [(None, False), (0, True), (3, False)])
def test_the_runner_asks_the_head_for_the_sums_only_with_logprobs_alone(fake, k, lse):
    from gpt2job.backends.cuda.device import Device
    from gpt2job.backends.cuda.runner import Runner, pool_bytes
    dev = Device(0)
    dev.open_streams()
    model = FakeModel(dev, 64)
    asked = []
    model.head_buffers = lambda head, head_rows=None, lse=False: asked.append(lse) or []
    runner = Runner(dev, model, FakeKernels(), 1 << 20, 4096, False, FakeDrv.Event(), logprobs_k=k)
    pool_bytes(model, "argmax", runner.options, 4096, 64)
    runner.reserve()
    assert asked == [lse, lse]
    # --logprobs' pinned room for two steps of a KV group's rows, taken with the rest (none without it)
    assert (dev.lp_host is None) == (k is None) and (k is None or dev.lp_host.size >= 2 * 256 * (1 + 2 * k))


def test_close_after_a_lost_context_only_drops_it(fake):
    dev, runner = make_runner(False)
    live = len(fake.heap.live)
    fake.lost = True
    dev.close()                                   # no raise; the buffers go with the context, not one by one
    assert dev.ctx is None and len(fake.heap.live) == live
    fake.lost = False
    dev2, _ = make_runner(False)
    n = len(fake.heap.live)
    dev2.close()
    assert len(fake.heap.live) < n


def test_a_buffer_that_fails_to_grow_leaves_no_freed_buffer_in_the_pool(fake):
    dev, runner = make_runner(False)
    fake.heap.fail = lambda n: n > 10 ** 7
    with pytest.raises(FakeDrv.MemoryError):
        dev.buf("x", 10 ** 8)
    assert "x" not in dev._bufs
    fake.heap.fail = None
    assert int(dev.buf("x", 100)) in fake.heap.live
    from gpt2job.backends.cuda.device import Upload
    u = Upload()
    u.reserve(FakeDrv, 1000)
    fake.heap.fail = lambda n: n > 5000
    with pytest.raises(FakeDrv.MemoryError):
        u.reserve(FakeDrv, 10000)
    assert u.nbytes == 0 and u.dev is None
    u.reserve(FakeDrv, 100)
    assert u.nbytes == 100


# ---------------------------------------------------------------- the test fault plan's cuda mode

def test_fault_mode_cuda_launches_an_illegal_read_after_the_chunk_s_first_pause(fake):
    from gpt2job.cluster import faults
    from gpt2job.errors import UserError
    assert faults.parse_plan("1:2:cuda") == {1: {2: "cuda"}}
    with pytest.raises(UserError):
        faults.parse_plan("1:2:gpu")
    launched = []

    class Be:
        name = "cuda"
        kernels = types.SimpleNamespace(gather_tokens=lambda *a: launched.append(a))
        device = types.SimpleNamespace(compute="stream")

        def run(self):
            launched.append("first work")
            yield "pause"
            launched.append("rest")
            return "done"

    be = faults.inject(Be(), {1: {1: "cuda"}}, 1)
    steps = be.run()
    assert next(steps) == "pause" and launched == ["first work", ("stream", 16, 16, 16, 1)]
    with pytest.raises(StopIteration):
        next(steps)
    nb = faults.inject(types.SimpleNamespace(name="numpy", run=lambda: iter(())), {2: {1: "cuda"}}, 2)
    with pytest.raises(faults.InjectedFault, match="needs the cuda backend"):
        next(nb.run())
