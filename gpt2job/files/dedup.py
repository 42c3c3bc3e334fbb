"""Identical prompts (greedy dedup), found with NumPy: a 64-bit key per prompt (its tokens and length), the rows
sorted by key, and every row whose key an earlier row has compared token by token with that row (a key collision is
never taken for a copy). No Python object per row: 10 million W1-like prompts take a few seconds and ~17 bytes
a row while it runs (the keys, sorted in place into the rows' order, and a flag per row).

Copies holds the result, for the master: which later rows repeat a computed row, as flat arrays."""
import dataclasses

import numpy as np

from gpt2job.chunks import Completions, take_ragged
from gpt2job.errors import plural

KEY_ROWS = 1 << 18      # rows keyed at once (bounded temporaries)
KEY_TOKENS = 1 << 20    # ragged prompts: about this many tokens keyed at once (each is ~7 int64 temporaries)


def mix64(x):
    """splitmix64's finaliser on uint64 arrays (wrapping)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


# a random odd 64-bit multiplier per token position (positions beyond the table reuse it, shifted by a mix)
_MULT = np.random.default_rng(20261130).integers(0, 1 << 63, 1024, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def prompt_keys(prompts, rows=None):
    """A 64-bit key for every prompt of a PromptSet (or for prompts[rows]): the sum of its tokens times a
    per-position multiplier, mixed with its length (uint64 [N]). Equal prompts have equal keys; unequal ones rarely
    do (a collision is never taken for a copy: group_identical compares the tokens). Keys depend on the tokens'
    dtype (uint16 or int32): they are compared within one job only. Computed a block at a time, in place."""
    n = len(prompts) if rows is None else len(rows)
    keys = np.zeros(n, np.uint64)
    lens = prompts.lengths
    w = prompts.width
    per = 8 // prompts.tokens.itemsize        # tokens to a 64-bit word
    step = KEY_ROWS if w is not None else \
        max(1, min(KEY_ROWS, KEY_TOKENS * len(prompts) // max(1, len(prompts.tokens))))   # by the mean length
    for a in range(0, n, step):
        b = min(n, a + step)
        if rows is not None:                  # these prompts, gathered (a block's worth at a time)
            r = rows[a:b]
            if w is not None:                 # (a grid's offsets are never made)
                off = np.arange(b - a + 1, dtype=np.int64) * w
                toks = prompts.tokens.reshape(-1, w)[r].reshape(-1) if w else prompts.tokens[:0]
            else:
                off, toks = take_ragged(prompts.offsets, prompts.tokens, r)
            blens = lens[r]
        else:                                 # (a grid's offsets are never made: w is known)
            off = np.arange(a, b + 1, dtype=np.int64) * w if w is not None else prompts.offsets[a:b + 1]
            toks, blens = prompts.tokens, lens[a:b]
        o0, o1 = int(off[0]), int(off[-1])
        if w is not None and w <= len(_MULT) * (per if w % per == 0 else 1):   # every prompt as long: [rows, w]
            if w and w % per == 0:             # several tokens to a 64-bit word, read in place
                words = toks[o0:o1].reshape(b - a, w).view(np.uint64)
                keys[a:b] = np.einsum("ij,j->i", words, _MULT[:w // per])
            elif w:
                keys[a:b] = np.einsum("ij,j->i", toks[o0:o1].astype(np.uint64).reshape(b - a, w), _MULT[:w])
        else:
            tok = toks[o0:o1].astype(np.uint64)
            row_of = np.repeat(np.arange(b - a), blens)
            pos = np.arange(len(tok), dtype=np.int64) - (off[:-1] - o0)[row_of]
            h = tok * _MULT[pos % len(_MULT)] + (pos // len(_MULT)).astype(np.uint64)
            nz = blens > 0
            keys[a:b][nz] = np.add.reduceat(h, (off[:-1] - o0)[nz]) if len(h) else 0
        keys[a:b] ^= mix64(blens.astype(np.uint64))
        keys[a:b] = mix64(keys[a:b])
    return keys


def same_prompts(prompts, a, b):
    """bool [n]: is prompt a[i] the same token sequence as prompt b[i]?"""
    lens = prompts.lengths
    same = lens[a] == lens[b]
    w = prompts.width
    for s in range(0, len(a), KEY_ROWS):
        if w is not None:
            grid = prompts.tokens.reshape(-1, w) if w else None
            if w:
                same[s:s + KEY_ROWS] &= (grid[a[s:s + KEY_ROWS]] == grid[b[s:s + KEY_ROWS]]).all(axis=1)
            continue
        idx = np.flatnonzero(same[s:s + KEY_ROWS]) + s
        off, ta = take_ragged(prompts.offsets, prompts.tokens, a[idx])
        _, tb = take_ragged(prompts.offsets, prompts.tokens, b[idx])
        differ = ta != tb
        if differ.any():
            same[idx[np.repeat(np.arange(len(idx)), np.diff(off))[differ]]] = False
    return same


class Copies:
    """Rows whose prompt repeats an earlier (computed) row's: reps [K] sorted, and the copies of reps[k] are
    rows[starts[k]:starts[k+1]] (in row order)."""

    def __init__(self, reps=None, starts=None, rows=None):
        self.reps = np.zeros(0, np.int64) if reps is None else reps
        self.starts = np.zeros(1, np.int64) if starts is None else starts
        self.rows = np.zeros(0, np.int64) if rows is None else rows

    def __len__(self):
        return len(self.rows)

    def as_dict(self):
        return {int(r): self.rows[self.starts[k]:self.starts[k + 1]] for k, r in enumerate(self.reps)}

    def attach(self, comp: Completions) -> Completions:
        """comp with the copies of its rows riding along (copy_rows, copy_src: no tokens gathered), in the order of
        its rows."""
        if not len(self.rows) or not len(comp.rows):
            return comp
        k = np.minimum(np.searchsorted(self.reps, comp.rows), len(self.reps) - 1)
        hit = np.flatnonzero(self.reps[k] == comp.rows)
        if not len(hit):
            return comp
        first = self.starts[k[hit]]
        count = self.starts[k[hit] + 1] - first
        at = np.repeat(first - np.cumsum(count) + count, count) + np.arange(count.sum())
        # (replace: the log-probabilities stay; a copy gets its source's, as its tokens)
        return dataclasses.replace(comp, copy_rows=self.rows[at], copy_src=np.repeat(hit, count))


def _every_prompt(rows, n_prompts):
    """Is rows 0, 1, ..., n_prompts - 1 (checked a block at a time)?"""
    if len(rows) != n_prompts:
        return False
    return all((rows[a:a + KEY_ROWS] == np.arange(a, min(len(rows), a + KEY_ROWS))).all()
               for a in range(0, len(rows), KEY_ROWS))


def copies_line(n_copies, num_samples=1):
    """The master's line for rows that group_identical found to be copies."""
    if num_samples > 1:   # the N greedy samples of a prompt are copies of one another, as are repeated prompts
        return (f"{plural(n_copies, 'row')} of identical greedy samples or repeated prompts: each distinct prompt "
                f"is computed once; --no-dedup computes every one")
    return (f"{plural(n_copies, 'prompt repeats', 'prompts repeat')} an earlier prompt: each is computed once "
            "(greedy); --no-dedup computes every one")


