"""Token selection: greedy argmax, or temperature / top-k / top-p sampling with per-prompt seeding.

The random number for (seed, prompt row, step) comes from a counter-based hash, so a prompt's
completion depends only on its own row index: not on the rank, the chunk or the batch it ran in.
cuda_src/sampling.cu implements exactly these rules (same hash, same kept set, same selection order).

Rules for one row of logits l (float32, [V]):
  1. temperature <= 0 or no sampling: the argmax (lowest index on ties).
  2. p = softmax(l / T): z = l / T - max(l / T) in float64, exp(z) in float32 (z rounded to float32 first: the
     GPU's float32 exponential is far cheaper than its float64 one: benchmarks/RESULTS.md), the sums in float64.
  3. top-k (k > 0): keep tokens whose logit is >= the k-th largest logit (ties at the boundary are kept).
  4. top-p (0 < top_p < 1): among the kept with p > 0, sort by logit descending, take the shortest prefix
     whose sum of p reaches top_p * (kept sum); its smallest logit is the threshold t; keep the tokens with
     logit >= t. (Rules 3-4 compare logits, as transformers' top-k / top-p warpers do: p is a non-decreasing
     function of the logit, so these are the tokens of largest p, ties kept.)
  5. u = uniform(seed, row, step) in [0, 1); walk the kept tokens in index order and return the first
     whose running sum exceeds u * (kept sum).
  6. A row with a temperature and neither top-k nor top-p (rules 3-4 would keep every token) takes rules 2-5's
     distribution in one pass instead (tempered_pick): each chunk of 64 columns draws its Gumbel-perturbed log-mass
     and a token inside it; the largest perturbed chunk wins (exact sampling from softmax(l / T) in one pass: the
     fp16 LM head draws it in its epilogue, its logits never written: benchmarks/RESULTS.md, "sampling rule 6").
Per-row settings and the repetition penalty (applied first, to the raw logits): RowSettings, select_rows.
"""
from dataclasses import dataclass
from typing import Optional

import numpy as np

from gpt2job.chunks import RowParams
from gpt2job.settings import GenerationSettings, SamplingSettings

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


def tempered_key(seed, row, step):
    """The 32-bit key of rule 6's random numbers for (seed, row, step): the high half of uniform's hash."""
    return splitmix64(splitmix64(splitmix64(seed & MASK64) ^ (row & MASK64)) ^ (step & MASK64)) >> 32


def lowbias32(x):
    """The lowbias32 integer hash of uint32 array x (mod 2^32)."""
    x = np.asarray(x, np.uint32).copy()
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    return x ^ (x >> np.uint32(16))


CHUNK = 64   # rule 6's chunk of columns


def takes_rule_6(temperature, top_k, top_p, V):
    """Whether rows (scalars or arrays) with these settings take rule 6: a temperature, and a top-k and top-p that
    keep every token (cuda_src/sampling.cu plain_row)."""
    t, k, p = np.asarray(temperature), np.asarray(top_k), np.asarray(top_p)
    return (t > 0) & ~((k > 0) & (k < V)) & ~((p > 0) & (p < 1))


def plain(s: SamplingSettings, V):
    """A sampled row whose top-k and top-p keep every token: rule 6 picks its token."""
    return bool(takes_rule_6(s.temperature, s.top_k, s.top_p, V))


