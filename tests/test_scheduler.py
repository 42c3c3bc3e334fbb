"""The master's work queue: chunks carry exactly their prompts' tokens, every row goes out once (longest prompts
first), a failed worker's chunk goes out again first, and rows_left counts what is still to hand out."""
import time

import numpy as np

from gpt2job.errors import say
from gpt2job.files.prompts import PromptSet
from gpt2job.cluster.scheduler import Scheduler
from gpt2job.cluster.workers import WorkerState


def prompt_set(n, seed=0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, 30, n)
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum(lens)
    return PromptSet(offsets, rng.integers(0, 50257, int(offsets[-1])).astype(np.int64), "test")


def test_chunks_cover_every_row_once_with_its_tokens_longest_first():
    ps = prompt_set(1000)
    todo = np.arange(0, 1000, 3, dtype=np.int64)                 # e.g. the rows a resumed job still has to do
    sched = Scheduler(ps, todo, chunk_size=70)
    w = WorkerState(rank=1)
    seen, lens_out = [], []
    while True:
        c = sched.next_chunk(w, 2)
        if c is None:
            break
        assert len(c.rows) <= 70 and len(c.offsets) == len(c.rows) + 1 and c.tokens.dtype == np.int32
        for i, r in enumerate(c.rows):
            np.testing.assert_array_equal(c.tokens[c.offsets[i]:c.offsets[i + 1]], ps.prompt(r))
        seen += c.rows.tolist()
        lens_out += ps.lengths[c.rows].tolist()
        assert sched.rows_left() == len(todo) - len(seen)
    assert sorted(seen) == todo.tolist()
    assert lens_out == sorted(lens_out, reverse=True)


def test_a_given_back_chunk_goes_out_first():
    ps = prompt_set(50, seed=1)
    sched = Scheduler(ps, np.arange(50, dtype=np.int64), chunk_size=10)
    w = WorkerState(rank=1)
    first = sched.next_chunk(w, 1)
    sched.give_back(first)
    assert sched.rows_left() == 50
    again = sched.next_chunk(w, 1)
    assert again is first and sched.rows_left() == 40


def test_adaptive_size_gives_equal_chunks_per_worker():
    ps = prompt_set(400, seed=2)
    sched = Scheduler(ps, np.arange(400, dtype=np.int64), prefetch=2)
    w = WorkerState(rank=1, preferred_chunk=64)
    sizes = []
    while (c := sched.next_chunk(w, 4)) is not None:
        sizes.append(len(c.rows))
    assert sizes == [50] * 8          # k = 2 equal chunks for each of the 4 workers, within the preferred 64


def test_prebuilt_chunks_are_the_ones_next_chunk_would_make():
    """prebuild (the master gathers the first chunks while the workers start) changes when chunks are made,
    not which: the same rows in the same chunks, rows_left counting the built ones, a given-back chunk first."""
    ps = prompt_set(400, seed=3)
    w = WorkerState(rank=1, preferred_chunk=64)
    plain = Scheduler(ps, np.arange(400, dtype=np.int64), prefetch=2)
    ahead = Scheduler(ps, np.arange(400, dtype=np.int64), prefetch=2)
    ahead.prebuild(4, 64)
    assert len(ahead.built) == 8 and ahead.rows_left() == 400
    first = ahead.next_chunk(w, 4)
    ahead.give_back(first)
    assert ahead.next_chunk(w, 4) is first
    got = [first]
    while (c := ahead.next_chunk(w, 4)) is not None:
        got.append(c)
        assert ahead.rows_left() == 400 - sum(len(x.rows) for x in got)
    want = []
    while (c := plain.next_chunk(w, 4)) is not None:
        want.append(c)
    assert [c.chunk_id for c in got] == [c.chunk_id for c in want]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_array_equal(a.tokens, b.tokens)


def test_prebuild_stops_when_the_queue_is_empty():
    ps = prompt_set(30, seed=4)
    sched = Scheduler(ps, np.arange(30, dtype=np.int64), chunk_size=20, prefetch=2)
    sched.prebuild(4, 64)
    assert [len(c.rows) for c in sched.built] == [20, 10] and sched.rows_left() == 30


