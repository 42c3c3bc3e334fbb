"""The chunk protocol: how Chunk and Completions travel between ranks (and into the journal) as
flat little-endian int64 buffers, plus the MPI tags. Only small metadata (hello, errors) is pickled."""
import numpy as np

from .backend import Chunk, Completions

TAG_WORK = 1      # master -> worker: int64 chunk buffer
TAG_STOP = 2      # master -> worker: pickled reason string
TAG_HELLO = 3     # worker -> master: pickled dict (host, backend, time to ready, preferred chunk size)
TAG_RESULT = 4    # worker -> master: int64 completions buffer
TAG_ERROR = 5     # worker -> master: pickled dict (rank, host, chunk, error, traceback)


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
