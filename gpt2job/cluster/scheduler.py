"""The master's work queue: which rows go into the next chunk, which chunks must be handed out again after a
worker fails or hangs, and each chunk's deadline (the master keeps which chunks are out with which worker,
WorkerState.outstanding, cluster/workers.py, and asks hung() about them)."""
import math
from collections import deque

import numpy as np

from gpt2job.chunks import Chunk, take_ragged
from gpt2job.cluster.workers import Outstanding, WorkerState
from gpt2job.settings import PREFETCH


# A row's work, in units of one token through the weights: its P prompt and G new tokens each pass the weights once,
# and each new token reads the keys and values of its context (P + G / 2 positions on average) at POSITION_COST /
# n_embd units a position. A position's 4 n_layer n_embd bytes (fp16) against a token's 24 n_layer n_embd^2 FLOPs
# makes it (FLOP/s / bytes/s) / (6 n_embd); at the speeds of decode-sized products (well below the chip's peak) that
# is ~7 / n_embd in fp16, the value fitted to two H200s' times (benchmarks/gpus_ragged.py, RESULTS.md); fp32's
# slower products (7x) outweigh its 2x bytes.
POSITION_COST = {"float16": 7.0, "float32": 2.0}
COST_BLOCK = 1 << 16   # rows whose cost is estimated at once (no per-row array is kept)
DEADLINE_FACTOR = 10.0   # a chunk's deadline: this many times its worker's measured time for its tokens (at least
                         # --chunk-timeout)


def position_cost(dtype, n_embd):
    return POSITION_COST.get(dtype, POSITION_COST["float16"]) / max(1, n_embd)