def group_identical(prompts, rows, num_samples=1):
    """Group rows whose prompts are identical token sequences.

    Returns (representatives, copies): representatives are the rows (in the given order) whose prompt no earlier row
    of `rows` has; copies (a Copies) gives each representative that has copies the later rows with its prompt.
    num_samples N > 1 (--num-samples): rows are output rows, row r's prompt is prompt r // N (its N samples are
    then copies of one another)."""
    rows = np.asarray(rows, np.int64)
    if len(rows) < 2:
        return rows, Copies()
    N = max(1, int(num_samples))
    of = (lambda r: r // N) if N > 1 else (lambda r: r)      # the prompt of output rows
    # sort the keys with each row's position in its low bits (one uint64 sort, far faster than an argsort): rows
    # whose keys agree in the high bits are neighbours, the earliest first; a pair that agrees only there is a
    # collision like any other, and the token check below rejects it
    n = len(rows)
    low = np.uint64(max(1, (n - 1).bit_length()))
    packed = prompt_keys(prompts, None if N == 1 and _every_prompt(rows, len(prompts)) else of(rows))   # [n] (8 B)
    for a in range(0, n, KEY_ROWS):           # in place: no temporaries of n
        b = min(n, a + KEY_ROWS)
        packed[a:b] >>= low
        packed[a:b] <<= low
        packed[a:b] |= np.arange(a, b, dtype=np.uint64)
    packed.sort()
    new_key = np.empty(n, bool)              # [n] does sorted position i start a group?
    new_key[0] = True
    for a in range(1, n, KEY_ROWS):
        b = min(n, a + KEY_ROWS)
        np.not_equal(packed[a:b] >> low, packed[a - 1:b - 1] >> low, out=new_key[a:b])
    packed &= np.uint64((1 << int(low)) - 1)
    order = packed.view(np.int64)             # positions in rows, in key order (packed's memory, reused)
    # the sorted positions that repeat a key (few): each run of them follows its group's first position
    later = np.flatnonzero(~new_key)
    del new_key
    run_start = np.r_[True, later[1:] != later[:-1] + 1] if len(later) else np.zeros(0, bool)
    first_pos = np.maximum.accumulate(np.where(run_start, later - 1, 0)) if len(later) else later
    cand, rep = order[later], order[first_pos]                         # positions in rows
    del order, packed, later, first_pos, run_start
    same = same_prompts(prompts, of(rows[cand]), of(rows[rep]))
    miss = np.sort(cand[~same])       # rows whose group's first has another prompt (a collision): a few at most
    cand, rep = cand[same], rep[same]
    if len(miss) > 1:                 # among themselves, by their tokens
        first, extra = {}, []
        for k in miss.tolist():
            r = first.setdefault(prompts.prompt(of(rows[k])).tobytes(), k)
            if r != k:
                extra.append((k, r))
        if extra:
            cand = np.append(cand, [k for k, _ in extra]).astype(np.int64)
            rep = np.append(rep, [r for _, r in extra]).astype(np.int64)
    if not len(cand):
        return rows, Copies()
    is_copy = np.zeros(len(rows), bool)
    is_copy[cand] = True
    by_rep = np.lexsort((cand, rep))
    cand, rep = rows[cand[by_rep]], rows[rep[by_rep]]
    starts = np.flatnonzero(np.r_[True, rep[1:] != rep[:-1]])
    return rows[~is_copy], Copies(rep[starts], np.append(starts, len(rep)).astype(np.int64), cand)
