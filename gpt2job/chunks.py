"""The plain data that crosses every seam: a chunk of prompts, its completions, the finish reasons, and
their flat int64 buffer form (MPI messages; token ids travel as int32, two to a word). Every layer imports this; it
imports nothing of gpt2job."""
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

# FINISH_STOP: the last token is EOS or a stop token id; FINISH_STOP_STRING: the text contains a stop string (the
# completion's text ends before it; the tokens keep all that was generated). Both are "stop" in the output.
FINISH_LENGTH, FINISH_STOP, FINISH_INVALID, FINISH_STOP_STRING = 0, 1, 2, 3
FINISH_NAMES = {FINISH_LENGTH: "length", FINISH_STOP: "stop", FINISH_INVALID: "invalid", FINISH_STOP_STRING: "stop"}


def take_ragged(offsets, values, idx):
    """Items idx (in that order, repeats allowed) of a ragged array whose item i is values[offsets[i]:offsets[i+1]],
    as a new ragged array: (offsets [len(idx)+1] int64, values), gathered without a Python loop."""
    offsets, idx = np.asarray(offsets, np.int64), np.asarray(idx, np.int64)
    first = offsets[idx]                                                             # [n]
    lens = offsets[idx + 1] - first
    out = np.zeros(len(idx) + 1, np.int64)                                           # [n+1]
    np.cumsum(lens, out=out[1:])
    if lens.size and not lens.all():     # an empty item takes no place: the steps below go from item to item
        first, lens = first[lens > 0], lens[lens > 0]
    # the source index of each value taken: +1 from one value to the next within an item, and at an item's start
    # the step from the previous item's last value to its first; their running sum (one pass fewer than
    # repeat + arange + add)
    src = np.ones(int(out[-1]), np.int64)                                            # [sum of lens]
    if src.size:
        at = np.cumsum(lens[:-1])
        src[0] = first[0]
        src[at] = first[1:] - (first[:-1] + lens[:-1] - 1)
        np.cumsum(src, out=src)
    return out, np.asarray(values)[src]


# The per-row generation settings a chunk may carry (the input file's optional datasets of the same names), in
# this order on the wire: (name, dtype).
ROW_FIELDS = (("max_new_tokens", np.int32), ("temperature", np.float64), ("top_k", np.int32), ("top_p", np.float64),
              ("seed", np.int64), ("repetition_penalty", np.float32))


def pack_stops(stops):
    """A row's stop strings as RowParams stores them: UTF-8, a NUL after each."""
    return b"".join(s.encode("utf-8") + b"\0" for s in stops)


def unpack_stops(raw):
    """pack_stops' bytes back to the tuple of str."""
    return tuple(x.decode("utf-8") for x in bytes(raw).split(b"\0")[:-1])


@dataclass
class RowParams:
    """The generation settings of each row of a chunk, every value resolved (the job's flag where the input file has
    none for the row): arrays [B] named as ROW_FIELDS, and each row's stop strings, UTF-8 with a NUL after each:
    row b's are stop_bytes[stop_offsets[b]:stop_offsets[b+1]]. A chunk without RowParams uses the job's settings for
    every row (the usual case: nothing more crosses MPI)."""
    max_new_tokens: np.ndarray      # [B] int32 >= 1
    temperature: np.ndarray         # [B] float64 >= 0 (0: greedy); float64 as the flag: a row without a value
                                    # draws exactly as a job without the dataset
    top_k: np.ndarray               # [B] int32 >= 0 (0: off)
    top_p: np.ndarray               # [B] float64 in (0, 1]
    seed: np.ndarray                # [B] int64 >= 0
    repetition_penalty: np.ndarray  # [B] float32 > 0 (1: off)
    stop_offsets: np.ndarray        # [B+1] int64
    stop_bytes: np.ndarray          # [stop_offsets[-1]] uint8

    def all_stops(self):
        """Every row's stop strings, [B] tuples of str: each distinct row decoded once (rows mostly share theirs;
        one decode a row took ~5 ms for 2,048 rows, while the first chunk's GPU waits)."""
        raw, so, seen = bytes(self.stop_bytes), self.stop_offsets.tolist(), {}
        return tuple(seen[r] if r in seen else seen.setdefault(r, unpack_stops(r))
                     for r in (raw[a:b] for a, b in zip(so, so[1:])))

    def take(self, idx):
        """Rows idx (in that order) as a RowParams of their own."""
        idx = np.asarray(idx, np.int64)
        so, sb = take_ragged(self.stop_offsets, self.stop_bytes, idx)
        return RowParams(*(np.asarray(getattr(self, n))[idx] for n, _ in ROW_FIELDS), so, sb.astype(np.uint8))

    @classmethod
    def of(cls, stops=None, **arrays):
        """From arrays named as ROW_FIELDS and stops: a list (one entry per row) of sequences of str."""
        vals = [np.ascontiguousarray(arrays[n], t) for n, t in ROW_FIELDS]
        B = len(vals[0])
        stops = stops if stops is not None else [()] * B
        blobs = [pack_stops(row) for row in stops]
        so = np.zeros(B + 1, np.int64)
        np.cumsum([len(b) for b in blobs], out=so[1:])
        return cls(*vals, so, np.frombuffer(b"".join(blobs), np.uint8).copy())


