"""Token selection: greedy argmax, or temperature / top-k / top-p sampling with per-prompt seeding.

The random number for (seed, prompt row, step) comes from a counter-based hash, so a prompt's
completion depends only on its own row index: not on the rank, the chunk or the batch it ran in.
cuda_src/sampling.cu implements exactly these rules (same hash, same kept set, same selection order).

Rules for one row of logits l (float32, [V]):
  1. temperature <= 0 or no sampling: the argmax (lowest index on ties).
  2. p = softmax(l / T).
  3. top-k (k > 0): keep tokens whose p is >= the k-th largest p (ties at the boundary are kept).
  4. top-p (0 < top_p < 1): among the kept, sort by p descending, take the shortest prefix whose sum
     reaches top_p * (kept sum); its smallest p is the threshold t; keep the tokens with p >= t.
  5. u = uniform(seed, row, step) in [0, 1); walk the kept tokens in index order and return the first
     whose running sum exceeds u * (kept sum).
"""
import numpy as np

from gpt2job.settings import SamplingSettings

MASK64 = (1 << 64) - 1


def splitmix64(x):
    """The splitmix64 finaliser on Python ints (mod 2^64)."""
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def uniform(seed, row, step):
    """A float in [0, 1) with 24 random bits, determined by (seed, row, step) alone."""
    x = splitmix64(splitmix64(splitmix64(seed & MASK64) ^ (row & MASK64)) ^ (step & MASK64))
    return (x >> 40) / float(1 << 24)


def kept_probs(logits, s: SamplingSettings):
    """logits: [V] float32 -> probabilities [V] float64 with the dropped tokens set to 0."""
    z = logits.astype(np.float64) / s.temperature                # [V]
    p = np.exp(z - z.max())                                      # [V]
    p /= p.sum()
    if 0 < s.top_k < p.size:
        kth = np.partition(p, p.size - s.top_k)[p.size - s.top_k]
        p = np.where(p >= kth, p, 0.0)                           # [V]
    if 0.0 < s.top_p < 1.0:
        order = np.sort(p[p > 0])[::-1]                           # kept probs, descending
        csum = np.cumsum(order)
        cut = int(np.searchsorted(csum, s.top_p * csum[-1]))      # first prefix reaching the mass
        t = order[min(cut, order.size - 1)]
        p = np.where(p >= t, p, 0.0)
    return p


def select_tokens(logits, rows, step, s: SamplingSettings):
    """logits: [B, V] float32, rows: [B] prompt row indices -> chosen token ids [B] int64."""
    if s.greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)       # [B]
    out = np.empty(len(rows), dtype=np.int64)
    for b, row in enumerate(rows):
        p = kept_probs(logits[b], s)                             # [V]
        c = np.cumsum(p)                                         # [V], index order
        u = uniform(s.seed, int(row), step)
        # c is flat across dropped tokens, so the first index past u * total is always a kept one
        out[b] = min(int(np.searchsorted(c, u * c[-1], side="right")), p.size - 1)
    return out
