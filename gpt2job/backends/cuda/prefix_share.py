"""Shared prompt prefixes in a chunk's prefill: which tokens to compute and which key/value rows to copy.

The key and value of the token at position p depend only on tokens 0..p, so two prompts that start with the same
p + 1 tokens have the same keys and values there. With the chunk's prompts in lexicographic order, the longest
prefix a prompt shares with any earlier prompt is the one it shares with the prompt just before it (lcp). Prompt i
then computes only its positions skip[i]..len[i]-1 (skip = lcp, at most len - 1: its last token always runs, the
LM head reads it); positions below skip[i] are copied, layer by layer, from the cache slot of the prompt that
computed them, after the QKV product and before attention (cuda_src/transformer.cu kv_copy). A KV group (the
prompts whose caches are on the GPU together) starts with skip = 0: nothing is copied across groups.

Pure NumPy, no GPU: the CUDA backend builds a plan per chunk (Runner.prepare) and uses it when it saves enough
(on the seed workload about a quarter of the prefill tokens: benchmarks/RESULTS.md).
"""
from dataclasses import dataclass

import numpy as np

MIN_SAVING = 0.05          # share only when at least this fraction of the prefill tokens is saved
MAX_MATRIX = 32 << 20      # prompts x longest prompt above this: no plan (the padded sort matrix gets large)
PEEK = 4                   # leading tokens that skip_bound compares (at most) before the plan sorts prompts
BOUND_CELLS = 1 << 18      # prompts x longest prompt above this: skip_bound first (below, the whole sort is as cheap)
LEXSORT_KEYS = 32          # key columns up to which np.lexsort orders the prompts (over that, one sort of byte strings)


@dataclass
class SharePlan:
    perm: np.ndarray        # [B] chunk prompt of each position in the new order (the lexicographic one)
    lens: np.ndarray        # [B] prompt lengths, new order
    skip: np.ndarray        # [B] leading positions not computed (copied), new order
    offsets: np.ndarray     # [B+1] computed tokens of prompt i: offsets[i]..offsets[i+1]
    tokens: np.ndarray      # [T'] int32 computed tokens
    positions: np.ndarray   # [T'] int32 their positions
    seq: np.ndarray         # [T'] int32 their prompt (new order)
    copies: np.ndarray      # [E, 3] int32 {dst prompt, src prompt, position}, ordered by dst prompt then position
    copy_off: np.ndarray    # [B+1] prompt i's copies: copies[copy_off[i]:copy_off[i+1]]
    groups: list            # [(b0, b1)] KV groups in the new order

    @property
    def saving(self):
        total = int(self.lens.sum())
        return 1.0 - int(self.offsets[-1]) / total if total else 0.0


def lexicographic(offsets, tokens, first=None):
    """(perm [B], lcp [B]): prompts in lexicographic token order (a prefix before the prompts it starts), and
    lcp[i] = length of the common prefix of prompts perm[i-1] and perm[i] (lcp[0] = 0). first ([B] ints >= 0,
    optional): sort by it first, then by the tokens."""
    offsets = np.asarray(offsets, np.int64)
    lens = np.diff(offsets)
    B, L = len(lens), int(lens.max()) if len(lens) else 0
    # keys: token + 1, 0 past a prompt's end (below every token), two bytes a token where every key fits (GPT-2's
    # vocabulary does), else four; the primary key `first` in front
    wide = len(tokens) and int(np.max(tokens)) + 1 > 0xFFFF or first is not None and B and int(np.max(first)) > 0xFFFF
    kt = np.dtype(np.uint32 if wide else np.uint16)
    F = 0 if first is None else 1
    kmat = np.zeros((B, F + L), kt)                                       # [B, F + L]
    if B and int(lens.min()) == L:                                        # equal lengths: a plain reshape
        kmat[:, F:] = np.asarray(tokens).reshape(B, L) + 1
    else:
        at = np.arange(int(offsets[-1]), dtype=np.int64)                 # [T] -> its cell of kmat, row-major
        at += np.repeat(np.arange(B, dtype=np.int64) * (F + L) + F - offsets[:-1], lens)
        kmat.reshape(-1)[at] = (np.asarray(tokens) + 1).astype(kt)
    if F:
        kmat[:, 0] = first
    if F + L <= LEXSORT_KEYS:   # short prompts: one stable sort a key column, the last key primary
        perm = np.lexsort(kmat.T[::-1])                                   # [B]
    else:   # long ones: rows as big-endian byte strings (byte order = key order), compared only as far as they differ
        be = np.ascontiguousarray(kmat.astype(kt.newbyteorder(">")))
        perm = np.argsort(be.view(np.dtype((np.void, be.itemsize * max(be.shape[1], 1)))).ravel(), kind="stable")
    srt = kmat[perm, F:]                                                  # [B, L]
    differ = np.ones((max(B - 1, 0), L + 1), bool)                        # [B-1, L+1]: column L stops every row
    np.not_equal(srt[1:], srt[:-1], out=differ[:, :L])
    differ[:, :L] |= srt[1:] == 0                                         # past the end of a prompt: not shared
    lcp = np.zeros(B, np.int64)
    lcp[1:] = differ.argmax(axis=1)
    return perm, lcp