def ragged_set(n, seed=5):
    """Half the prompts of 4-32 tokens, half of 256-448, interleaved (small_chunks.py's ragged workload)."""
    rng = np.random.default_rng(seed)
    lens = np.where(np.arange(n) % 2 == 0, rng.integers(4, 33, n), rng.integers(256, 449, n))
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum(lens)
    return PromptSet(offsets, rng.integers(0, 50257, int(offsets[-1])).astype(np.int64), "test")


def test_ragged_prompts_go_out_in_chunks_of_equal_work():
    """Without --chunk-size, ragged prompts are chunked by estimated work: one chunk per worker (all of a worker's
    first chunks go out at once, so more would only make smaller batches), each within 10% of half the work; the
    long prompts in the smaller chunk. Equal-row chunks (the same queue cut into 4, handed out in turn) give one
    worker 1.2x the other's work. Every row goes out once."""
    from gpt2job.cluster.scheduler import position_cost
    ps = ragged_set(4096)
    c = position_cost("float16", 768)
    cost = lambda rows: float(np.sum(ps.lengths[rows] + 128 + c * 128 * (ps.lengths[rows] + 64)))   # noqa: E731
    sched = Scheduler(ps, np.arange(4096, dtype=np.int64), prefetch=2, max_new_tokens=128, position_cost=c)
    assert sched.by_cost
    w = WorkerState(rank=1, preferred_chunk=8192)
    chunks = []
    while (ch := sched.next_chunk(w, 2)) is not None:
        chunks.append(ch.rows)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(4096))
    total = cost(np.arange(4096))
    shares = [sum(cost(ch) for ch in chunks[i::2]) / total for i in range(2)]
    assert len(chunks) == 2 and all(abs(x - 0.5) < 0.05 for x in shares), shares
    assert len(chunks[0]) < len(chunks[-1])                          # the long prompts in the smaller chunks
    eq = Scheduler(ps, np.arange(4096, dtype=np.int64), prefetch=2, max_new_tokens=128)   # no position cost
    rows = [ch.rows for ch in iter(lambda: eq.next_chunk(w, 2), None)]
    a, b = (sum(cost(ch) for ch in rows[i::2]) for i in range(2))
    assert not eq.by_cost and max(a, b) / min(a, b) > 1.2


def test_equal_rows_where_every_row_is_the_same_work_or_the_chunk_size_is_given():
    from gpt2job.cluster.scheduler import position_cost
    c = position_cost("float16", 768)
    ps = ragged_set(300)
    assert not Scheduler(ps, np.arange(300, dtype=np.int64), chunk_size=50, position_cost=c).by_cost
    same = PromptSet(np.arange(301, dtype=np.int64) * 16, np.zeros(300 * 16, np.int64), "test")
    assert not Scheduler(same, np.arange(300, dtype=np.int64), position_cost=c).by_cost


class RecordingChannel:
    """Two worker ranks that only record the chunks sent to them (the cluster/channel.py interface)."""
    ranks = [1, 2]

    def __init__(self):
        self.sent = {1: [], 2: []}

    def encode_ahead(self, chunks):
        pass

    def send_chunk(self, rank, chunk):
        self.sent[rank].append(chunk)

    def forget(self, rank):
        pass

    def send_stop(self, rank, why="stop"):
        self.sent[rank].append(why)

    def flush(self, seconds=10.0, firsts=False):
        pass

    def take_reports(self):
        return []


class OwnProcesses(RecordingChannel):
    """The two ranks as processes of their own (the end waits for them, aborts them when hung); nothing arrives."""

    def poll(self):
        return []

    def wait(self):
        pass

    def join(self, timeout=None):
        pass

    def owns_process(self, rank):
        return True


def ragged_master(tmp_path):
    """A Master on 512 ragged prompts (equal-work chunks) with a RecordingChannel, prepared, no worker ready yet."""
    import h5py
    from gpt2job.cluster.master import Master
    from gpt2job.settings import JobSettings
    ps = ragged_set(512)
    inp = tmp_path / "ragged.h5"
    with h5py.File(inp, "w") as f:
        ds = f.create_dataset("prompt_tokens", (len(ps),), dtype=h5py.vlen_dtype(np.int32))
        for i in range(len(ps)):
            ds[i] = ps.tokens[ps.offsets[i]:ps.offsets[i + 1]] % 1000
    s = JobSettings(input=str(inp), output=str(tmp_path / "out.h5"), backend="numpy", max_new_tokens=64,
                    model="random:n_layer=2,n_head=2,n_embd=32,vocab_size=1000,n_positions=1024")
    ch = RecordingChannel()
    m = Master(s, None, channel=ch)
    m.prepare()
    m.workers = {r: WorkerState(rank=r) for r in ch.ranks}
    return m, ch, len(ps)