@dataclass
class Chunk:
    """A unit of work: prompts (token ids) with the output row each answers, and (optionally) per-row settings."""
    chunk_id: int
    rows: np.ndarray         # [B] int64 output rows (with --num-samples N, row r answers prompt r // N)
    offsets: np.ndarray      # [B+1] int64 into tokens
    tokens: np.ndarray       # [sum of prompt lengths] int32
    params: Optional[RowParams] = None

    def prompts(self):
        return [self.tokens[self.offsets[i]:self.offsets[i + 1]] for i in range(len(self.rows))]


_NONE = np.zeros(0, np.int64)


@dataclass
class Completions:
    """Generated tokens for a chunk: row b's tokens are tokens[offsets[b]:offsets[b+1]]. On the master, rows whose
    prompt repeats one of these rows (greedy dedup) may ride along without tokens of their own: copy_rows[c] has the
    completion of rows[copy_src[c]]."""
    chunk_id: int
    rows: np.ndarray         # [B] int64
    offsets: np.ndarray      # [B+1] int64
    tokens: np.ndarray       # [sum of generated lengths] int32
    finish: np.ndarray       # [B] uint8 FINISH_* code
    copy_rows: np.ndarray = field(default_factory=lambda: _NONE)    # [C] int64
    copy_src: np.ndarray = field(default_factory=lambda: _NONE)     # [C] int64 index into rows
    # with GenerationSettings.logprobs: each generated token's log-probability under the model (log_softmax of the
    # raw logits), aligned with tokens; with top_logprobs K > 0 also the K most likely ids of each step and theirs
    logprobs: Optional[np.ndarray] = None       # [sum of generated lengths] float32
    top_ids: Optional[np.ndarray] = None        # [sum of generated lengths, K] int32
    top_logprobs: Optional[np.ndarray] = None   # [sum of generated lengths, K] float32

    @property
    def all_rows(self):
        """rows, then copy_rows: [B + C]."""
        return np.concatenate([self.rows, self.copy_rows]) if len(self.copy_rows) else self.rows

    @property
    def all_finish(self):
        return np.concatenate([self.finish, self.finish[self.copy_src]]) if len(self.copy_rows) else self.finish

    @property
    def top_k(self):
        """K of the top log-probabilities (0: none stored)."""
        return 0 if self.top_ids is None else int(np.shape(self.top_ids)[1])

    def logprob_arrays(self, k):
        """(logprobs [T] float32, top ids [T, k] int32, top logprobs [T, k] float32); where it has none (rows
        marked invalid have no tokens; a backend without them): NaN and id -1."""
        t = int(self.offsets[-1])
        lp = self.logprobs if self.logprobs is not None else np.full(t, np.nan, np.float32)
        have_top = self.top_ids is not None and self.top_k == k
        ids = self.top_ids if have_top else np.full((t, k), -1, np.int32)
        top = self.top_logprobs if have_top else np.full((t, k), np.nan, np.float32)
        return np.asarray(lp, np.float32), np.asarray(ids, np.int32), np.asarray(top, np.float32)

    def expanded(self):
        """The copies as rows of their own (with their tokens and log-probabilities), after the rows."""
        if not len(self.copy_rows):
            return self
        idx = np.concatenate([np.arange(len(self.rows)), self.copy_src])
        out = self.take(idx)
        out.rows = self.all_rows
        return out

    def take(self, idx):
        """Rows idx (of rows, in that order, repeats allowed) as Completions of their own, without copies; their
        log-probabilities go with their tokens."""
        idx = np.asarray(idx, np.int64)
        offsets, tokens = take_ragged(self.offsets, self.tokens, idx)
        out = Completions(self.chunk_id, np.asarray(self.rows)[idx], offsets, tokens, np.asarray(self.finish)[idx])
        for name in ("logprobs", "top_ids", "top_logprobs"):
            if getattr(self, name) is not None:
                setattr(out, name, take_ragged(self.offsets, getattr(self, name), idx)[1])
        return out

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
        """Tokens of the rows, copies included."""
        n = int(self.offsets[-1])
        if len(self.copy_rows):
            n += int((self.offsets[self.copy_src + 1] - self.offsets[self.copy_src]).sum())
        return n


