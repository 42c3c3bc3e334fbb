"""The NumPy backend: the CPU fallback and the oracle every CUDA kernel is tested against. It generates with
the reference GPT-2 (gpt2job/model/reference.py) and the reference token selection (model/sampling.py)."""
import numpy as np

from gpt2job.backends import Backend
from gpt2job.chunks import FINISH_LENGTH, FINISH_STOP, Completions
from gpt2job.model import reference
from gpt2job.model.sampling import select_tokens
from gpt2job.settings import GenerationSettings


class NumpyBackend(Backend):
    """The reference forward pass on the CPU, in float32, in micro-batches of `batch_size` prompts."""
    name = "numpy"

    def __init__(self, params, settings: GenerationSettings, batch_size=32):
        self.params = params
        self.settings = settings
        self.batch_size = batch_size

    def generate(self, chunk):
        prompts = chunk.prompts()
        token_lists, finish = [], []
        for s in range(0, len(prompts), self.batch_size):
            t, f = generate_batch(self.params, prompts[s:s + self.batch_size],
                                  chunk.rows[s:s + self.batch_size], self.settings)
            token_lists += t
            finish += f
        return Completions.from_lists(chunk.chunk_id, chunk.rows, token_lists, finish)

    def describe(self):
        return {"backend": self.name, "dtype": "float32", "device": "cpu"}


def generate_batch(params, prompts, rows, gs: GenerationSettings):
    """Reference generation for one batch. Returns (list of generated token lists, list of finish codes)."""
    B = len(prompts)
    cache_len = max(len(p) for p in prompts) + gs.max_new_tokens
    cache, lengths, logits = reference.prefill(params, prompts, cache_len)   # logits [B, V]
    out = [[] for _ in range(B)]
    finish = [FINISH_LENGTH] * B
    done = np.zeros(B, dtype=bool)
    for step in range(gs.max_new_tokens):
        tok = select_tokens(logits, rows, step, gs.sampling)                # [B]
        for b in np.flatnonzero(~done):
            out[b].append(int(tok[b]))
            if not gs.ignore_eos and tok[b] == gs.eos_token_id:
                done[b] = True
                finish[b] = FINISH_STOP
        if done.all() or step == gs.max_new_tokens - 1:
            break
        logits = reference.decode_step(params, cache, tok, lengths + step)   # [B, V]
    return out, finish


