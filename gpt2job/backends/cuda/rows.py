"""A chunk's per-row settings on the GPU, host side (the runner's helpers): each row's own max_new_tokens, token
selection (Kernels.sample_params: own temperature / top-k / top-p / seed, repetition penalty through a seen-tokens
bitmap per KV slot), stop token ids and stop strings (model/stops.py, checked as each step's tokens reach the
host). A chunk whose rows all select alike (no RowParams, or RowParams whose rows agree: RowSettings.shared) and
without a penalty selects with the job's kernels (the fused fp16 greedy head among them): RowPlan.shared is then
those shared settings and group_sel returns None.
"""
from dataclasses import dataclass

import numpy as np

from gpt2job.backends.cuda.logprobs import step_words
from gpt2job.chunks import FINISH_STOP, FINISH_STOP_STRING
from gpt2job.model.sampling import RowSettings, seen_words, takes_rule_6
from gpt2job.model.stops import StopStrings


@dataclass(frozen=True)
class RowSel:
    """Device pointers of a KV group's per-row selection: arrays [B] of the chunk's upload (plan.Layout, run
    order), the group's seen bitmap [slots, words] uint32 (0: no penalty) whose row 0 is sequence seq_base."""
    seed: int
    temp: int
    top_p: int
    top_k: int
    penalty: int
    seen: int
    words: int
    seq_base: int
    plain: bool = False   # every row greedy or taking sampling rule 6 (no top-k / top-p), none penalized


class RowPlan:
    """The rows' settings of a planned chunk in the order its prompts run, and the host's checks of each step's
    tokens."""

    def __init__(self, rs: RowSettings, gs, vocab_size):
        self.rs = rs
        self.mnt = rs.max_new_tokens                                          # [B] each row's limit
        self.n_max = int(self.mnt.max()) if len(self.mnt) else 0
        self.shared = rs.shared()            # SamplingSettings of every row, or None: per-row selection
        self.per_row = self.shared is None
        self.penalized = rs.penalized
        ids = gs.stop_ids()
        self.eos = ids[0] if len(ids) == 1 else None   # one stop id (EOS): the comparison of before
        self.stop_ids = np.array(ids, np.int64)
        self.stops = StopStrings.of(rs.stops, gs.vocab_dir, vocab_size)   # None unless a row has stop strings

    def check(self, prows, tok, finish, out, step):
        """Tokens tok [n] of rows prows [n] (run order) reached the host, the rows' generated tokens before them in
        out[:, :step]: set the finish code of the rows they end (a stop id: FINISH_STOP, winning over a stop string
        completed by the same token); returns that mask [n]."""
        if self.eos is not None:
            ended = tok == self.eos
        else:
            ended = np.isin(tok, self.stop_ids) if len(self.stop_ids) else np.zeros(len(tok), bool)
        finish[prows[ended]] = FINISH_STOP
        if self.stops is not None:
            hit = self.stops.ends(prows, tok, lambda b: out[b, :step]) & ~ended
            finish[prows[hit]] = FINISH_STOP_STRING
            ended |= hit
        return ended


def group_sel(kernels, dev, rp: RowPlan, lay, base, b0, b1, V):
    """The RowSel of KV group b0..b1 of a chunk uploaded at device address base (None: the job's selection). With
    a penalty, the group's seen bitmap (pool buffer "seen") is cleared and set from its prompts' tokens, on the
    compute stream before the prefill's selection."""
    if not rp.per_row:
        return None
    a, B = base + lay.at_params, lay.B
    seen = words = 0
    if rp.penalized:
        words = seen_words(V)
        seen = dev.buf("seen", (b1 - b0) * words * 4)
        dev.drv.memset_d32_async(seen, 0, (b1 - b0) * words, dev.compute)
        t0, t1, TP = int(lay.ptok_off[b0]), int(lay.ptok_off[b1]), len(lay.ptok)
        at = base + lay.at_ptok
        kernels.mark_seen(dev.compute, at + 4 * t0, at + 4 * TP + 4 * t0, t1 - t0, b0, seen, words)
    t = rp.rs.temperature[b0:b1]
    plain = not rp.penalized and bool(((t <= 0) | takes_rule_6(t, rp.rs.top_k[b0:b1], rp.rs.top_p[b0:b1], V)).all())
    return RowSel(a, a + 8 * B, a + 16 * B, a + 24 * B, a + 28 * B, seen, words, b0, plain)


def option_buffers(group_rows, head_rows, model, penalty, logprobs_k):
    """(name, bytes) of the pool buffers a job's options take for KV groups of group_rows rows and head groups of
    head_rows, for the worker's reserve (runner.pool_bytes, memory_plan): a job-wide penalty's seen bitmap
    (group_sel), --logprobs' step buffer (logprobs.StepLogprobs) and, with both, the copy of a head group's raw
    logits the log-probabilities read (Model.select). A penalty that only some rows of the input ask for is not
    known at start: its bitmap grows at its first chunk, as rule 6's head buffers (Model.head_buffers) do for rows
    that sample at a temperature alone in a job that does not."""
    out = [("seen", group_rows * seen_words(model.V) * 4)] if penalty else []
    if logprobs_k is not None:
        out.append(("logprobs", 4 * step_words(group_rows, logprobs_k)))
        if penalty:
            out.append(("logits_raw", head_rows * model.Vpad * 4))
    return out