def test_a_worker_ready_late_still_finds_equal_work_chunks_left(tmp_path):
    """Equal-work chunks are about one per worker. When work starts with one of two workers ready (the start-up
    grace passed), that worker must not take them all: it holds one chunk at a time until the other is ready, which
    then gets its own; once both are ready, the early one holds its usual prefetch again."""
    import time
    from gpt2job.settings import PREFETCH
    m, ch, n = ragged_master(tmp_path)
    try:
        assert m.sched.by_cost
        hello = {"host": "a", "preferred_chunk": 64}     # about 8 chunks of equal work
        m.handle(m.workers[1], "hello", hello)
        m.first_ready = time.monotonic() - 60      # the start-up grace is over; rank 2 is still loading
        m.maybe_start()
        assert m.dispatching and len(ch.sent[1]) == 1 and len(m.workers[1].outstanding) == 1
        m.handle(m.workers[2], "hello", hello)
        assert len(m.workers[2].outstanding) == PREFETCH and len(m.workers[1].outstanding) == PREFETCH
        rows = np.concatenate([c.rows for r in ch.sent for c in ch.sent[r]])
        assert len(set(rows.tolist())) == len(rows) and m.sched.rows_left() == n - len(rows) > 0
    finally:
        m.store.close()


def test_a_worker_ready_after_its_start_up_deadline_is_stopped_not_fed(tmp_path):
    """A worker left behind at start-up (retired: its share goes to the others) that says hello later gets a stop,
    never a chunk: a chunk sent to it would be outside every live worker's outstanding work. It is then no longer
    hung: the job's end does not abort it."""
    import time
    m, ch, n = ragged_master(tmp_path)
    try:
        m.handle(m.workers[1], "hello", {"host": "a", "preferred_chunk": 64})
        m.first_ready = time.monotonic() - 60
        m.maybe_start()
        m.ending.run_started, m.ending.startup_timeout = time.monotonic() - 100, 10
        m.check_hung(time.monotonic())
        assert m.workers[2].retired
        assert m.ending.hung == [2]
        m.handle(m.workers[2], "hello", {"host": "b", "preferred_chunk": 64})
        assert ch.sent[2] == ["stop"] and not m.workers[2].outstanding
        assert m.ending.hung == []      # a job that then succeeds does not end in MPI_Abort for it
    finally:
        m.store.close()


def test_a_worker_counted_hung_that_then_reports_an_error_is_let_go_not_aborted(tmp_path):
    """A worker past its deadline (hung: its chunks went to the others) whose error report comes after all is alive
    and waits for its stop: it is told to stop and no longer counted hung (no MPI_Abort at the job's end)."""
    m, ch, n = ragged_master(tmp_path)
    try:
        for r in (1, 2):
            m.handle(m.workers[r], "hello", {"host": "a", "preferred_chunk": 64})
        m.workers[2].outstanding = {99: m.workers[2].outstanding.popitem()[1]} if m.workers[2].outstanding else {}
        m.ending.count_hung(2)
        m.retire(m.workers[2], "stopped answering (deadline passed)")
        m.handle(m.workers[2], "error", {"host": "b", "chunk": 99, "error": "CUDA error", "traceback": ""})
        assert ch.sent[2][-1] == "stop" and m.ending.hung == []
    finally:
        m.store.close()


def test_a_worker_still_computing_after_the_end_is_ended_not_waited_for(tmp_path):
    """A job that ends (here: an error) while a worker rank still computes its chunks receives their results for up
    to chunk_timeout; a rank still computing then counts as hung (MPI_Abort ends it), for MPI_Finalize would wait
    for its result's send for ever."""
    from gpt2job.cluster.ending import Ending

    m, ch, n = ragged_master(tmp_path)
    try:
        m.ending = Ending(OwnProcesses(), 0.2, say)
        for r in (1, 2):
            m.handle(m.workers[r], "hello", {"host": "a", "preferred_chunk": 64})
        m.workers[1].outstanding = {7: object()}
        m.ending.shutdown(m.workers)
        assert m.ending.hung == [1] and m.ending.hung_processes() == [1]
        assert m.ending.channel.sent == {1: ["stop"], 2: ["stop"]}     # each told to stop first
    finally:
        m.store.close()


