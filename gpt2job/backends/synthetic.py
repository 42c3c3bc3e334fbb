"""The synthetic backend (`--backend synthetic`), for tests and benchmarks only: no weights, no model, no device.

Its tokens are a deterministic function of the prompt and the step (greedy), or of (seed, row, prompt, step) when
sampling, so that every rule the real backends keep holds here too: a completion never depends on the rank, the
chunk or the batch it ran in, and identical prompts get identical greedy completions (dedup stays exact). A token
equal to the model's end-of-text id (unless --ignore-eos) or to a stop token id ends the row ("stop"); a chunk's
per-row max_new_tokens apply (its other per-row settings and stop strings do not). The model config (vocabulary
size, end-of-text id) comes from --model; its weights are never read or generated. It computes millions of tokens per
second on one core: the master, the journal and the output are what a job with it measures.
"""
import numpy as np

from gpt2job.backends.base import Backend
from gpt2job.chunks import FINISH_LENGTH, FINISH_STOP, Completions
from gpt2job.files.dedup import mix64
from gpt2job.settings import GenerationSettings


def _prompt_keys(offsets, tokens):
    """A 64-bit key per prompt from its tokens and length: [B] uint64."""
    offsets = np.asarray(offsets, np.int64)
    lens = np.diff(offsets)
    if len(tokens) == 0:
        return mix64(lens.astype(np.uint64))
    pos = np.arange(len(tokens), dtype=np.int64) - np.repeat(offsets[:-1], lens)        # [T] position in its row
    h = mix64(np.asarray(tokens, np.int64).astype(np.uint64) ^ (pos.astype(np.uint64) << np.uint64(32)))
    keys = np.zeros(len(lens), np.uint64)
    nonempty = lens > 0
    with np.errstate(over="ignore"):
        keys[nonempty] = np.add.reduceat(h, offsets[:-1][nonempty])
    return mix64(keys ^ lens.astype(np.uint64))


class SyntheticBackend(Backend):
    """Deterministic tokens in [0, vocab_size) without a model (tests and benchmarks)."""
    name = "synthetic"
    preferred_chunk = 8192
    batch_rows = 8192      # as a GPU worker: the worker merges smaller chunks into batches of up to this many rows

    def __init__(self, config, settings: GenerationSettings):
        self.vocab = int(config.vocab_size)
        self.settings = settings

    def generate(self, chunk):
        gs, s = self.settings, self.settings.sampling
        b = len(chunk.rows)
        mnt = (np.asarray(chunk.params.max_new_tokens, np.int64) if chunk.params is not None
               else np.full(b, gs.max_new_tokens, np.int64))                              # [B] each row's limit
        n = int(mnt.max()) if b else 0
        key = _prompt_keys(chunk.offsets, chunk.tokens)                                     # [B]
        if not s.greedy:   # sampling: the row and the seed matter too, as with the real backends
            key = mix64(key ^ mix64(np.asarray(chunk.rows, np.uint64) ^ mix64(np.full(b, s.seed, np.uint64))))
        steps = np.arange(1, n + 1, dtype=np.uint64)
        toks = (mix64(key[:, None] ^ (steps[None, :] * np.uint64(0xD1B54A32D192ED03))) % np.uint64(self.vocab))
        toks = toks.astype(np.int32)                                                        # [B, n]
        lengths = mnt.copy()
        finish = np.full(b, FINISH_LENGTH, np.uint8)
        ids = gs.stop_ids()
        if ids and n:
            stop = np.isin(toks, ids) & (np.arange(n)[None, :] < mnt[:, None])               # [B, n]
            hit = stop.any(axis=1)
            if hit.any():
                lengths[hit] = stop[hit].argmax(axis=1) + 1          # the stop token is part of the completion
                finish[hit] = FINISH_STOP
        offsets = np.zeros(b + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = toks.reshape(-1) if not (lengths < n).any() else toks[np.arange(n)[None, :] < lengths[:, None]]
        comp = Completions(chunk.chunk_id, np.asarray(chunk.rows, np.int64), offsets, flat, finish)
        if gs.logprobs:   # stand-ins of the right shapes (no model): the token's -(id % 1000) / 100, K ids after it
            comp.logprobs = (-(flat % 1000) / 100).astype(np.float32)
            if gs.top_logprobs:
                j = np.arange(gs.top_logprobs)
                comp.top_ids = ((flat[:, None] + j) % self.vocab).astype(np.int32)
                comp.top_logprobs = (comp.logprobs[:, None] - j).astype(np.float32)
        return comp

    def describe(self):
        return {"backend": self.name, "dtype": "none", "device": "cpu (synthetic tokens, no model)"}
