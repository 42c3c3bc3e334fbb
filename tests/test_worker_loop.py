"""The worker's compute loop (gpt2job.cluster.worker.Loop) with a fake backend that logs what it is asked to do
and a fake link to the master."""
from collections import deque

import numpy as np

from gpt2job.backends.base import Backend, Pause
from gpt2job.chunks import Chunk, Completions
from gpt2job.cluster.channel import STOP
from gpt2job.cluster.worker import Loop
from gpt2job.settings import PREFETCH


class LoggingBackend(Backend):
    """submit() queues; run() 'computes' the oldest and pauses once with submit=True, as the CUDA backend does
    while its GPU computes (pauses=False: a backend with no device, like NumPy)."""

    def __init__(self, pauses=True):
        self.log, self.pending, self.pauses = [], [], pauses

    def submit(self, chunk):
        self.log.append(("submit", chunk.chunk_id))
        self.pending.append(chunk)

    def run(self):
        chunk = self.pending.pop(0)
        self.log.append(("compute", chunk.chunk_id))
        if self.pauses:
            yield Pause(submit=True, ready=lambda: True)
        n = len(chunk.rows)
        return Completions(chunk.chunk_id, chunk.rows, np.zeros(n + 1, np.int64), np.zeros(0, np.int32),
                           np.zeros(n, np.uint8))


class FakeLink:
    def __init__(self, inbox):
        self.inbox, self.sent = inbox, []

    def receive(self, block):
        return self.inbox.pop(0) if self.inbox else None

    def send_result(self, comp, us):
        self.sent.append(comp.chunk_id)

    def in_flight(self):
        return False


def chunk(i):
    return Chunk(i, np.array([i], np.int64), np.array([0, 1], np.int64), np.array([5], np.int32))


def test_an_idle_worker_computes_its_first_chunk_at_once_and_submits_the_next_during_it():
    """Chunks 0..2 all waiting when the loop starts: only chunk 0 is submitted before its compute (a second
    submit would hold the idle GPU back); chunk 1 is submitted at a pause while chunk 0 computes."""
    link = FakeLink([chunk(0), chunk(1), chunk(2), STOP])
    be = LoggingBackend()
    assert Loop(be, link, 1).serve() is None
    assert be.log[:2] == [("submit", 0), ("compute", 0)]
    assert be.log.index(("submit", 1)) < be.log.index(("compute", 1))
    assert be.log.index(("submit", 1)) > be.log.index(("compute", 0))      # during chunk 0, at its pause
    assert link.sent == [0, 1, 2]
    assert PREFETCH >= 2


def test_chunks_received_before_stop_are_all_computed_by_a_backend_that_never_pauses():
    """A backend that never pauses (NumPy; CUDA with nothing to generate) gets its chunks one at a time,
    and a STOP that arrived with them does not drop the ones still queued."""
    link = FakeLink([chunk(0), chunk(1), chunk(2), STOP])
    be = LoggingBackend(pauses=False)
    assert Loop(be, link, 1).serve() is None
    assert link.sent == [0, 1, 2]
    assert be.log == [("submit", 0), ("compute", 0), ("submit", 1), ("compute", 1), ("submit", 2), ("compute", 2)]


def test_the_main_loop_does_not_submit_another_chunk_before_computing_the_submitted_one():
    """Chunk 1 was submitted during chunk 0 (at its pause) and chunk 2 waits: chunk 1 computes before chunk 2
    is submitted (at chunk 1's pause)."""
    link = FakeLink([chunk(0), chunk(1), chunk(2), STOP])
    be = LoggingBackend()
    Loop(be, link, 1).serve()
    assert be.log.index(("compute", 1)) < be.log.index(("submit", 2))


def test_an_exception_is_reported_with_the_chunk_it_happened_in():
    class Failing(LoggingBackend):
        def run(self):
            self.pending.pop(0)
            raise RuntimeError("boom")
            yield

    err = Loop(Failing(), FakeLink([chunk(7), STOP]), 3).serve()
    assert err["chunk"] == 7 and err["rank"] == 3 and "RuntimeError: boom" in err["error"]