class Scheduler:
    def __init__(self, prompts, rows, chunk_size=0, min_deadline=120.0, prefetch=PREFETCH, row_settings=None,
                 max_new_tokens=16, num_samples=1, position_cost=0.0):
        self.prompts = prompts
        self.row_settings = row_settings    # the input's per-row settings (files/row_settings.py): each chunk's own
        self.max_new_tokens = max_new_tokens
        # --num-samples N: rows are output rows, row r the sample r % N of prompt r // N (prompts are never copied:
        # a chunk gathers its tokens through r // N); a prompt's samples stay adjacent and in one chunk
        self.num_samples = max(1, int(num_samples))
        rows = np.asarray(rows, np.int64)
        # longest prompts first: homogeneous chunks (little padding) and the long tail early; prompts all as long
        # (a 2-D input, W1): the rows in their order, as given (not copied: 8 bytes a row, not 28)
        every = prompts.lengths
        if len(every) and every.min() == every.max():
            self.queue = rows                                                      # rows not yet handed out
        else:
            lengths = every[rows // self.num_samples if self.num_samples > 1 else rows]
            self.queue = rows[np.argsort(-lengths, kind="stable")]
        self.head = 0                                                              # ... from queue[head] on
        self.total = len(self.queue)
        self.even_size = None      # adaptive chunk size, fixed at the first chunk
        # chunks of equal work rather than equal rows when rows differ in work (ragged prompts, per-row
        # max_new_tokens) and the chunk size is the scheduler's: long prompts then go out in smaller chunks, so that
        # workers given the longest ones do not finish last
        self.position_cost = position_cost
        varied = (len(every) and every.min() != every.max()) or (
            row_settings is not None and len(row_settings.max_new_tokens) and
            row_settings.max_new_tokens.min() != row_settings.max_new_tokens.max())
        self.by_cost = bool(varied) and not chunk_size and position_cost > 0
        self.cost_left = self.cost(0, self.total) if self.by_cost else 0.0
        self.cost_target = None    # the work of a chunk, fixed at the first chunk
        self.retry = deque()
        self.built = deque()       # chunks made ahead by prebuild(), handed out in order
        self.chunk_size = chunk_size
        self.min_deadline = min_deadline
        self.prefetch = prefetch
        self.next_id = 0

    def row_costs(self, lo, hi):
        """The estimated work of queue[lo:hi] (see POSITION_COST), float64 per row."""
        rows = self.queue[lo:hi]
        prompt = rows // self.num_samples if self.num_samples > 1 else rows
        P = self.prompts.lengths[prompt].astype(np.float64)
        G = (self.row_settings.max_new_tokens[prompt].astype(np.float64) if self.row_settings is not None
             else np.full(len(rows), float(self.max_new_tokens)))
        return P + G + self.position_cost * G * (P + G / 2)

    def cost(self, lo, hi):
        return sum(float(self.row_costs(i, min(hi, i + COST_BLOCK)).sum()) for i in range(lo, hi, COST_BLOCK))

    def end_by_cost(self, head, target, most):
        """The end of the chunk from queue[head] whose rows' work first reaches target (at least one row, at most
        `most`); the rest joins it when it would be a chunk of under a quarter of target."""
        end, acc = head, 0.0
        stop = min(len(self.queue), head + most)
        while end < stop:
            hi = min(stop, end + COST_BLOCK)
            c = np.cumsum(self.row_costs(end, hi)) + acc
            i = int(np.searchsorted(c, target))        # first row where the work reaches target
            if i < len(c):
                end, acc = end + i + 1, float(c[i])
                break
            end, acc = hi, float(c[-1])
        if self.cost_left - acc < 0.25 * target and len(self.queue) - head <= most:
            end = len(self.queue)
        return max(end, head + 1)

    def describe(self):
        """How the rows are chunked, for the log."""
        n = self.chunk_size or self.even_size
        what = f"chunks of {n:,} prompt{'s' * (n != 1)}"
        if self.chunk_size:
            return what + " (--chunk-size)"
        return what + " on average, of equal estimated work (fewer where prompts are long)" if self.by_cost else what

    def rows_left(self):
        return (len(self.queue) - self.head + sum(len(c.rows) for c in self.retry)
                + sum(len(c.rows) for c in self.built))

    def next_chunk(self, worker: WorkerState, n_active_workers):
        if self.retry:
            return self.retry.popleft()
        if self.built:
            return self.built.popleft()
        return self._take(worker.preferred_chunk, n_active_workers)

    def prebuild(self, n_workers, preferred_chunk):
        """Make the first chunks (prefetch per worker) now, while the workers start up, so that handing them out
        is only a send: the last worker no longer waits for the others' chunks to be gathered."""
        while len(self.built) < n_workers * self.prefetch:
            chunk = self._take(preferred_chunk, n_workers)
            if chunk is None:
                return
            self.built.append(chunk)

    def _take(self, pref, n_active_workers):
        """The next chunk from the queue, or None when it is empty."""
        if self.head >= len(self.queue):
            return None
        # adaptive: equal chunks, k per worker, k the fewest that keeps a chunk within the backend's
        # preferred size. Equal workers then finish together; unequal ones differ by one chunk at most. Equal rows:
        # at least `prefetch` chunks per worker (measured faster for even prompts), but one worker gets the fewest
        # that fit; equal work: one is enough (when every worker is ready, all first chunks go out at once, and a
        # bigger batch computes faster; while one is not, the master lets each ready worker hold one chunk only:
        # Master.feed)
        n = max(1, n_active_workers)
        if self.even_size is None:
            k = max(1 if n == 1 or self.by_cost else self.prefetch, math.ceil(self.total / (n * pref)))
            self.even_size = max(1, math.ceil(self.total / (k * n)))
            N = self.num_samples
            if N > 1:   # whole prompts: a multiple of N rows
                self.even_size = (self.even_size + N - 1) // N * N
            if self.by_cost:
                self.cost_target = self.cost_left / (k * n)
        size = self.chunk_size or self.even_size
        if self.by_cost:   # at most 4 times the even size: a chunk of cheap rows stays within what a worker holds
            end = self.end_by_cost(self.head, self.cost_target, max(4 * self.even_size, pref))
        else:
            end = min(len(self.queue), self.head + size)
        end = self.sample_boundary(self.head, end)
        if self.by_cost:
            self.cost_left -= self.cost(self.head, end)
        rows = self.queue[self.head:end]
        self.head = end
        return self.make_chunk(rows)

    def sample_boundary(self, head, end):
        """The end of a chunk queue[head:end], moved so that it does not split the samples of a prompt (they are
        adjacent in the queue): back to the prompt's first sample, or, where the chunk would hold only some samples
        of that one prompt, on to its last (chunks of equal work: one long prompt's samples can outweigh a chunk),
        unless --chunk-size is below --num-samples."""
        N = self.num_samples
        if N == 1 or end >= len(self.queue):
            return end
        prompt = self.queue[end - 1] // N
        if self.queue[end] // N != prompt:
            return end
        k = end - 1
        while k > head and self.queue[k - 1] // N == prompt:
            k -= 1
        if k > head or 0 < self.chunk_size < N:
            return k if k > head else end
        while end < len(self.queue) and self.queue[end] // N == prompt:
            end += 1
        return end

    def window(self, worker: WorkerState):
        """The chunks `worker` holds at a time: prefetch; where --chunk-size makes chunks smaller than the batch the
        worker computes at once (its batch_rows: it merges the chunks it holds), enough for prefetch such batches."""
        size = self.chunk_size
        return self.prefetch * (worker.batch_rows // size if 0 < size < worker.batch_rows else 1)

    def make_chunk(self, rows):
        """The chunk of these (output) rows, gathered without a Python loop (a chunk can hold 10^4-10^5 prompts, and
        workers wait while the master builds their first chunks)."""
        rows = np.asarray(rows, np.int64)
        prompt = rows // self.num_samples if self.num_samples > 1 else rows     # the input row of each output row
        w = getattr(self.prompts, "width", None)
        if w:     # every prompt as long (a 2-D input): rows of a [N, w] array
            offsets, tokens = np.arange(len(rows) + 1, dtype=np.int64) * w, self.prompts.tokens.reshape(-1, w)[prompt]
        else:
            offsets, tokens = take_ragged(self.prompts.offsets, self.prompts.tokens, prompt)
        params = self.row_settings.params(prompt) if self.row_settings is not None else None
        chunk = Chunk(self.next_id, rows, offsets, tokens.reshape(-1).astype(np.int32, copy=False), params)
        self.next_id += 1
        return chunk

    def new_tokens(self, chunk):
        """The most tokens a chunk can generate: its rows' own max_new_tokens, or the job's for each."""
        if chunk.params is not None:
            return int(chunk.params.max_new_tokens.sum(dtype=np.int64))
        return len(chunk.rows) * self.max_new_tokens

    def give_back(self, chunk):
        """A chunk whose worker failed: first in line for the next worker."""
        self.retry.append(chunk)

    def deadline(self, worker: WorkerState, out: Outstanding):
        """How long the worker may stay silent on this chunk (no result, no progress report: hung() counts from the
        later of the chunk's send and the worker's last report) before it is declared hung."""
        spt = worker.seconds_per_token()
        if spt is None:  # no result of this worker's yet: no measured speed, be generous
            return 5 * self.min_deadline
        return max(self.min_deadline, DEADLINE_FACTOR * spt * out.new_tokens)

    def hung(self, worker: WorkerState, now):
        if not worker.outstanding or worker.retired:
            return False
        head = min(worker.outstanding.values(), key=lambda o: o.sent_at)
        started = max(head.sent_at, worker.last_heard)
        return now - started > self.deadline(worker, head)
