"""The `completions` text of many rows at once, without a Python step per row: each token's bytes come from a table
(built once from the tokenizer) and the rows' bytes are gathered with NumPy. Only rows holding a token that is not
valid UTF-8 on its own (~0.7% of GPT-2's tokens) are checked (UTF-8, NUL bytes), and the rows that are not exact
(invalid UTF-8, a NUL byte, a token the tokenizer does not know) are decoded again with replacements. row_text is
the definition: batch_text gives exactly what row_text gives for every row.

Stop strings: the text of a row that stopped (FINISH_STOP_STRING, or FINISH_STOP with stop strings) ends before the
earliest occurrence of any of its stop strings (vLLM's output: the stop string is not part of the text). Such rows
take the slow path (cut_rows), row by row.
"""
import codecs
from typing import NamedTuple

import numpy as np

from gpt2job.chunks import FINISH_STOP, FINISH_STOP_STRING, take_ragged

TEXT_ROWS = 1 << 12     # rows decoded to text at once (RowText)


class Text(NamedTuple):
    """The text of n rows (RowText.make): NUL-terminated UTF-8 strings in one buffer."""
    buf: np.ndarray      # uint8: the strings, each ending in a NUL
    starts: np.ndarray   # int64 [n]: each row's string in buf (in row order, except rows redone or cut after it)
    sizes: np.ndarray    # int64 [n]: each string's bytes without its NUL
    exact: np.ndarray    # bool [n]: the text is the tokens' bytes (no U+FFFD replacements)
    hits: dict           # {row index: the stop string the row's text was cut before}


def row_text(enc, tokens, finish):
    """Decoded text of one row (without a stop token) and whether it is exact (no replacement needed); with stop
    strings: row_text_stop."""
    text, exact, _ = row_text_stop(enc, tokens, finish)
    return text, exact


def row_text_stop(enc, tokens, finish, stops=()):
    """row_text's (text, exact), cut before the row's first stop string when it stopped, and the stop string the
    text was cut before (None when not cut)."""
    toks = tokens[:-1] if finish == FINISH_STOP and len(tokens) else tokens
    try:
        raw = enc.decode_bytes([int(t) for t in toks])
    except (KeyError, ValueError, OverflowError):
        return "", False, None
    hit = None
    if stops and finish in (FINISH_STOP, FINISH_STOP_STRING):
        raw, hit = cut_at_stop(raw, stops)
    try:
        text = raw.decode("utf-8")
        exact = True
    except UnicodeDecodeError:
        text, exact = raw.decode("utf-8", errors="replace"), False
    if "\x00" in text:  # HDF5 strings cannot hold NUL
        text, exact = text.replace("\x00", "\ufffd"), False
    return text, exact, hit


def cut_at_stop(raw, stops):
    """(raw before the earliest occurrence of any of the stop strings, that stop string) or (raw, None). The search
    is on the bytes, so a stop string split across tokens (or within one) is found; at one place the first listed
    wins."""
    at, hit = len(raw) + 1, None
    for s in stops:
        i = raw.find(s.encode("utf-8"))
        if 0 <= i < at:
            at, hit = i, s
    return (raw[:at], hit) if hit is not None else (raw, None)


