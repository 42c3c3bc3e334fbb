"""The interface a worker drives, which every backend implements: submit(chunk), then run(), a generator that
yields a Pause wherever the host would wait for the device and returns the chunk's Completions."""
from collections import deque
from dataclasses import dataclass
from typing import Callable, Generator

from gpt2job.chunks import Chunk, Completions
from gpt2job.settings import DEFAULT_CHUNK


@dataclass(frozen=True)
class Pause:
    """What Backend.run() yields: the device is computing and the host could wait.

    submit: now is the time to submit further chunks (their preparation and upload overlap this compute).
    ready(): has the device reached the point the host is about to block on? The worker may do its own work
    (send results) until it is; the backend blocks on it once resumed.
    generated: tokens of the chunk being computed that have reached the host so far (progress within a chunk;
    -1: not known at this pause)."""
    submit: bool
    ready: Callable[[], bool]
    generated: int = -1


READY = lambda: True   # noqa: E731  (a Pause whose device point is already reached)


class Backend:
    """What a worker drives: submit(chunk) takes a chunk and returns at once (validation, preparation, upload
    started); run() computes the oldest submitted chunk, as a generator that yields a Pause wherever the host
    would wait for the device and returns the chunk's Completions. Between the steps the worker, not the backend,
    decides what else to do: the backend calls nothing of the worker. Results come in submission order. The worker
    may call submit() while a run() is paused (at a Pause with submit=True: the next chunk's upload overlaps this
    one's compute), and the CUDA backend's run() launches the next submitted chunk's prefill before it returns
    (cuda/runner.py, Runner._start_next), so more than one chunk may be in flight in a backend at once."""
    name = "abstract"
    preferred_chunk = DEFAULT_CHUNK     # prompts per chunk this backend runs well with
    batch_rows = 0                      # rows it computes faster as one batch: the worker merges smaller chunks
                                        # into batches of up to this many (0: one chunk at a time)
    # A device's record of what it computed (the CUDA backend's CUDA events), oldest first: one dict per chunk, or
    # per part of a chunk computed in parts, with "chunk_id" and times in ms since the backend started:
    # "compute" (start, end) and, where the part launched anything, "first_launch". Empty: no device timeline
    # (the worker then reports the host's time computing a chunk).
    timeline = ()

    def warm_up(self):
        """Called once before the worker reports ready: first launches and allocations here, not in the first
        chunk (the CUDA backend); nothing to do for a backend without a device."""

    def submit(self, chunk: Chunk):
        self.__dict__.setdefault("_submitted", deque()).append(chunk)

    def run(self) -> Generator[Pause, None, Completions]:
        return self.generate(self._submitted.popleft())
        yield  # noqa: a generator that never pauses (no device to wait for)

    def generate(self, chunk: Chunk) -> Completions:
        """A chunk's Completions, for a backend with no device to wait for (the synthetic one): the run() above
        computes the submitted chunk with it, never pausing. A backend that pauses overrides run() instead. Callers
        use run() (the worker) or compute() (tests, scripts), never this."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Small metadata for the job summary (device name, dtype, ...)."""
        return {"backend": self.name}

    def close(self):
        pass


def compute(backend: Backend, chunk: Chunk) -> Completions:
    """Submit one chunk and run it to the end, ignoring the pauses (tests, scripts)."""
    backend.submit(chunk)
    return drive(backend.run())


def drive(steps, on_pause=None):
    """Run a run() generator to its end, calling on_pause(pause) at each pause; returns its Completions."""
    while True:
        try:
            pause = next(steps)
        except StopIteration as done:
            return done.value
        if on_pause is not None:
            on_pause(pause)