class Clock:
    """The worker's clock, moved on by the backend: 1 ms a decode step."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def perf_counter(self):
        return self.now

    time = perf_counter

    def sleep(self, s):
        self.now += s


class DecodingBackend(LoggingBackend):
    """Each chunk decodes `steps` steps of 1 ms, one pause a step, with `generated` the tokens so far."""

    def __init__(self, clock, steps=2000, rows=4):
        super().__init__()
        self.clock, self.steps, self.rows = clock, steps, rows

    def run(self):
        chunk = self.pending.pop(0)
        self.log.append(("compute", chunk.chunk_id))
        for step in range(1, self.steps + 1):
            self.clock.now += 0.001
            yield Pause(submit=step == 1, ready=lambda: True, generated=self.rows * step)
        n = len(chunk.rows)
        return Completions(chunk.chunk_id, chunk.rows, np.zeros(n + 1, np.int64), np.zeros(0, np.int32),
                           np.zeros(n, np.uint8))


class ReportingLink(FakeLink):
    def __init__(self, inbox, clock):
        super().__init__(inbox)
        self.clock, self.events = clock, []

    def send_result(self, comp, us):
        super().send_result(comp, us)
        self.events.append(("result", comp.chunk_id))

    def send_progress(self, chunk_id, tokens):
        self.events.append(("progress", chunk_id, tokens, self.clock.now))


def test_progress_is_reported_within_a_chunk_at_most_every_half_second(monkeypatch):
    """Two chunks of 2 s each (2,000 decode steps of 1 ms, a pause each): the worker reports the chunk computing and
    its tokens so far about every REPORT_EVERY seconds, not at every pause, each report before that chunk's
    result."""
    from gpt2job.cluster import worker
    clock = Clock()
    monkeypatch.setattr(worker, "time", clock)
    link = ReportingLink([chunk(0), chunk(1), STOP], clock)
    be = DecodingBackend(clock)
    assert Loop(be, link, 1).serve() is None
    assert link.sent == [0, 1]
    reports = [e for e in link.events if e[0] == "progress"]
    assert 6 <= len(reports) <= 8, reports                 # 4 s at one report per 0.5 s, not 4,000
    times = [e[3] for e in reports]
    assert min(b - a for a, b in zip(times, times[1:])) >= worker.REPORT_EVERY - 1e-9
    kinds = [e[:2] for e in link.events]
    for cid in (0, 1):
        mine = [i for i, e in enumerate(link.events) if e[:2] == ("progress", cid)]
        assert len(mine) >= 3 and max(mine) < kinds.index(("result", cid))              # within the chunk
        assert kinds.index(("result", cid - 1)) < min(mine) if cid else True              # not before it began
        counts = [link.events[i][2] for i in mine]
        assert counts == sorted(counts) and all(0 < c <= 8000 for c in counts)


def test_no_report_without_a_token_count_and_never_a_repeated_one(monkeypatch):
    """A backend that does not know its count (generated -1) sends nothing; an unchanged count is not sent again."""
    from gpt2job.cluster import worker
    clock = Clock()
    monkeypatch.setattr(worker, "time", clock)

    class Stuck(DecodingBackend):
        def run(self):
            chunk = self.pending.pop(0)
            for step in range(3000):
                self.clock.now += 0.001
                yield Pause(submit=False, ready=lambda: True, generated=-1 if step < 1500 else 7)
            n = len(chunk.rows)
            return Completions(chunk.chunk_id, chunk.rows, np.zeros(n + 1, np.int64), np.zeros(0, np.int32),
                               np.zeros(n, np.uint8))

    link = ReportingLink([chunk(3), STOP], clock)
    Loop(Stuck(clock), link, 1).serve()
    assert [e[:3] for e in link.events if e[0] == "progress"] == [("progress", 3, 7)]


def test_a_gpu_worker_reports_its_chunks_gpu_time_as_their_compute_time(monkeypatch, capsys):
    """worker.device_us: with a device timeline (the CUDA backend's), a chunk's compute time sent to the master is
    its GPU time (first launch to last GPU work; the parts of a chunk computed in halves added); without one, the
    host's time computing it. Traced, each part's timeline is a line of its own (benchmarks/job_ends.py)."""
    from gpt2job.cluster import trace, worker
    from gpt2job.cluster.worker import device_us

    class TimedBackend(LoggingBackend):
        def __init__(self):
            super().__init__()
            self.timeline = []

        def run(self):
            cid = self.pending[0].chunk_id
            comp = yield from super().run()
            t = 10.0 * cid
            self.timeline.append({"chunk_id": cid, "compute": (t, t + 3.0), "first_launch": t + 0.5})
            if cid == 1:   # in two halves
                self.timeline.append({"chunk_id": cid, "compute": (t + 4.0, t + 6.0), "first_launch": t + 4.25})
            return comp

    class UsLink(FakeLink):
        def send_result(self, comp, us):
            self.sent.append((comp.chunk_id, us))

    link = UsLink([chunk(0), chunk(1), STOP])
    assert Loop(TimedBackend(), link, 1).serve() is None
    assert link.sent == [(0, 2500), (1, 2500 + 1750)]
    assert device_us(LoggingBackend(), 0) is None
    assert device_us(TimedBackend(), 0) is None    # an empty timeline
    monkeypatch.setattr(trace, "TRACE", True)
    monkeypatch.setattr(worker, "TRACE", True)
    capsys.readouterr()
    assert Loop(TimedBackend(), UsLink([chunk(0), chunk(1), STOP]), 1).serve() is None
    lines = [line for line in capsys.readouterr().err.splitlines() if "device timeline" in line]
    assert [line.split(": chunk ")[1].split(" ")[0] for line in lines] == ["0", "1", "1"]
    assert "compute 14.000-16.000" in lines[2] and "first_launch 14.250" in lines[2]


# ---------------------------------------------------------------- chunks merged into one batch

class BatchingBackend(LoggingBackend):
    """A backend that computes up to batch_rows rows at once (as the CUDA backend says): its Completions give row r
    the tokens [r, r] (so that each chunk's result can be checked after the split)."""
    batch_rows = 4

    def __init__(self):
        super().__init__()
        self.batches = []

    def submit(self, chunk):
        super().submit(chunk)
        self.batches.append(chunk.rows.tolist())

    def run(self):
        chunk = self.pending.pop(0)
        self.log.append(("compute", chunk.chunk_id))
        yield Pause(submit=True, ready=lambda: True, generated=2 * len(chunk.rows))
        n = len(chunk.rows)
        return Completions(chunk.chunk_id, chunk.rows, np.arange(n + 1, dtype=np.int64) * 2,
                           np.repeat(chunk.rows, 2).astype(np.int32), np.zeros(n, np.uint8))


class ResultLink(FakeLink):
    def __init__(self, inbox):
        super().__init__(inbox)
        self.results, self.progress = [], []

    def send_result(self, comp, us):
        super().send_result(comp, us)
        self.results.append((comp, us))

    def send_progress(self, chunk_id, tokens):
        self.progress.append((chunk_id, tokens))


def rows_chunk(i, rows, params=None):
    n = len(rows)
    return Chunk(i, np.asarray(rows, np.int64), np.arange(n + 1, dtype=np.int64), np.full(n, 5, np.int32), params)


def test_chunks_held_together_are_computed_as_one_batch_and_answered_each_on_its_own(monkeypatch):
    """batch_rows 4, four chunks waiting: the first batch takes chunks as far as they fit (1 + 2 + 1 rows; the next
    2 would make 6), the last chunk is the next batch; each chunk's result goes back on its own, with its own rows
    and tokens and its share of its batch's compute time."""
    from gpt2job.cluster import worker
    monkeypatch.setattr(worker, "device_us", lambda backend, chunk_id: 3000)
    link = ResultLink([rows_chunk(0, [0]), rows_chunk(1, [10, 11]), rows_chunk(2, [20]), rows_chunk(3, [30, 31]),
                       STOP])
    be = BatchingBackend()
    assert Loop(be, link, 1).serve() is None
    assert be.batches == [[0, 10, 11, 20], [30, 31]]
    assert link.sent == [0, 1, 2, 3]
    got = {c.chunk_id: (c.rows.tolist(), c.tokens.tolist(), us) for c, us in link.results}
    assert got[0] == ([0], [0, 0], 750) and got[1] == ([10, 11], [10, 10, 11, 11], 1500)
    assert got[2] == ([20], [20, 20], 750)
    assert got[3] == ([30, 31], [30, 30, 31, 31], 3000)


def test_progress_of_a_merged_batch_is_reported_for_each_of_its_chunks(monkeypatch):
    from gpt2job.cluster import worker
    clock = Clock()
    monkeypatch.setattr(worker, "time", clock)
    link = ResultLink([rows_chunk(0, [0, 1, 2]), STOP])
    loop = Loop(BatchingBackend(), link, 1)
    loop.waiting.extend([rows_chunk(5, [0, 1, 2]), rows_chunk(6, [3])])
    loop.take(block=False, limit=1)
    assert loop.in_flight == deque([5]) and loop.members[5] == [(5, 3), (6, 1)]
    clock.now += 1
    loop.report(8)
    assert link.progress == [(5, 6), (6, 2)]


def test_chunks_with_and_without_row_settings_are_not_merged():
    from gpt2job.chunks import RowParams
    p = RowParams.of(max_new_tokens=[3], temperature=[0.0], top_k=[0], top_p=[1.0], seed=[0], repetition_penalty=[1])
    link = ResultLink([rows_chunk(0, [0]), rows_chunk(1, [1], p), rows_chunk(2, [2]), STOP])
    be = BatchingBackend()
    be.batch_rows = 8
    Loop(be, link, 1).serve()
    assert be.batches == [[0], [1], [2]] and link.sent == [0, 1, 2]


def test_without_merging_each_chunk_is_its_own_batch(monkeypatch):
    monkeypatch.setenv("GPT2JOB_MERGE_CHUNKS", "0")
    from gpt2job import envs
    monkeypatch.setattr(envs, "_values", {})
    link = ResultLink([rows_chunk(0, [0]), rows_chunk(1, [1]), rows_chunk(2, [2]), STOP])
    be = BatchingBackend()
    Loop(be, link, 1).serve()
    assert be.batches == [[0], [1], [2]]


def test_an_idle_worker_submits_a_full_batch_without_receiving_the_chunks_behind_it():
    """batch_rows 4: with the device idle the worker stops taking messages once it holds 4 rows and submits them;
    the chunks still to come (a window of many small ones takes a while to receive) wait for the batch's pause."""
    link = ResultLink([rows_chunk(0, [0]), rows_chunk(1, [10, 11]), rows_chunk(2, [20]), rows_chunk(3, [30]), STOP])
    loop = Loop(BatchingBackend(), link, 1)
    loop.take(block=True, limit=1)
    assert loop.backend.batches == [[0, 10, 11, 20]]
    assert [getattr(m, "chunk_id", m) for m in link.inbox] == [3, STOP]


class ProgressingComm:
    """Iprobe as Open MPI's: a call that finds nothing moves the incoming messages on, so a message that arrived
    meanwhile is matched only by the next call."""

    def __init__(self, arrived):
        self.arrived, self.moved, self.calls = arrived, False, 0

    def Iprobe(self, source, tag, status=None):
        self.calls += 1
        if self.moved:
            return True
        self.moved = self.arrived
        return False


def test_a_message_that_arrived_while_the_rank_slept_is_seen_in_that_poll():
    """MpiMasterLink's poll probes again when its first Iprobe finds nothing: the message that Iprobe moved in is
    taken now, not one backoff sleep later (the master's poll, MpiChannel._probe, does the same)."""
    from types import SimpleNamespace

    from gpt2job.cluster.channel import MpiChannel, MpiMasterLink
    mpi = SimpleNamespace(ANY_TAG=-1, ANY_SOURCE=-2)
    link = object.__new__(MpiMasterLink)
    link.MPI, link.status = mpi, None
    link.comm = ProgressingComm(arrived=True)
    assert link._wait_for_message(block=False) and link.comm.calls == 2
    link.comm = ProgressingComm(arrived=False)
    assert not link._wait_for_message(block=False) and link.comm.calls == 2
    master = object.__new__(MpiChannel)
    master.MPI, master.any_source, master.ranks, master.failed = mpi, True, [1, 2], set()
    master.comm = ProgressingComm(arrived=True)
    assert master._probe(None) and master.comm.calls == 2