class TokenText:
    """The tokenizer's bytes of every token id, as one flat table (its last entry a NUL byte), for batch_text."""

    def __init__(self, enc):
        self.enc = enc
        self.n_vocab = enc.n_vocab
        blobs = [enc.decode_single_token_bytes(t) for t in range(self.n_vocab)] + [b"\0"]
        self.offsets = np.zeros(len(blobs) + 1, np.int64)
        np.cumsum([len(b) for b in blobs], out=self.offsets[1:])
        self.bytes = np.frombuffer(b"".join(blobs), np.uint8)
        # plain[t]: token t's bytes are valid UTF-8 on their own and hold no NUL (all but ~350 of GPT-2's). A row of
        # plain tokens is exact (valid UTF-8 strings joined are valid UTF-8): only the other rows are checked.
        self.plain = np.array([b"\0" not in b and _is_utf8(b) for b in blobs[:-1]], bool)

    def batch_text(self, offsets, tokens, finish):
        """The text of B rows (row b's tokens: tokens[offsets[b]:offsets[b+1]]) as one buffer of NUL-terminated
        UTF-8 strings: -> (buffer uint8, starts int64 [B] of each string in it (not in row order when some row is not
        exact), sizes int64 [B] of each string without its NUL, exact bool [B])."""
        offsets, tokens = np.asarray(offsets, np.int64), np.asarray(tokens)
        finish = np.asarray(finish)
        n = len(offsets) - 1
        lens = np.diff(offsets)
        drop = (finish == FINISH_STOP) & (lens > 0)                                 # [B] rows ending in a stop token
        if drop.any():                                                              # ... which has no text
            kept = np.ones(len(tokens), bool)
            kept[offsets[1:][drop] - 1] = False
            tokens, lens = tokens[kept], lens - drop
            offsets = _cumsum0(lens)
        known = (tokens >= 0) & (tokens < self.n_vocab)
        unknown = np.zeros(n, bool)                                                 # rows with an unknown id: ""
        if not known.all():
            unknown[_row_of(offsets, np.flatnonzero(~known))] = True
            tokens = np.where(known, tokens, 0)
        # the token sequence to look up: each row's tokens, then the table's NUL entry
        seq = np.empty(len(tokens) + n, np.int64)
        is_nul = np.zeros(len(seq), bool)
        is_nul[offsets[1:] + np.arange(n)] = True
        seq[is_nul] = self.n_vocab
        seq[~is_nul] = tokens
        byte_start, buf = take_ragged(self.offsets, self.bytes, seq)
        starts = np.append(byte_start[offsets[:-1] + np.arange(n)], len(buf))     # [B+1]
        # rows that are not exact: an unknown id, or (checked on their bytes) not UTF-8 or a NUL inside
        slow = unknown.copy()
        check = np.zeros(n, bool)
        check[_row_of(offsets, np.flatnonzero(~self.plain[tokens]))] = True
        check = np.flatnonzero(check & ~unknown)
        inner = np.zeros(0, np.int64)                                               # positions in buf of inner NULs
        if len(check):
            spans = np.diff(starts)[check]
            src = _ranges(starts, check, spans)                                     # their bytes, each with its NUL
            sub = buf[src]
            sub_starts = _cumsum0(spans)
            zeros = np.flatnonzero(sub == 0)
            sub_inner = zeros[:0]
            if len(zeros) > len(check):      # a NUL inside a row: more than one NUL byte before the next row's start
                is_end = np.zeros(len(sub), bool)
                is_end[sub_starts[1:] - 1] = True
                sub_inner = zeros[~is_end[zeros]]
            bad = np.zeros(len(check), bool)
            if len(sub_inner):
                bad[_row_of(sub_starts, sub_inner)] = True
            try:      # the NUL after each row ends every character: one call checks them all
                codecs.utf_8_decode(sub, "strict", True)
            except UnicodeDecodeError:
                bad |= _invalid_rows(sub, sub_starts, sub_inner)
            slow[check[bad]] = True
            inner = src[sub_inner]
        sizes = np.diff(starts) - 1
        if not slow.any():
            return buf, starts[:-1], sizes, ~slow
        # the other rows as row_text makes them: U+FFFD for what is not UTF-8 and for NUL ("" when an id is unknown),
        # all decoded at once: each row and its NUL, a NUL inside a row made 0xFF (U+FFFD either way). Their text
        # goes after the buffer, and their starts point there.
        redo = np.flatnonzero(slow & ~unknown)
        rep = np.zeros(0, np.uint8)
        if len(redo):
            src = _ranges(starts, redo, np.diff(starts)[redo])
            raw = buf[src]
            if len(inner):
                raw[np.isin(src, inner)] = 0xFF
            rep = np.frombuffer(codecs.utf_8_decode(raw, "replace", True)[0].encode(), np.uint8)
        out = np.concatenate([buf, rep, np.zeros(1, np.uint8)])        # the last byte: the text of unknown rows, ""
        starts = starts[:-1].copy()
        starts[unknown], sizes[unknown] = len(out) - 1, 0
        if len(redo):
            ends = np.flatnonzero(rep == 0)                                # each redone row's NUL in rep
            firsts = np.append(0, ends[:-1] + 1)
            starts[redo], sizes[redo] = len(buf) + firsts, ends - firsts
        return out, starts, sizes, ~slow


def _is_utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _row_of(offsets, positions):
    """The row of each position (offsets [B+1]: row b holds positions offsets[b]..offsets[b+1]-1): int64."""
    return np.searchsorted(offsets, positions, side="right") - 1


