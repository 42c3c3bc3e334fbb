"""Input prompts in memory (PromptSet) and the readers of one dataset of them: token rows, or text tokenized
(files/read_input.py reads an input's prompts with them; files/prompt_checks.py validates them).

Input contract: a dataset `prompt_tokens` (variable-length int rows [N] or a 2-D int array [N, T])
or `prompts` (variable-length UTF-8 strings [N]); `prompt_tokens` wins when both exist.
"""
import hashlib
import itertools

import numpy as np

from gpt2job.errors import UserError, first_line
from gpt2job.files.h5files import read_rows

DATASET_FIX = "write a dataset 'prompts' (UTF-8 strings) or 'prompt_tokens' (int token rows); see README"

BLOCK_ROWS = 1 << 18     # prompts read, converted and checked at once: the input is streamed, never held twice
TOKENIZE_ROWS = 1 << 14  # text prompts tokenized at once: their ids are Python lists (~50 bytes a token) until packed


def to_int32(tokens):
    """Token ids as int32; an id outside int32's range becomes -1 (invalid for every vocabulary, as it was)."""
    tokens = np.asarray(tokens)
    if tokens.dtype == np.int32:
        return tokens
    if tokens.dtype.kind in "iu" and tokens.dtype.itemsize < 4:
        return tokens.astype(np.int32)
    info = np.iinfo(np.int32)
    bad = (tokens > info.max) | (tokens < info.min) if tokens.dtype.kind == "i" else tokens > info.max
    if not bad.any():
        return tokens.astype(np.int32)
    out = np.where(bad, 0, tokens).astype(np.int32)
    out[bad] = -1
    return out


def narrow_ids(vocab_size):
    """uint16 when every valid id of this vocabulary fits (GPT-2's 50,257 < 65,536), else None (int32)."""
    return np.uint16 if vocab_size is not None and 0 < vocab_size <= 1 << 16 else None


class TokenBlocks:
    """Token blocks as they are read, kept as uint16 while every id is valid for vocab_size (0 <= id < vocab_size,
    checked on the int32 ids before narrowing); the first invalid id turns the whole set back into int32, so that
    validate() reports it as it was (never a wrapped id). vocab_size None (or too large for uint16): int32."""

    def __init__(self, vocab_size=None):
        self.vocab_size = vocab_size
        self.dtype = narrow_ids(vocab_size) or np.int32
        self.blocks = []

    def fits(self, block):
        """May this int32 block be stored as self.dtype? (False turns the set back into int32.)"""
        if self.dtype == np.int32:
            return True
        if block.size and (block.min() < 0 or block.max() >= self.vocab_size):
            self.widen()
            return False
        return True

    def widen(self):
        self.dtype = np.int32
        self.blocks = [b.astype(np.int32) for b in self.blocks]

    def add(self, block):
        block = block if block.dtype == np.uint16 else to_int32(block)   # (uint16: a conversion's kept ids)
        self.fits(block)                                     # (it may widen the blocks before: append after)
        self.blocks.append(block.astype(self.dtype, copy=False))

    def result(self):
        if len(self.blocks) == 1:
            return self.blocks[0]
        return np.concatenate(self.blocks) if self.blocks else np.zeros(0, self.dtype)