def tempered_chunks(logits, temperature, key):
    """Rule 6's chunks of one row, float32 throughout: logits [V] -> (e [n, 64], G [n, 8], C [n, 8], value [n],
    t [n]). z = l * (1 / T) (1 / T rounded to float32); chunk j holds columns 64 j + 8 a + k (group a < 8, k < 8;
    past V: none, e = 0); m_j = its largest z, e = exp(z - m_j), p_q = e_2q + e_2q+1 (q < 4) and G_a = (p_0 + p_1) +
    (p_2 + p_3) over a group's columns, C_a = G_0 + ... + G_a added in turn, S_j = C_7. From h = lowbias32(key + i *
    0x9E3779B9) with i = 2 j and 2 j + 1: u = ((h >> 9) + 1/2) / 2^23 in (0, 1), w = (h >> 8) / 2^24 in [0, 1).
    Chunk j's value (m_j + log S_j) - log(-log u) (its log-mass plus Gumbel noise), its draw's threshold t = w S_j."""
    lg = np.asarray(logits, np.float32)
    n = -(-lg.size // CHUNK)
    z = np.full(n * CHUNK, -np.inf, np.float32)
    z[:lg.size] = lg * np.float32(1.0 / temperature)
    z = z.reshape(n, CHUNK)                                      # [n, 64]
    m = z.max(axis=1)                                            # [n]
    e = np.exp(z - m[:, None])                                   # [n, 64] float32; 0 past V
    p = e[:, 0::2] + e[:, 1::2]                                  # [n, 32] pairs, 4 a group
    G = (p[:, 0::4] + p[:, 1::4]) + (p[:, 2::4] + p[:, 3::4])    # [n, 8]
    C = np.cumsum(G, axis=1, dtype=np.float32)                   # [n, 8] in turn
    S = C[:, -1]                                                 # [n]
    h = lowbias32(np.uint32(key) + np.arange(2 * n, dtype=np.uint32) * np.uint32(0x9E3779B9))
    u = ((h[0::2] >> np.uint32(9)).astype(np.float32) + np.float32(0.5)) * np.float32(2.0 ** -23)
    w = (h[1::2] >> np.uint32(8)).astype(np.float32) * np.float32(2.0 ** -24)
    return e, G, C, (m + np.log(S)) - np.log(-np.log(u)), w * S


def tempered_pick(logits, temperature, key):
    """Rule 6 for one row: logits [V] -> token. The chunk of largest value wins (lowest on ties) and draws: the first
    group a with C_a > t (else the last with G_a > 0), then in it from C_(a-1) the e's added in column order, the
    first column where the sum exceeds t (else its last column with e > 0). cuda_src/sampling.cu tempered_row and
    the LM head's EPI_TEMPERED epilogue (gemm_f16.cu) do the same operations in this order (the exponential aside:
    theirs is the GPU's __expf, a few ulps from NumPy's: tests/twin_ties.py)."""
    e, G, C, val, t = tempered_chunks(logits, temperature, key)
    j = int(np.argmax(val))
    above = np.flatnonzero(C[j] > t[j])
    a = int(above[0]) if above.size else int(np.flatnonzero(G[j] > 0)[-1])
    run = C[j, a - 1] if a else np.float32(0)
    group = e[j, 8 * a:8 * a + 8]
    for c in range(8):
        run = np.float32(run + group[c])
        if run > t[j]:
            return CHUNK * j + 8 * a + c
    return CHUNK * j + 8 * a + int(np.flatnonzero(group > 0)[-1])


def kept_probs(logits, s: SamplingSettings):
    """logits: [V] float32 -> probabilities [V] float64 with the dropped tokens set to 0."""
    lg = np.asarray(logits, np.float32)                          # [V]
    z = lg.astype(np.float64) / s.temperature                    # [V]
    p = np.exp((z - z.max()).astype(np.float32)).astype(np.float64)   # [V] (rule 2)
    p /= p.sum()
    keep = np.ones(p.size, bool)                                 # [V]
    if 0 < s.top_k < p.size:
        keep &= lg >= np.partition(lg, p.size - s.top_k)[p.size - s.top_k]
    if 0.0 < s.top_p < 1.0:
        cand = np.flatnonzero(keep & (p > 0))
        order = cand[np.argsort(-lg[cand], kind="stable")]       # kept, logits descending
        csum = np.cumsum(p[order])
        cut = int(np.searchsorted(csum, s.top_p * csum[-1]))      # first prefix reaching the mass
        keep &= lg >= lg[order[min(cut, order.size - 1)]]
    return np.where(keep, p, 0.0)


def select_tokens(logits, rows, step, s: SamplingSettings):
    """logits: [B, V] float32, rows: [B] output rows -> chosen token ids [B] int64."""
    if s.greedy:
        return np.argmax(logits, axis=-1).astype(np.int64)       # [B]
    out = np.empty(len(rows), dtype=np.int64)
    for b, row in enumerate(rows):
        out[b] = _pick(logits[b], s, row, step)
    return out


def _pick(logits, s: SamplingSettings, row, step):
    """One sampled row's token: rule 6, or rules 2-5."""
    if plain(s, np.shape(logits)[-1]):
        return tempered_pick(logits, s.temperature, tempered_key(int(s.seed), int(row), int(step)))
    return _draw(kept_probs(logits, s), s.seed, row, step)


def _draw(p, seed, row, step):
    """The token u = uniform(seed, row, step) picks from kept probabilities p [V] (rule 5)."""
    c = np.cumsum(p)                                             # [V], index order
    u = uniform(int(seed), int(row), int(step))
    # c is flat across dropped tokens, so the first index past u * total is always a kept one
    return min(int(np.searchsorted(c, u * c[-1], side="right")), p.size - 1)


# ---------------------------------------------------------------- per-row settings and the repetition penalty
#
# A chunk may carry per-row settings (chunks.RowParams); the rows of one batch then select with their own
# temperature / top-k / top-p / seed (temperature <= 0: the argmax) and their own repetition penalty, applied to the
# raw logits first (transformers' RepetitionPenaltyLogitsProcessor): for every token id in the row's prompt or
# generated so far, l = l * p if l < 0 else l / p, in float32. The tokens a row has seen are a bitmap per row,
# uint32 words [rows, ceil(V / 32)], bit t % 32 of word t // 32 for token t (the GPU keeps the same one).


@dataclass
class RowSettings:
    """Every row's generation settings, resolved: the chunk's RowParams, else the job's. Arrays [B]."""
    max_new_tokens: np.ndarray   # [B] int64 >= 1
    temperature: np.ndarray      # [B] float64, <= 0: greedy
    top_k: np.ndarray            # [B] int32, 0: off
    top_p: np.ndarray            # [B] float64
    seed: np.ndarray             # [B] uint64
    penalty: np.ndarray          # [B] float32, 1: off
    stops: tuple                 # [B] tuples of str
    job: Optional[SamplingSettings] = None   # the job's sampling settings, when every row uses them (no RowParams)

    @classmethod
    def of(cls, params: Optional[RowParams], gs: GenerationSettings, B):
        if params is None:
            s = gs.sampling
            return cls(np.full(B, gs.max_new_tokens, np.int64), np.full(B, s.temperature, np.float64),
                       np.full(B, s.top_k, np.int32), np.full(B, s.top_p, np.float64),
                       np.full(B, s.seed & MASK64, np.uint64), np.full(B, gs.repetition_penalty, np.float32),
                       (tuple(gs.stop),) * B, s)
        return cls(np.asarray(params.max_new_tokens, np.int64), np.asarray(params.temperature, np.float64),
                   np.asarray(params.top_k, np.int32), np.asarray(params.top_p, np.float64),
                   np.asarray(params.seed, np.int64).astype(np.uint64),
                   np.asarray(params.repetition_penalty, np.float32), params.all_stops())

    def take(self, idx):
        """Rows idx, in that order."""
        idx = np.asarray(idx, np.int64)
        # the job's settings (no RowParams): every row has the job's stop strings (no loop over a chunk's rows)
        stops = self.stops[:1] * len(idx) if self.job is not None and self.stops else \
            tuple(self.stops[i] for i in idx)
        return RowSettings(self.max_new_tokens[idx], self.temperature[idx], self.top_k[idx], self.top_p[idx],
                           self.seed[idx], self.penalty[idx], stops, self.job)

    @property
    def penalized(self):
        return bool((self.penalty != 1).any())

    def shared(self):
        """The SamplingSettings every row selects with when they all share one and no row is penalized (the
        job-wide kernels then serve the batch), else None (the per-row selection)."""
        if self.penalized:
            return None
        if self.job is not None:
            return self.job
        if not len(self.temperature) or (self.temperature <= 0).all():
            return SamplingSettings()
        cols = (self.temperature, self.top_k, self.top_p, self.seed)
        if all((c == c[0]).all() for c in cols):
            return SamplingSettings(float(cols[0][0]), int(cols[1][0]), float(cols[2][0]), int(cols[3][0]))
        return None


def seen_words(V):
    """uint32 words of a row of the seen-tokens bitmap."""
    return (V + 31) // 32


def mark_seen(bits, tok, seq, seq_base):
    """Twin of sampling.cu mark_seen, in place: bits [S, W] uint32; token tok[i] seen by row seq[i] - seq_base."""
    tok = np.asarray(tok, np.int64)                                        # [n]
    s = np.asarray(seq, np.int64) - seq_base                               # [n]
    np.bitwise_or.at(bits, (s, tok >> 5), (np.uint32(1) << (tok & 31).astype(np.uint32)))


def seen_mask(bits, V):
    """bits [S, W] uint32 -> [S, V] bool."""
    b8 = np.ascontiguousarray(bits, np.uint32).astype("<u4").view(np.uint8)          # [S, 4 W]
    return np.unpackbits(b8, axis=1, bitorder="little")[:, :V].astype(bool)


def penalize(logits, seen, penalty):
    """transformers' repetition penalty: logits [B, V] float32, seen [B, V] bool, penalty [B] float32 ->
    [B, V] float32: l * p where l < 0, else l / p, on the seen tokens only."""
    lg = np.asarray(logits, np.float32)
    p = np.asarray(penalty, np.float32)[:, None]                           # [B, 1]
    return np.where(seen, np.where(lg < 0, lg * p, lg / p), lg).astype(np.float32)


def select_rows(logits, rows, step, rs: RowSettings, seen=None):
    """Per-row selection: logits [B, V] float32 of rows with settings rs ([B]), rows [B] output rows, seen
    [B, V] bool (None: no penalty) -> [B] int64. Row b: the penalty, then the argmax (temperature <= 0) or rules
    2-6 with its own temperature / top-k / top-p / seed."""
    if seen is not None:
        logits = penalize(logits, seen, rs.penalty)                        # [B, V]
    out = np.empty(len(rows), dtype=np.int64)
    for b, row in enumerate(rows):
        if rs.temperature[b] <= 0:
            out[b] = int(np.argmax(logits[b]))
            continue
        s = SamplingSettings(float(rs.temperature[b]), int(rs.top_k[b]), float(rs.top_p[b]), int(rs.seed[b]))
        out[b] = _pick(logits[b], s, row, step)
    return out


def sample_rows_params(logits, rows, seqidx, step, seed, temperature, top_k, top_p, penalty, bits, seq_base):
    """Twin of sampling.cu sample_rows_params: logits [R, V] float32; logits row r is sequence q = seqidx[r], whose
    settings are seed/temperature/top_k/top_p/penalty[q] ([Q] each) and output row rows[q]; bits [S, W] uint32
    (seen tokens of sequence q: row q - seq_base; None: no penalty) -> [R] int64."""
    q = np.asarray(seqidx, np.int64)                                       # [R]
    rs = RowSettings(np.zeros(len(q), np.int64), np.asarray(temperature, np.float64)[q],
                     np.asarray(top_k, np.int32)[q], np.asarray(top_p, np.float64)[q],
                     np.asarray(seed, np.uint64)[q], np.asarray(penalty, np.float32)[q], ((),) * len(q))
    seen = None
    if bits is not None:
        seen = seen_mask(bits, logits.shape[1])[q - seq_base] & (rs.penalty != 1)[:, None]   # [R, V]
    return select_rows(logits, np.asarray(rows, np.int64)[q], step, rs, seen)