def cut_rows(enc, text, offsets, tokens, finish, stops_of):
    """Rows of a batch_text result (text = (buffer, starts, sizes, exact)) whose text a stop string cuts, redone by
    row_text_stop: stops_of(b) gives row b's stop strings. -> (buffer, starts, sizes, exact, {b: the stop string}); the
    redone rows' text goes after the buffer."""
    buf, starts, sizes, exact = text
    finish = np.asarray(finish)
    extra, hits, at = [], {}, len(buf)
    starts, sizes, exact = starts.copy(), sizes.copy(), exact.copy()
    for b in np.flatnonzero((finish == FINISH_STOP) | (finish == FINISH_STOP_STRING)).tolist():
        stops = stops_of(b)
        if not stops:
            continue
        t, ok, hit = row_text_stop(enc, tokens[offsets[b]:offsets[b + 1]], int(finish[b]), stops)
        if hit is None:
            continue
        hits[b] = hit
        piece = t.encode("utf-8") + b"\0"
        extra.append(piece)
        starts[b], sizes[b], exact[b] = at, len(piece) - 1, ok
        at += len(piece)
    if extra:
        buf = np.concatenate([buf, np.frombuffer(b"".join(extra), np.uint8)])
    return buf, starts, sizes, exact, hits


def _invalid_rows(buf, starts, inner):
    """bool [B]: rows that are not valid UTF-8. Everything is decoded at once, each invalid byte escaped to a lone
    surrogate (U+DC80..U+DCFF: valid UTF-8 never gives one); a code point's row is the number of NULs before it."""
    if len(inner):     # a NUL inside a row would shift the count: make it another ASCII byte, valid either way
        buf = buf.copy()
        buf[inner] = 1
    cp = np.frombuffer(codecs.utf_8_decode(buf, "surrogateescape", True)[0].encode("utf-32-le", "surrogatepass"),
                       np.uint32)
    bad = np.flatnonzero((cp >= 0xDC80) & (cp <= 0xDCFF))
    invalid = np.zeros(len(starts) - 1, bool)
    invalid[np.searchsorted(np.flatnonzero(cp == 0), bad)] = True
    return invalid


def _ranges(starts, rows, lens):
    """Concatenated aranges starts[r] .. starts[r] + lens[k] over rows r = rows[k]: int64 [sum of lens]."""
    lens = np.asarray(lens, np.int64)
    first = np.asarray(starts, np.int64)[rows]
    done = _cumsum0(lens)
    return np.repeat(first - done[:-1], lens) + np.arange(done[-1], dtype=np.int64)


def _cumsum0(x):
    """[0, x0, x0+x1, ...]: int64 [len(x)+1]."""
    out = np.zeros(len(x) + 1, np.int64)
    np.cumsum(x, out=out[1:])
    return out


class RowText:
    """The `completions` text of a batch of rows (TokenText), cut before stop strings (a StopTable, or None)."""

    def __init__(self, text, stops):
        self.text, self.stops = text, stops
        self.cut = stops is not None and bool(stops.per_row or stops.job)

    def make(self, rows, offsets, tokens, finish):
        """-> Text of these rows."""
        n = len(rows)
        bufs, hits, at = [], {}, 0
        starts, sizes, exact = np.empty(n, np.int64), np.empty(n, np.int64), np.empty(n, bool)
        for a in range(0, n, TEXT_ROWS):    # a block of rows at a time, in the order they came
            b = min(n, a + TEXT_ROWS)
            o = offsets[a:b + 1]
            oo, tt = o - o[0], tokens[o[0]:o[-1]]
            buf, st, sz, ok = self.text.batch_text(oo, tt, finish[a:b])
            if self.cut:
                buf, st, sz, ok, cut = cut_rows(self.text.enc, (buf, st, sz, ok), oo, tt, finish[a:b],
                                                lambda k: self.stops.of(int(rows[a + k])))
                hits.update((a + k, v) for k, v in cut.items())
            bufs.append(buf)
            starts[a:b], sizes[a:b], exact[a:b] = st + at, sz, ok
            at += len(buf)
        buf = bufs[0] if len(bufs) == 1 else np.concatenate(bufs) if bufs else np.zeros(0, np.uint8)
        return Text(buf, starts, sizes, exact, hits)
