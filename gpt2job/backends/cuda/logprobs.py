"""Log-probabilities on the GPU (--logprobs, --top-logprobs K), the runner's side: each selection of a step writes,
beside its tokens, every row's log-probability (and top K) with Kernels.logprobs (cuda_src/logprobs.cu) from the
logits the LM head materialised; greedy fp16 rows without top K keep the fused head, whose partials carry the sums
the log-probability needs (argmax_logprob_partials: no logits in memory). They are downloaded with the step's tokens
and collected here into the chunk's arrays. With logprobs off, OFF (this module's) does nothing.

A step of n rows writes one device buffer (pool buffer "logprobs"): logprobs [n] float32, top ids [n, K] int32, top
logprobs [n, K] float32, one after the other; it is downloaded (one copy, before the step's tokens: the tokens'
download event covers it) into pinned slot step % 2, as the tokens are.
"""
from dataclasses import dataclass

import numpy as np


def step_words(n, k):
    """4-byte words of a step of n rows with top K: log-probabilities [n], top ids [n, K], top log-probabilities
    (0 where K is None: --logprobs off)."""
    return 0 if k is None else n * (1 + 2 * k)


@dataclass(frozen=True)
class LogprobOut:
    """Device pointers where a selection's rows write: row i at lp + 4 i, ids + 4 k i, vals + 4 k i."""
    k: int
    lp: int
    ids: int
    vals: int

    def at(self, i):
        """The pointers of rows i.. (a head group starting at row i)."""
        return self.lp + 4 * i, self.ids + 4 * self.k * i, self.vals + 4 * self.k * i


class StepLogprobs:
    """One chunk's log-probabilities: rows [B] (run order) x steps [n_max], filled as steps reach the host."""

    def __init__(self, dev, B, n_max, k):
        self.dev, self.k, self.on = dev, k, dev is not None
        n_max = max(n_max, 0)
        self.lp = np.zeros((B, n_max), np.float32)
        self.ids = np.zeros((B, n_max, k), np.int32)
        self.top = np.zeros((B, n_max, k), np.float32)
        self.dbuf = 0

    @classmethod
    def of(cls, dev, settings, B, n_max):
        """The chunk's collector, or OFF when the job stores no log-probabilities."""
        return cls(dev, B, n_max, settings.top_logprobs) if settings.logprobs else OFF

    def words(self, n):
        return step_words(n, self.k)

    def group(self, ns):
        """A KV group of ns sequences starts: room for a step of ns rows on the device (the two pinned slots:
        Device.step_buffers, which the runner calls first)."""
        if not self.on:
            return
        self.dbuf = self.dev.buf("logprobs", 4 * self.words(ns))
        self.host = self.dev.lp_host

    def out(self, n, i=0):
        """Where a selection over rows i.. of a step of n rows writes (None when off)."""
        if not self.on:
            return None
        b = self.dbuf
        return LogprobOut(self.k, b + 4 * i, b + 4 * (n + self.k * i), b + 4 * (n * (1 + self.k) + self.k * i))

    def kw(self, n, i=0):
        """Model.select's keyword for it: {} when off (the call of before)."""
        return {"lp": self.out(n, i)} if self.on else {}

    def download(self, n, slot):
        """Queue the copy of a step of n rows to pinned slot (0, 1) on the compute stream (before its tokens')."""
        if self.on and n:
            half = self.host.size // 2
            self.dev.drv.memcpy_dtoh_async(self.host[slot * half:slot * half + self.words(n)], self.dbuf,
                                           self.dev.compute)

    def take(self, slot, n, live, prows, pstep):
        """The step pstep of n rows reached the host (slot): rows live [n] mask of them are prows (run order)."""
        if not self.on:
            return
        half, k = self.host.size // 2, self.k
        h = self.host[slot * half:slot * half + self.words(n)]
        self.lp[prows, pstep] = h[:n][live]
        if k:
            self.ids[prows, pstep] = h[n:n * (1 + k)].view(np.int32).reshape(n, k)[live]
            self.top[prows, pstep] = h[n * (1 + k):].reshape(n, k)[live]

    def attach(self, comp, gen, back=None):
        """comp (the chunk's Completions, rows in the chunk's order) gets its arrays: back reorders the run order
        into the chunk's (None: the same); gen [B] tokens per row (chunk order)."""
        if not self.on:
            return comp
        lp, ids, top = (a if back is None else a[back] for a in (self.lp, self.ids, self.top))
        mask = np.arange(lp.shape[1])[None, :] < gen[:, None]                   # [B, n_max]
        comp.logprobs = lp[mask]
        if self.k:
            comp.top_ids, comp.top_logprobs = ids[mask], top[mask]
        return comp


OFF = StepLogprobs(None, 0, 0, 0)