def test_the_end_receives_the_results_still_on_their_way_without_changing_the_master_s_state(tmp_path):
    """A worker whose result arrives during the end's wait has answered for its chunk: not hung. The end waits on
    its own copy of the chunks out (it popped them from the master's WorkerState)."""
    from types import SimpleNamespace
    from gpt2job.cluster.ending import Ending

    class Answering(OwnProcesses):
        def __init__(self):
            super().__init__()
            self.inbox = [(1, "result", SimpleNamespace(chunk_id=7), 0, 0.0)]

        def poll(self):
            got, self.inbox = self.inbox, []
            return got

    m, ch, n = ragged_master(tmp_path)
    try:
        m.ending = Ending(Answering(), 5.0, say)
        for r in (1, 2):
            m.handle(m.workers[r], "hello", {"host": "a", "preferred_chunk": 64})
        out = object()
        m.workers[1].outstanding = {7: out}
        t = time.monotonic()
        m.ending.shutdown(m.workers)
        assert m.ending.hung == [] and time.monotonic() - t < 4.0      # not the whole chunk_timeout
        assert m.workers[1].outstanding == {7: out}
    finally:
        m.store.close()


def test_a_rank_still_starting_at_the_end_is_waited_for_until_its_start_up_deadline(tmp_path):
    """A job can end before a rank became ready (the others did the work). That rank reads its stop once ready; one
    that hangs at start-up never does, and mpirun would wait for it for ever. So the end waits for its hello until
    the start-up deadline (5 x chunk_timeout from the run's start) and then counts it hung (MPI_Abort ends it); a
    rank that says hello in that wait is let go."""
    from gpt2job.cluster.ending import Ending

    class Starting(OwnProcesses):   # rank 1 says hello at its third poll; rank 2 never says anything
        polls = 0

        def poll(self):
            self.polls += 1
            return [(1, "hello", {"host": "a"})] if self.polls == 3 else []

        def wait(self):
            time.sleep(0.01)

    m, ch, n = ragged_master(tmp_path)
    try:
        end = m.ending = Ending(Starting(), 0.2, say)
        end.run_started = time.monotonic()
        end.shutdown(m.workers, wait_local=False)
        end.wait_for_starting()
        waited = time.monotonic() - end.run_started
        assert end.hung == [2] and end.hung_processes() == [2]
        assert 1.0 <= waited < 5, waited                      # until the deadline, not longer
        assert end.channel.sent == {1: ["stop"], 2: ["stop"]}
        sm = m.workers[2].summary()
        assert sm["ready"] is False and sm["retired"] is None
        end.channel.polls, end.channel.poll = 0, lambda: (_ for _ in ()).throw(KeyboardInterrupt())
        end.heard, end.hung, end.run_started = set(), [], time.monotonic()
        assert isinstance(end.wait_for_starting(), KeyboardInterrupt)      # Ctrl-C in the wait: they are ended now
        assert end.hung == [1, 2]
    finally:
        m.store.close()


def test_a_merging_worker_holds_two_batches_of_small_chunks():
    """Scheduler.window: --chunk-size 100 against a worker that computes 1,000 rows at once: 2 x 10 chunks out with
    it; a worker that does not merge, or chunks as large as its batch: prefetch."""
    ps = prompt_set(1000)
    merging, plain = WorkerState(rank=1, batch_rows=1000), WorkerState(rank=2)
    sched = Scheduler(ps, np.arange(1000, dtype=np.int64), chunk_size=100, prefetch=2)
    assert sched.window(merging) == 20 and sched.window(plain) == 2
    assert Scheduler(ps, np.arange(1000), chunk_size=300, prefetch=2).window(merging) == 6
    assert Scheduler(ps, np.arange(1000), chunk_size=1000, prefetch=2).window(merging) == 2
    assert Scheduler(ps, np.arange(1000), prefetch=2).window(merging) == 2     # the scheduler's own chunk size
