"""The backend interface every worker drives, and the NumPy (CPU reference) backend.

A backend turns a chunk of prompts into completions. The chunk protocol (gpt2job/protocol.py) moves
`Chunk` and `Completions` between ranks as flat int32 buffers.
"""
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from . import reference
from .sampling import SamplingSettings, select_tokens

FINISH_LENGTH, FINISH_STOP, FINISH_INVALID = 0, 1, 2
FINISH_NAMES = {FINISH_LENGTH: "length", FINISH_STOP: "stop", FINISH_INVALID: "invalid"}


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 16
    ignore_eos: bool = False
    eos_token_id: int = 50256
    sampling: SamplingSettings = field(default_factory=SamplingSettings)


def take_ragged(offsets, values, idx):
    """Items idx (in that order, repeats allowed) of a ragged array whose item i is values[offsets[i]:offsets[i+1]],
    as a new ragged array: (offsets [len(idx)+1] int64, values), gathered without a Python loop."""
    offsets, idx = np.asarray(offsets, np.int64), np.asarray(idx, np.int64)
    lens = offsets[idx + 1] - offsets[idx]                                           # [n]
    out = np.zeros(len(idx) + 1, np.int64)                                           # [n+1]
    np.cumsum(lens, out=out[1:])
    # value t of the result is value (start of its item) + (t - start of the item in the result)
    src = np.repeat(offsets[idx] - out[:-1], lens) + np.arange(out[-1], dtype=np.int64)   # [sum of lens]
    return out, np.asarray(values)[src]


@dataclass
class Chunk:
    """A unit of work: prompts (token ids) with the input row each answers."""
    chunk_id: int
    rows: np.ndarray         # [B] int64 input row indices
    offsets: np.ndarray      # [B+1] int64 into tokens
    tokens: np.ndarray       # [sum of prompt lengths] int32

    def prompts(self):
        return [self.tokens[self.offsets[i]:self.offsets[i + 1]] for i in range(len(self.rows))]


@dataclass
class Completions:
    """Generated tokens for a chunk: row b's tokens are tokens[offsets[b]:offsets[b+1]]."""
    chunk_id: int
    rows: np.ndarray         # [B] int64
    offsets: np.ndarray      # [B+1] int64
    tokens: np.ndarray       # [sum of generated lengths] int32
    finish: np.ndarray       # [B] uint8 FINISH_* code

    @classmethod
    def from_lists(cls, chunk_id, rows, token_lists, finish):
        offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(t) for t in token_lists])
        flat = np.concatenate([np.asarray(t, np.int32) for t in token_lists]) if token_lists else \
            np.zeros(0, np.int32)
        return cls(chunk_id, np.asarray(rows, np.int64), offsets, flat.astype(np.int32),
                   np.asarray(finish, np.uint8))

    def row_tokens(self, i):
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def n_generated(self):
        return int(self.offsets[-1])


class Backend:
    """What a worker needs from a backend. Implementations: NumpyBackend, cuda_backend.CudaBackend.

    generate(chunk) computes one chunk. submit(chunk) + result() let a backend overlap work: a backend that
    calls idle_hook while its device computes gets the next chunk submitted then (its preparation and upload
    overlap the compute); without the hook the worker submits one chunk at a time. Results come back in
    submission order. The defaults here simply compute in result().
    """
    name = "abstract"
    preferred_chunk = 64     # prompts per chunk this backend runs well with
    idle_hook = None         # set by the worker: called while the device computes, to submit more work
    poll_hook = None         # set by an MPI worker: moves its result send on; True when nothing is left to send

    def generate(self, chunk: Chunk) -> Completions:
        raise NotImplementedError

    def submit(self, chunk: Chunk):
        self.__dict__.setdefault("_submitted", deque()).append(chunk)

    def result(self) -> Completions:
        return self.generate(self._submitted.popleft())

    def describe(self) -> dict:
        """Small metadata for the job summary (device name, dtype, ...)."""
        return {"backend": self.name}

    def close(self):
        pass


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


def make_backend(name, params, settings, dtype="float32", local_rank=0, share_gpus=False):
    """Build the backend a worker runs: 'numpy', 'cuda', or 'auto' (cuda when a GPU is visible)."""
    if name == "auto":
        from .devices import gpu_count, pycuda_available
        name = "cuda" if gpu_count() > 0 and pycuda_available() else "numpy"
    if name == "numpy":
        return NumpyBackend(params, settings)
    from .devices import pycuda_available
    if not pycuda_available():
        from .errors import UserError
        raise UserError("pycuda is not installed", None, "--backend cuda",
                        "pip install 'gpt2job[gpu]' on the GPU nodes, or use --backend numpy")
    from .cuda_backend import CudaBackend  # lazy: pycuda is imported only there
    return CudaBackend(params, settings, dtype=dtype, local_rank=local_rank, share_gpus=share_gpus)
