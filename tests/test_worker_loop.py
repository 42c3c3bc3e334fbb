"""The worker's compute loop (gpt2job.cluster.worker.serve) with a fake backend that logs what it is asked to do."""
import numpy as np

from gpt2job.chunks import Chunk, Completions
from gpt2job.cluster.worker import PREFETCH, STOP, serve


class LoggingBackend:
    """submit() queues, result() 'computes' the oldest and calls idle_hook once, as the CUDA backend does while
    its GPU computes."""
    idle_hook = None

    def __init__(self):
        self.log, self.pending = [], []

    def submit(self, chunk):
        self.log.append(("submit", chunk.chunk_id))
        self.pending.append(chunk)

    def result(self):
        chunk = self.pending.pop(0)
        self.log.append(("compute", chunk.chunk_id))
        if self.idle_hook is not None:
            self.idle_hook()
        n = len(chunk.rows)
        return Completions(chunk.chunk_id, chunk.rows, np.zeros(n + 1, np.int64), np.zeros(0, np.int32),
                           np.zeros(n, np.uint8))


def chunk(i):
    return Chunk(i, np.array([i], np.int64), np.array([0, 1], np.int64), np.array([5], np.int32))


def test_an_idle_worker_computes_its_first_chunk_at_once_and_submits_the_next_during_it():
    """Chunks 0..2 all waiting when the loop starts: only chunk 0 is submitted before its compute (a second
    submit would hold the idle GPU back); chunk 1 is submitted from the idle hook while chunk 0 computes."""
    inbox = [chunk(0), chunk(1), chunk(2), STOP]
    sent = []

    def receive(block):
        return inbox.pop(0) if inbox else None

    be = LoggingBackend()
    assert serve(be, 1, receive, lambda comp, us: sent.append(comp.chunk_id)) is None
    assert be.log[:2] == [("submit", 0), ("compute", 0)]
    assert be.log.index(("submit", 1)) < be.log.index(("compute", 1))
    assert be.log.index(("submit", 1)) > be.log.index(("compute", 0))      # during chunk 0, via the idle hook
    assert sent == [0, 1, 2]
    assert PREFETCH >= 2


def test_chunks_received_before_stop_are_all_computed_by_a_backend_without_idle_hook():
    """A backend that never calls idle_hook (NumPy; CUDA with nothing to generate) gets its chunks one at a time,
    and a STOP that arrived with them does not drop the ones still queued."""
    inbox = [chunk(0), chunk(1), chunk(2), STOP]
    sent = []

    class NoHook(LoggingBackend):
        def result(self):
            hook, self.idle_hook = self.idle_hook, None
            try:
                return super().result()
            finally:
                self.idle_hook = hook

    be = NoHook()
    assert serve(be, 1, lambda block: inbox.pop(0) if inbox else None,
                 lambda comp, us: sent.append(comp.chunk_id)) is None
    assert sent == [0, 1, 2]
    assert be.log == [("submit", 0), ("compute", 0), ("submit", 1), ("compute", 1), ("submit", 2), ("compute", 2)]


def test_the_main_loop_does_not_submit_another_chunk_before_computing_the_submitted_one():
    """Chunk 1 was submitted during chunk 0 (idle hook) and chunk 2 waits: chunk 1 computes before chunk 2 is
    submitted (from the hook, during chunk 1)."""
    inbox = [chunk(0), chunk(1), chunk(2), STOP]
    be = LoggingBackend()
    serve(be, 1, lambda block: inbox.pop(0) if inbox else None, lambda comp, us: None)
    assert be.log.index(("compute", 1)) < be.log.index(("submit", 2))
