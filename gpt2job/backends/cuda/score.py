"""Scoring on the GPU (`python -m gpt2job score`, GenerationSettings.score): no new tokens; for every row b and
position t = 1..L-1, log P(token_t | tokens_<t) under the model.

A chunk is planned without prefix sharing (Runner.prepare(..., share=False)) and run through the same prefill passes
as a generation (Runner.prefill: KV groups, passes of whole prompts), but with the last layer on every row (a
generation runs it past its keys and values on each prompt's last row alone); after each pass every position but each
prompt's last goes through ln_f and the LM head in groups of head_rows (Model.ln_f / Model.logits), and
Kernels.logprobs (cuda_src/logprobs.cu) takes the log_softmax of the next token, the "chosen" id. The values of a
pass are downloaded before the next pass (its residual stream is reused). The pure-NumPy parts (which rows, which
next tokens, the Completions) are score_rows / completions, tested on the CPU (tests/test_score.py).

Not done here: a chunk that runs out of GPU memory is not halved (generation's Runner._in_halves): the worker
reports the error and the master hands the chunk to another worker.

last_logits: the logits at each prompt's last position, downloaded (tests and fp16-vs-fp32 checks).
"""
import numpy as np

from gpt2job.backends.base import READY, Pause
from gpt2job.chunks import FINISH_LENGTH, Completions



def score_rows(offsets, tokens, pb0, pb1):
    """The rows of a prefill pass over prompts pb0..pb1-1 (flat token rows offsets[pb0]..offsets[pb1]) that predict
    a next token: (row indices [n] int32, each every position but its prompt's last, their next tokens [n] int32)."""
    offsets = np.asarray(offsets, np.int64)
    r0, r1 = int(offsets[pb0]), int(offsets[pb1])
    keep = np.ones(r1 - r0, bool)
    keep[offsets[pb0 + 1:pb1 + 1] - 1 - r0] = False        # each prompt's last position predicts nothing here
    ridx = np.arange(r0, r1, dtype=np.int64)[keep]
    return ridx.astype(np.int32), np.asarray(tokens, np.int32)[ridx + 1]


def completions(chunk, offsets, tokens, lp_at):
    """The chunk's Completions: row b's tokens 1..L-1 and their log-probabilities (lp_at [T] float32: the value
    predicting flat token t is at t), finish "length"."""
    offsets = np.asarray(offsets, np.int64)
    B = len(offsets) - 1
    mask = np.ones(int(offsets[-1]), bool)
    mask[offsets[:-1][np.diff(offsets) > 0]] = False        # each row's first token: no prediction
    offs = offsets - np.arange(B + 1) + np.concatenate([[0], np.cumsum(np.diff(offsets) == 0)])
    comp = Completions(chunk.chunk_id, np.asarray(chunk.rows, np.int64), offs,
                       np.asarray(tokens, np.int32)[mask], np.full(B, FINISH_LENGTH, np.uint8))
    comp.logprobs = np.asarray(lp_at, np.float32)[mask]
    return comp


def submit(runner, chunk, settings):
    runner.pending.append(runner.prepare(chunk, settings, False))


def run(runner):
    """The oldest submitted chunk, scored: a generator of Pauses that returns its Completions."""
    plan = runner.pending.popleft()
    try:
        return (yield from _score(runner, plan))
    finally:
        runner.done_with(plan)


def _score(runner, plan):
    dev, model, drv = runner.dev, runner.model, runner.dev.drv
    lay, chunk = plan.layout, plan.chunk
    offsets = np.asarray(lay.offsets, np.int64)
    tokens = np.asarray(chunk.tokens, np.int32)
    lens = np.diff(offsets)
    lp_at = np.zeros(int(offsets[-1]), np.float32)
    dev.compute.wait_for_event(plan.ev_up[1])
    dev.buf("logits", model.head_rows * model.Vpad * 4)     # grown before ln_f runs (as logits_to_host)
    done = 0
    if lay.B:
        for b0, b1 in runner.kv_groups(lens, 0):
            S = int(lens[b0:b1].max())
            kv = runner.kv_cache(b1 - b0, S)
            for pb0, pb1, r0, x, _ in runner.prefill(plan, b0, b1, S, kv):
                ridx, tgt = score_rows(offsets, tokens, pb0, pb1)
                n = len(ridx)
                if not n:
                    continue
                # row indices [n], next tokens [n], log-probs [n]: at a pass's most rows from the first (warm_up)
                io = dev.buf("score_io", 12 * max(n, runner.max_prefill_rows))
                dev.compute.synchronize()
                drv.memcpy_htod(io, np.concatenate([ridx, tgt]))
                for g0, m, hl in model.ln_f(x, n, io, r0):
                    logits = model.logits(hl, m)
                    model.k.logprobs(dev.compute, logits, model.Vpad, model.V, io + 4 * n + 4 * g0, 0,
                                     io + 8 * n + 4 * g0, 0, 0, m)
                out = np.empty(n, np.float32)
                dev.compute.synchronize()
                drv.memcpy_dtoh(out, io + 8 * n)
                lp_at[ridx.astype(np.int64) + 1] = out
                done += n
                yield Pause(submit=True, ready=READY, generated=done)
    return completions(chunk, offsets, tokens, lp_at)


def last_logits(runner, plan):
    """Logits [B, V] float32 at each prompt's last position of a plan prepared without sharing: the same
    prefill passes and head as a generation, the logits downloaded instead of a token selected (tests, checks)."""
    lay = plan.layout
    res = np.empty((lay.B, runner.model.V), np.float32)
    runner.dev.compute.wait_for_event(plan.ev_up[1])
    S = int(lay.lens.max())
    for b0, b1 in runner.kv_groups(np.full(lay.B, S), 0):
        kv = runner.kv_cache(b1 - b0, S)
        for pb0, pb1, _, x, at in runner.prefill(plan, b0, b1, S, kv, heads=True):
            runner.model.logits_to_host(x, pb1 - pb0, *at, res[pb0:pb1])
    return res
