"""Log-probabilities of generated tokens (--logprobs, --top-logprobs K): the reference every backend matches.

A token's log-probability is its log_softmax under the model's own distribution at that step: the raw float32
logits, before temperature, top-k / top-p and the repetition penalty (vLLM's default "raw" logprobs; transformers:
generate(..., output_logits=True), then log_softmax). Computed here in float64, stored as float32. The top K of a
step are the K largest of those, descending, ties to the lower id. The chosen token's own value is stored even when
it is not among the top K (a sampled token may not be). cuda_src/logprobs.cu computes the same per row.
"""
import numpy as np

MAX_TOP = 20     # --top-logprobs K: 0..MAX_TOP


def log_softmax(logits):
    """logits [B, V] float32 -> [B, V] float64."""
    z = np.asarray(logits, np.float32).astype(np.float64)                  # [B, V]
    m = z.max(axis=-1, keepdims=True)                                      # [B, 1]
    return z - (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))


def token_logprobs(logits, tokens, k=0):
    """logits [B, V] float32 (raw), tokens [B] the chosen ids -> (logprobs [B] float32, top ids [B, k] int32, top
    logprobs [B, k] float32)."""
    lp = log_softmax(logits)                                               # [B, V] float64
    B = lp.shape[0]
    chosen = lp[np.arange(B), np.asarray(tokens, np.int64)].astype(np.float32)
    if k <= 0:
        return chosen, np.zeros((B, 0), np.int32), np.zeros((B, 0), np.float32)
    # order of the float32 logits themselves (the GPU compares those): descending, the lower id first on ties
    lg = np.asarray(logits, np.float32)
    ids = np.empty((B, k), np.int64)
    for b in range(B):
        cand = np.argpartition(-lg[b], k - 1)[:k] if k < lg.shape[1] else np.arange(lg.shape[1])
        cut = lg[b, cand].min()                                            # the k-th largest value
        cand = np.flatnonzero(lg[b] >= cut)                                # every tie at the boundary
        ids[b] = cand[np.lexsort((cand, -lg[b, cand]))][:k]
    return chosen, ids.astype(np.int32), np.take_along_axis(lp, ids, axis=1).astype(np.float32)


class Recorder:
    """Collects a batch's per-step values row by row (the NumPy backend): rows [B] lists."""

    def __init__(self, B, k):
        self.k = k
        self.lp = [[] for _ in range(B)]
        self.ids = [[] for _ in range(B)]
        self.top = [[] for _ in range(B)]

    def add(self, rows, logits, tokens):
        """Rows rows [A] chose tokens [A] from logits [A, V] (raw)."""
        lp, ids, top = token_logprobs(logits, tokens, self.k)
        for i, b in enumerate(rows):
            self.lp[b].append(lp[i])
            self.ids[b].append(ids[i])
            self.top[b].append(top[i])

    def flat(self):
        """(logprobs [T] float32, top ids [T, k] int32 or None, top logprobs [T, k] float32 or None), the rows in
        turn, aligned with their flattened tokens."""
        order = range(len(self.lp))
        lp = np.array([x for b in order for x in self.lp[b]], np.float32)
        if not self.k:
            return lp, None, None
        ids = np.array([x for b in order for x in self.ids[b]], np.int32).reshape(-1, self.k)
        top = np.array([x for b in order for x in self.top[b]], np.float32).reshape(-1, self.k)
        return lp, ids, top