def merge_chunks(chunks):
    """Chunks as one batch, with the first one's chunk_id: their rows one after the other, each row's settings kept
    (all the chunks have RowParams, or none has). split_completions undoes it."""
    if len(chunks) == 1:
        return chunks[0]
    lens = np.concatenate([np.diff(np.asarray(c.offsets, np.int64)) for c in chunks])
    offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    params = None
    if chunks[0].params is not None:
        ps = [c.params for c in chunks]
        base = np.cumsum([0] + [int(p.stop_offsets[-1]) for p in ps[:-1]])     # where each chunk's stop bytes go
        so = np.concatenate([np.zeros(1, np.int64)] + [np.asarray(p.stop_offsets[1:], np.int64) + o
                                                       for p, o in zip(ps, base)])
        params = RowParams(*(np.concatenate([getattr(p, n) for p in ps]) for n, _ in ROW_FIELDS), so,
                           np.concatenate([np.asarray(p.stop_bytes, np.uint8) for p in ps]))
    return Chunk(chunks[0].chunk_id, np.concatenate([np.asarray(c.rows, np.int64) for c in chunks]), offsets,
                 np.concatenate([np.asarray(c.tokens, np.int32) for c in chunks]), params)


def split_completions(comp, members):
    """The Completions of a merged batch (merge_chunks) as its chunks' own: members [(chunk_id, rows)] in the
    batch's order. Each is a slice of the batch's arrays (views: a batch has up to thousands of chunks)."""
    out, b = [], 0
    for chunk_id, n in members:
        t0, t1 = int(comp.offsets[b]), int(comp.offsets[b + n])
        part = Completions(chunk_id, comp.rows[b:b + n], comp.offsets[b:b + n + 1] - t0, comp.tokens[t0:t1],
                           comp.finish[b:b + n])
        for name in ("logprobs", "top_ids", "top_logprobs"):
            if getattr(comp, name) is not None:
                setattr(part, name, getattr(comp, name)[t0:t1])
        out.append(part)
        b += n
    return out


def concat_completions(comps, chunk_id=-1):
    """Several Completions as one, their rows one after the other (a chunk computed in parts, or a group of results
    for the writer); their copies ride along, and log-probabilities where any of them has some (logprob_arrays).
    One: itself (its own chunk_id)."""
    if len(comps) == 1:
        return comps[0]
    lens = np.concatenate([np.diff(c.offsets) for c in comps])
    offsets = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=offsets[1:])
    base = np.cumsum([0] + [len(c.rows) for c in comps[:-1]])
    out = Completions(chunk_id, np.concatenate([c.rows for c in comps]).astype(np.int64), offsets,
                      np.concatenate([c.tokens for c in comps]).astype(np.int32),
                      np.concatenate([c.finish for c in comps]).astype(np.uint8),
                      np.concatenate([c.copy_rows for c in comps]).astype(np.int64),
                      np.concatenate([c.copy_src + k for c, k in zip(comps, base)]).astype(np.int64))
    if any(c.logprobs is not None for c in comps):
        k = max(c.top_k for c in comps)
        parts = [c.logprob_arrays(k) for c in comps]
        out.logprobs = np.concatenate([p[0] for p in parts])
        if k:
            out.top_ids = np.concatenate([p[1] for p in parts])
            out.top_logprobs = np.concatenate([p[2] for p in parts])
    return out


# ---------------------------------------------------------------- flat buffers (MPI messages)

def _pack32(tokens):
    """int32 tokens as the int64 words that hold them two by two (the last one padded)."""
    t = np.asarray(tokens, np.int32)
    if len(t) % 2:
        t = np.append(t, np.int32(0))
    return np.ascontiguousarray(t).view(np.int64)


def _unpack32(words, n):
    return np.ascontiguousarray(words).view(np.int32)[:n]


def _encode_params(p: RowParams):
    """RowParams as int64 words: each ROW_FIELDS array as int64 (floats by their float64 bits), stop_offsets
    (B+1), then the stop bytes padded to whole words."""
    cols = [np.asarray(getattr(p, n)).astype(np.float64).view(np.int64) if np.dtype(t).kind == "f"
            else np.asarray(getattr(p, n), np.int64) for n, t in ROW_FIELDS]
    sb = np.asarray(p.stop_bytes, np.uint8)
    pad = np.zeros((-len(sb)) % 8, np.uint8)
    return np.concatenate(cols + [np.asarray(p.stop_offsets, np.int64), np.concatenate([sb, pad]).view(np.int64)])