class PromptSet:
    """All prompts as one flat token array: prompt i is tokens[offsets[i]:offsets[i+1]]. 2 bytes a token (uint16,
    when read for a vocabulary below 65,536 and every id is valid; else int32) and, for prompts of different
    lengths, 8 a prompt (plus 4 for its cached length): no Python object per prompt. Prompts all as long (a 2-D
    input, PromptSet.grid) hold their tokens only: offsets are made if asked for, lengths are one value broadcast."""

    def __init__(self, offsets, tokens, source, text_digest=None):
        self._offsets = np.asarray(offsets, np.int64)     # [N+1] int64 (grid() sets None: made when asked for)
        self.tokens = np.asarray(tokens)                  # [total] uint16 or int32 (an id outside int32 is -1)
        if self.tokens.dtype != np.uint16:    # uint16: only as read_prompts narrows them (every id checked)
            self.tokens = to_int32(self.tokens)
        self.source = source                              # which dataset they came from
        self.text_digest = text_digest                    # of a text input's prompts as stored (hash_texts)
        self._n = len(self._offsets) - 1
        self._lengths = None

    @classmethod
    def grid(cls, tokens, source):
        """Prompts all as long: tokens [N, T] (int32, or uint16 as read_prompts narrows them)."""
        self = cls(np.zeros(1, np.int64), tokens.reshape(-1), source)
        self._n, self._width, self._offsets = tokens.shape[0], tokens.shape[1], None
        return self

    def __repr__(self):
        return f"PromptSet({len(self)} prompts, {self.tokens.size} {self.tokens.dtype} tokens, from {self.source!r})"

    def __len__(self):
        return self._n

    @property
    def offsets(self):
        """int64 [N+1] (a grid's: made once, when first asked for; the master's paths never ask)."""
        if self._offsets is None:
            self._offsets = np.arange(self._n + 1, dtype=np.int64) * self._width
        return self._offsets

    @property
    def lengths(self):
        """int32 [N], computed once (a grid's: one value broadcast, read-only)."""
        if self._lengths is None:
            self._lengths = np.diff(self._offsets).astype(np.int32) if self._offsets is not None else \
                np.broadcast_to(np.int32(self._width), (self._n,))
        return self._lengths

    @property
    def grid_width(self):
        """T of a grid (PromptSet.grid: no offsets held), else None."""
        return self._width if self._offsets is None else None

    @property
    def width(self):
        """The prompts' common length when they all have one (a 2-D input), else None."""
        if not hasattr(self, "_width"):
            n = len(self)
            self._width = int(self.lengths[0]) if n and self.offsets[-1] == n * int(self.lengths[0]) and \
                (self.lengths == self.lengths[0]).all() else None
        return self._width

    def prompt(self, i):
        if self._offsets is None:
            return self.tokens[i * self._width:(i + 1) * self._width]
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def fingerprint(self):
        """sha256 of the offsets (little-endian int64) and the tokens (little-endian int32), a block at a time (a
        grid's offsets made a block at a time, uint16 ids hashed as the int32 they stand for: the same digest as
        int32 tokens and stored offsets). (Format 1 hashed the tokens as int64: its outputs are not resumed anyway.)"""
        h = hashlib.sha256()
        if self._offsets is not None:
            h.update(np.ascontiguousarray(self._offsets, "<i8"))
        else:
            for a in range(0, self._n + 1, BLOCK_ROWS):
                h.update(np.arange(a, min(self._n + 1, a + BLOCK_ROWS), dtype="<i8") * self._width)
        step = BLOCK_ROWS * 16
        for a in range(0, self.tokens.size, step):
            h.update(np.ascontiguousarray(self.tokens[a:a + step], "<i4"))
        return "sha256:" + h.hexdigest()[:32]

    @classmethod
    def from_lists(cls, rows, source):
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(r) for r in rows])
        tokens = np.concatenate([np.asarray(r, np.int64) for r in rows]) if rows else np.zeros(0, np.int64)
        return cls(offsets, tokens, source)

    @classmethod
    def from_pieces(cls, lengths, tokens, source):
        """From lists of per-block arrays (lengths of the prompts, their tokens)."""
        lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if isinstance(tokens, list):
            tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
        return cls(offsets, tokens, source)


PROMPT_DATASETS = ("prompt_tokens", "prompts")   # an input's prompts: the first of these it has is read


def read_token_dataset(path, ds, vocab_size=None):
    import h5py
    field = ds.name.lstrip("/")   # prompt_tokens (score: context_tokens, continuation_tokens)
    if not isinstance(ds, h5py.Dataset):
        raise UserError("is a group, not a dataset", path, field, DATASET_FIX)
    vlen = h5py.check_vlen_dtype(ds.dtype)
    if vlen is not None:
        if ds.ndim != 1 or not isinstance(vlen, np.dtype) or vlen.kind not in "iu":
            raise UserError(f"variable-length rows must be integers in a 1-D dataset (got {vlen}, ndim {ds.ndim})",
                            path, field, "store token ids as vlen int32 rows [N]")
    elif ds.dtype.kind not in "iu" or ds.ndim != 2:
        raise UserError(f"must be integer token ids, [N, T] or variable-length rows (got dtype {ds.dtype}, "
                        f"shape {ds.shape})", path, field, "store token ids as int32")
    no_rows(ds, path, field)
    try:
        n = ds.shape[0]
        if vlen is not None:
            lengths, tokens = [], TokenBlocks(vocab_size)
            for a in range(0, n, BLOCK_ROWS):
                rows = read_rows(ds, a, a + BLOCK_ROWS)
                lengths.append(np.fromiter(map(len, rows), np.int64, len(rows)))
                tokens.add(np.concatenate(rows) if lengths[-1].sum() else np.zeros(0, np.int32))
            return PromptSet.from_pieces(lengths, tokens.result(), field)
        t = ds.shape[1]
        blocks = TokenBlocks(vocab_size)
        tokens = np.empty((n, t), blocks.dtype)                                  # [N, T]
        buf = np.empty((min(n, BLOCK_ROWS), t), np.int32) if ds.dtype == np.int32 else None
        for a in range(0, n, BLOCK_ROWS):
            b = min(n, a + BLOCK_ROWS)
            if buf is not None and tokens.dtype == np.int32:
                ds.read_direct(tokens, np.s_[a:b], np.s_[a:b])
                continue
            if buf is not None:
                block = buf[:b - a]
                ds.read_direct(block, np.s_[a:b], np.s_[:b - a])
            else:
                block = to_int32(ds[a:b])
            if not blocks.fits(block):           # an invalid id: int32 from here on, as it was
                wide = np.empty((n, t), np.int32)
                wide[:a] = tokens[:a]
                tokens = wide
            tokens[a:b] = block
    except (OSError, RuntimeError) as e:
        raise UserError(f"cannot be read ({first_line(e)})", path, field,
                        "the file is damaged; write it again")
    return PromptSet.grid(tokens, field)


