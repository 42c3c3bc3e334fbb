"""The plain data that crosses every seam: a chunk of prompts, its completions, the finish reasons, and
their flat int64 buffer form (MPI messages and journal records). Every layer imports this; it imports
nothing of gpt2job."""
from dataclasses import dataclass

import numpy as np

FINISH_LENGTH, FINISH_STOP, FINISH_INVALID = 0, 1, 2
FINISH_NAMES = {FINISH_LENGTH: "length", FINISH_STOP: "stop", FINISH_INVALID: "invalid"}


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


# ---------------------------------------------------------------- flat buffers (MPI messages, journal records)

def encode_chunk(c: Chunk) -> np.ndarray:
    """[chunk_id, B, rows(B), offsets(B+1), tokens(T)]"""
    b = len(c.rows)
    return np.concatenate([np.array([c.chunk_id, b], np.int64), c.rows.astype(np.int64),
                           c.offsets.astype(np.int64), c.tokens.astype(np.int64)])


def decode_chunk(buf: np.ndarray) -> Chunk:
    cid, b = int(buf[0]), int(buf[1])
    rows = buf[2:2 + b].copy()
    offsets = buf[2 + b:3 + 2 * b].copy()
    tokens = buf[3 + 2 * b:].astype(np.int32)
    if len(offsets) != b + 1 or offsets[-1] != len(tokens):
        raise ValueError(f"malformed chunk buffer (chunk {cid})")
    return Chunk(cid, rows, offsets, tokens)


def encode_completions(c: Completions, compute_us=0) -> np.ndarray:
    """[chunk_id, B, compute_us, rows(B), offsets(B+1), finish(B), tokens(T)]"""
    b = len(c.rows)
    return np.concatenate([np.array([c.chunk_id, b, compute_us], np.int64), c.rows.astype(np.int64),
                           c.offsets.astype(np.int64), c.finish.astype(np.int64), c.tokens.astype(np.int64)])


def decode_completions(buf: np.ndarray):
    """-> (Completions, compute_us)"""
    cid, b, us = int(buf[0]), int(buf[1]), int(buf[2])
    p = 3
    rows = buf[p:p + b].copy(); p += b
    offsets = buf[p:p + b + 1].copy(); p += b + 1
    finish = buf[p:p + b].astype(np.uint8); p += b
    tokens = buf[p:].astype(np.int32)
    if len(offsets) != b + 1 or offsets[-1] != len(tokens) or len(finish) != b:
        raise ValueError(f"malformed completions buffer (chunk {cid})")
    return Completions(cid, rows, offsets, tokens, finish), us