def _decode_params(words, b):
    cols, p = [], 0
    for n, t in ROW_FIELDS:
        w = words[p:p + b]; p += b
        cols.append(w.view(np.float64).astype(t) if np.dtype(t).kind == "f" else w.astype(t))
    so = words[p:p + b + 1].copy(); p += b + 1
    sb = np.ascontiguousarray(words[p:]).view(np.uint8)[:int(so[-1])].copy()
    return RowParams(*cols, so, sb)


def encode_chunk(c: Chunk) -> np.ndarray:
    """[chunk_id, B, T, P, rows(B), offsets(B+1), tokens (T int32, two to a word), params (P words)]"""
    b, t = len(c.rows), int(c.offsets[-1]) if len(c.offsets) else 0
    params = _encode_params(c.params) if c.params is not None else np.zeros(0, np.int64)
    return np.concatenate([np.array([c.chunk_id, b, t, len(params)], np.int64), np.asarray(c.rows, np.int64),
                           np.asarray(c.offsets, np.int64), _pack32(c.tokens), params])


def decode_chunk(buf: np.ndarray) -> Chunk:
    cid, b, t, n_params = int(buf[0]), int(buf[1]), int(buf[2]), int(buf[3])
    rows = buf[4:4 + b].copy()
    offsets = buf[4 + b:5 + 2 * b].copy()
    end = len(buf) - n_params
    words = buf[5 + 2 * b:end]
    if len(offsets) != b + 1 or offsets[-1] != t or len(words) != (t + 1) // 2 or n_params < 0:
        raise ValueError(f"malformed chunk buffer (chunk {cid})")
    params = _decode_params(buf[end:], b) if n_params else None
    return Chunk(cid, rows, offsets, _unpack32(words, t).copy(), params)


def encode_completions(c: Completions, compute_us=0) -> np.ndarray:
    """[chunk_id, B, compute_us, T, rows(B), offsets(B+1), finish(B), tokens (T int32, two to a word)], then only
    with log-probabilities: [K, logprobs (T float32), top ids (T x K int32), top logprobs (T x K float32)], each
    two to a word (without them the message is what it was before log-probabilities existed)."""
    b, t = len(c.rows), int(c.offsets[-1])
    parts = [np.array([c.chunk_id, b, compute_us, t], np.int64), np.asarray(c.rows, np.int64),
             np.asarray(c.offsets, np.int64), np.asarray(c.finish, np.int64), _pack32(c.tokens)]
    if c.logprobs is not None:
        k = c.top_k
        parts += [np.array([k], np.int64), _pack32(np.asarray(c.logprobs, np.float32).view(np.int32))]
        if k:
            parts += [_pack32(np.asarray(c.top_ids, np.int32).reshape(-1)),
                      _pack32(np.asarray(c.top_logprobs, np.float32).reshape(-1).view(np.int32))]
    return np.concatenate(parts)


def decode_completions(buf: np.ndarray):
    """-> (Completions, compute_us); its tokens are a view of buf."""
    cid, b, us, t = int(buf[0]), int(buf[1]), int(buf[2]), int(buf[3])
    p = 4
    rows = buf[p:p + b]; p += b
    offsets = buf[p:p + b + 1]; p += b + 1
    finish = buf[p:p + b].astype(np.uint8); p += b
    nw = (t + 1) // 2
    words, rest = buf[p:p + nw], buf[p + nw:]
    if len(offsets) != b + 1 or offsets[-1] != t or len(finish) != b or len(words) != nw:
        raise ValueError(f"malformed completions buffer (chunk {cid})")
    c = Completions(cid, rows, offsets, _unpack32(words, t), finish)
    if len(rest):    # log-probabilities
        k = int(rest[0])
        nk = (t * k + 1) // 2
        if k < 0 or len(rest) != 1 + nw + (2 * nk if k else 0):
            raise ValueError(f"malformed completions buffer (chunk {cid})")
        c.logprobs = _unpack32(rest[1:1 + nw], t).view(np.float32)
        if k:
            c.top_ids = _unpack32(rest[1 + nw:1 + nw + nk], t * k).reshape(t, k)
            c.top_logprobs = _unpack32(rest[1 + nw + nk:], t * k).view(np.float32).reshape(t, k)
    return c, us