def no_rows(ds, path, field):
    """A dataset of 0 rows is refused, as a text file without a prompt is: a job of nothing is a mistake."""
    if ds.shape[0] == 0:
        raise UserError("has 0 rows: there is nothing to compute", path, field,
                        "give an input of at least one row")


def read_text_dataset(path, ds, tokenizer_factory, vocab_size=None):
    import h5py
    field = ds.name.lstrip("/")   # prompts (score: context, continuation)
    if not isinstance(ds, h5py.Dataset):
        raise UserError("is a group, not a dataset", path, field, DATASET_FIX)
    if ds.ndim != 1 or (h5py.check_string_dtype(ds.dtype) is None and ds.dtype.kind not in "SUO"):
        raise UserError(f"must be a 1-D dataset of strings (got dtype {ds.dtype}, shape {ds.shape})", path, field,
                        f"write {field} as variable-length UTF-8 strings")
    no_rows(ds, path, field)
    from gpt2job.model.tokenizer import encode_texts
    enc = None
    lengths, tokens, digest = [], TokenBlocks(vocab_size), hashlib.sha256()
    for a in range(0, ds.shape[0], BLOCK_ROWS):
        try:
            raw = read_rows(ds, a, a + BLOCK_ROWS)
        except (OSError, RuntimeError) as e:
            raise UserError(f"cannot be read ({first_line(e)})", path, field,
                            "the file is damaged; write it again")
        hash_texts(digest, raw)   # (by blocks of BLOCK_ROWS: outputs record the digest; export checks it)
        texts = []
        for i, s in enumerate(raw, a):
            if isinstance(s, bytes):
                try:
                    s = s.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise UserError(f"row {i} is not valid UTF-8 ({e.reason} at byte {e.start})", path, field,
                                    "store prompts as UTF-8 text, or give token ids in 'prompt_tokens'")
            elif not isinstance(s, str):
                s = str(s)
            texts.append(s)
        del raw
        enc = enc or tokenizer_factory()
        for b in range(0, len(texts), TOKENIZE_ROWS):
            rows = encode_texts(enc, texts[b:b + TOKENIZE_ROWS])
            lengths.append(np.fromiter(map(len, rows), np.int64, len(rows)))
            tokens.add(np.fromiter(itertools.chain.from_iterable(rows), np.int32, int(lengths[-1].sum())))
    prompts = PromptSet.from_pieces(lengths, tokens.result(), "prompts")
    prompts.text_digest = "sha256:" + digest.hexdigest()[:32]
    return prompts


def texts_digest(ds, read=None):
    """The digest of a text prompts dataset as stored, read a block at a time (by read(ds, a, b), default ds[a:b]):
    what read_text_dataset records as PromptSet.text_digest (an output's input_text_digest; export checks it,
    read_prompts checks kept ids by it)."""
    h = hashlib.sha256()
    for a in range(0, len(ds), BLOCK_ROWS):
        hash_texts(h, ds[a:a + BLOCK_ROWS] if read is None else read(ds, a, a + BLOCK_ROWS))
    return "sha256:" + h.hexdigest()[:32]


def hash_texts(h, rows):
    """Add a block of BLOCK_ROWS text prompts as stored (bytes; str as UTF-8) to the digest h: their lengths, then
    their bytes. The output records the input's (input_text_digest): export pairs completions with prompts only
    while the input still holds the same ones."""
    data = [r if isinstance(r, bytes) else str(r).encode("utf-8") for r in rows]
    h.update(np.fromiter(map(len, data), np.int64, len(data)).astype("<i8").tobytes())
    h.update(b"".join(data))