def skip_bound(offsets, tokens):
    """An upper bound on the positions a plan can skip, from the prompts' first k tokens alone (k = PEEK where they
    pack into 64 bits, as GPT-2's do; fewer for wider ids): a prompt whose first k tokens (padded) no other prompt
    starts with shares fewer than k tokens with any prompt, so it skips at most k - 1 positions; any other prompt at
    most its length - 1. One sort of B integers where the plan sorts whole prompts: it declines chunks of unrelated
    prompts (W2's random prompts) cheaply, where the plan's sort took host time before the first chunk's prefill."""
    lens = np.diff(offsets)
    bits = (int(tokens.max()) + 1).bit_length() if len(tokens) else 1   # token + 1 (0: past the prompt's end)
    k = max(1, min(PEEK, 64 // bits))
    key = np.zeros(len(lens), np.uint64)                                  # [B] the first k tokens + 1, packed
    for j in range(k):
        has = lens > j
        col = np.zeros(len(lens), np.uint64)
        col[has] = tokens[offsets[:-1][has] + j].astype(np.uint64) + np.uint64(1)
        key = (key << np.uint64(bits)) | col
    order = np.argsort(key)
    sk = key[order]
    same = sk[1:] == sk[:-1]                                              # [B-1] neighbours in sorted order
    shared = np.zeros(len(lens), bool)
    shared[order[1:][same]] = True
    shared[order[:-1][same]] = True
    return int(np.where(shared, lens - 1, np.minimum(lens - 1, k - 1)).sum())


def plan(offsets, tokens, groups_of, min_saving=MIN_SAVING, extra=None):
    """The share plan of a chunk (prompt b: tokens[offsets[b]:offsets[b+1]]), or None when it would save less
    than min_saving of the prefill tokens, or when its order needs more KV groups than the chunk's own order (a
    group's cache is as long as its longest prompt, and the lexicographic order mixes lengths: more groups mean
    smaller decode batches). groups_of(lens) -> [(b0, b1)]: the KV groups for prompts of these lengths in this
    order (plan.kv_groups); with extra ([B] int, chunk order: each prompt's new tokens, when they differ),
    groups_of gets the prompts' lengths + extra in that order instead."""
    offsets = np.asarray(offsets, np.int64)
    tokens = np.asarray(tokens, np.int32)
    lens0 = np.diff(offsets)
    B = len(lens0)
    cells = B * int(lens0.max()) if B else 0
    if B < 2 or cells > MAX_MATRIX or cells > BOUND_CELLS and skip_bound(offsets, tokens) < min_saving * lens0.sum():
        return None
    need = lens0 if extra is None else lens0 + np.asarray(extra, np.int64)   # [B] positions each prompt's cache needs
    perm, lcp = lexicographic(offsets, tokens)
    skip = np.minimum(lcp, lens0[perm] - 1)
    if skip.sum() < min_saving * lens0.sum():
        return None
    groups, ungrouped = groups_of(need[perm]), groups_of(need)
    if len(groups) > len(ungrouped) and (lcp == lens0[perm]).any():
        # the lexicographic order mixes lengths, but the chunk holds identical prompts (the samples of --num-samples):
        # the most positions first instead (the scheduler's order, so its KV groups), lexicographic among equal needs.
        # Identical prompts and prefixes among equal needs still share; prefixes across lengths mostly not
        perm, lcp = lexicographic(offsets, tokens, first=int(need.max()) - need)
        skip = np.minimum(lcp, lens0[perm] - 1)
        groups = groups_of(need[perm])
    if len(groups) > len(ungrouped):
        return None
    lens = lens0[perm]
    for b0, _ in groups:
        skip[b0] = 0
    if skip.sum() < min_saving * lens.sum():
        return None
    # computed tokens: prompt i's positions skip[i]..lens[i]-1, in the new order (int32 where the kernels read
    # them: a chunk has 10^5 tokens, and this runs while the first chunk's GPU waits)
    ncomp = lens - skip                                                   # [B]
    coff = np.zeros(B + 1, np.int64)
    np.cumsum(ncomp, out=coff[1:])
    ar = np.arange(B, dtype=np.int32)                                     # [B]
    seq = np.repeat(ar, ncomp)                                            # [T'] int32
    pos = np.arange(int(coff[-1]), dtype=np.int32)                        # [T'] -> position of each computed token
    pos -= np.repeat((coff[:-1] - skip).astype(np.int32), ncomp)        # (int32: a chunk has < 2^31 tokens)
    src_tok = np.repeat(offsets[:-1][perm].astype(np.int32), ncomp) + pos   # [T'] int32 index into the chunk's tokens
    # copies: position p of prompt i (p < skip[i]) comes from the last prompt before i that computed p. That is the
    # last j < i with skip[j] <= p: every prompt between them skips more than p, so each shares p + 1 tokens with
    # the one before it, and prompt j is longer than p. ([P, B] cells: at most MAX_MATRIX, so int32 indices.)
    P = int(skip.max())
    last = np.where(skip.astype(np.int32)[None, :] <= np.arange(P, dtype=np.int32)[:, None], ar[None, :],
                    np.int32(-1))                                         # [P, B] j where skip[j] <= p
    np.maximum.accumulate(last, axis=1, out=last)
    copy_off = np.zeros(B + 1, np.int64)
    np.cumsum(skip, out=copy_off[1:])
    E = int(copy_off[-1])
    dst = np.repeat(ar, skip)                                             # [E] by prompt, then position
    where = np.arange(E, dtype=np.int32)
    where -= np.repeat(copy_off[:-1].astype(np.int32), skip)             # [E] the position
    copies = np.empty((E, 3), np.int32)                                   # [E, 3] {dst, src, position}
    copies[:, 0] = dst
    copies[:, 1] = last.reshape(-1)[where * np.int32(B) + dst]
    copies[:, 2] = where
    return SharePlan(perm=perm, lens=lens, skip=skip, offsets=coff, tokens=tokens[src_tok],
                     positions=pos, seq=seq, copies=copies, copy_off=copy_off,
                     groups=list(groups))
