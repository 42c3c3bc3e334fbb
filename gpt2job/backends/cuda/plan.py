"""The host-side planning of the CUDA backend, pure NumPy (CPU tests import it without pycuda): the prompt checks,
the layout of a chunk's upload, the prefill passes and attention tiles, the KV groups, a decode step's inputs
(step_rows, step_inputs), the buffer sizes for the device memory a worker has (memory_plan), a chunk in halves
(split_chunk, join_completions), and what the runner holds of a submitted chunk (ChunkPlan, Unplanned)."""
import bisect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, List, Optional

import numpy as np

from gpt2job.chunks import Chunk, concat_completions, take_ragged
from gpt2job.errors import UserError
from gpt2job.settings import GenerationSettings, max_prompt_length

if TYPE_CHECKING:   # ChunkPlan's field types only
    from gpt2job.backends.cuda.device import Upload
    from gpt2job.backends.cuda.rows import RowPlan

PREFILL_TILE_ROWS = 16   # query rows per attention_prefill tile (the kernel's AP_TILE)


def check_prompts(lens, tokens, n_positions, vocab_size, max_new_tokens):
    """Every prompt has a token, fits the model's positions with max_new_tokens more (an int, or [B]: each row's
    own), and every token id is in the vocabulary; else a UserError."""
    if len(lens) and lens.min() < 1:
        raise UserError("a prompt has no tokens", None, "prompt", "give every prompt at least one token")
    if np.ndim(max_new_tokens):   # each row's own limit
        mnt = np.asarray(max_new_tokens, np.int64)
        over = np.flatnonzero(lens > max_prompt_length(n_positions, mnt))
        if len(over):
            b = int(over[0])
            raise UserError(f"prompt length {int(lens[b])} + {int(mnt[b])} new tokens exceeds the model's "
                            f"{n_positions} positions", None, "max_new_tokens", "use shorter prompts or fewer tokens")
    elif len(lens) and int(lens.max()) > max_prompt_length(n_positions, max_new_tokens):
        raise UserError(f"prompt length {int(lens.max())} + {max_new_tokens} new tokens exceeds the model's "
                        f"{n_positions} positions", None, "max_new_tokens", "use shorter prompts or fewer tokens")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        raise UserError("a token id is outside the vocabulary", None, "tokens", "check the tokenizer")


# Row counts a replayed decode step computes once rows have left its group: the live rows, then padding rows (a
# row that has left, at position 0: its KV-cache slot is no longer read, its attention reads one position; a row's
# values do not depend on the other rows), so that rows leaving at every step (per-row max_new_tokens, stops)
# replay a few graphs instead of launching each step anew. Under 512 rows a launched step costs the host more time
# than the GPU's step (benchmarks/RESULTS.md); above, the GPU paces the steps and padding would only add work.
STEP_ROWS = (8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def step_rows(n, ns):
    """The rows a replayed step computes for n live rows of a group of ns: n, or the next of STEP_ROWS (at most
    ns)."""
    i = bisect.bisect_left(STEP_ROWS, n)
    return n if i == len(STEP_ROWS) else min(STEP_ROWS[i], ns)


def step_inputs(sh, lens, rows, keep, step, m, b0, ns):
    """A decode step's inputs, into the int32 host array sh (room for 3 m): the positions [m] and KV rows [m] of its
    rows (the live rows, of lengths lens[rows]; then m - n padding rows), and when it gathers its input tokens (rows
    left at the step before: keep is False for them; or padding rows), the previous step's place of each [m].
    Returns the number of values to upload (2 m, or 3 m with the gather)."""
    n = len(rows)
    gather = m > n or not keep.all()
    sh[0:n] = lens[rows] + step - 1
    sh[m:m + n] = rows
    if gather:
        sh[2 * m:2 * m + n] = np.flatnonzero(keep)
    if m > n:   # padding rows: a row of the group (from b0, ns rows) that has left, position 0, any input token
        left = np.ones(ns, bool)
        left[rows - b0] = False
        sh[n:m], sh[m + n:2 * m], sh[2 * m + n:3 * m] = 0, b0 + int(np.argmax(left)), 0
    return 3 * m if gather else 2 * m


@dataclass
class Layout:
    """What a chunk uploads, its prompts in the order they run (the share plan's, else the chunk's): int32 words
    tokens[T] pos[T] seq[T] last[B] arange[B] (pad to 8 bytes), then rows int64[B], then the prefill attention
    tiles int32[NT, 2] (8-byte aligned), then the shared-prefix copies int32[E, 3]; with per-row selection (sel, a
    sampling.RowSettings in run order) then (8-byte aligned) seed uint64[B] temperature float64[B] top_p float64[B]
    top_k int32[B] penalty float32[B], and with a penalty every prompt's tokens int32[TP] and their prompt
    int32[TP] (all of them: the shared prefixes too; the seen-tokens bitmap is set from them). T counts the
    computed tokens (a shared prefix is computed once)."""
    B: int
    T: int
    lens: np.ndarray        # [B] prompt lengths
    offsets: np.ndarray     # [B+1] computed tokens of prompt b: offsets[b]..offsets[b+1]
    tokens: np.ndarray      # [T] int32 token ids
    positions: np.ndarray   # [T] int32 their positions
    seq: np.ndarray         # [T] int32 their prompt
    last: np.ndarray        # [B] int32 the row of each prompt's last token
    rows: np.ndarray        # [B] int64 the output row of each prompt
    tiles: np.ndarray       # [NT, 2] int32 attention_prefill tiles {first_row, n_rows}
    tile_off: np.ndarray    # [B+1] prompt b's tiles: tile_off[b]..tile_off[b+1]
    copies: np.ndarray      # [E, 3] int32 shared-prefix key/value rows {dst, src, pos}
    copy_off: np.ndarray    # [B+1] prompt b's copies: copy_off[b]..copy_off[b+1]
    n32: int                # int32 words before rows
    sel: object = None      # sampling.RowSettings in run order (None: the job's settings, no per-row part)
    ptok: np.ndarray = None     # [TP] int32 every prompt token, run order (penalty only)
    ptok_off: np.ndarray = None  # [B+1] prompt b's: ptok[ptok_off[b]:ptok_off[b+1]]

    @classmethod
    def of(cls, offsets, lens, tokens, rows, share, tiles, sel=None):
        """The layout of prompts (prompt b: tokens[offsets[b]:offsets[b+1]], lens[b] of them, answering output row
        rows[b]), with share a prefix_share.SharePlan (or None: every token computed, the chunk's order) and tiles:
        whether the prefill attention kernel runs (else no tiles); sel: the per-row settings, run order."""
        B = len(rows)
        ptok = ptok_off = None
        if sel is not None and sel.penalized:
            ptok_off, ptok = take_ragged(offsets, tokens, share.perm if share is not None else np.arange(B))
            ptok = ptok.astype(np.int32)
        if share is not None:   # the plan's order; offsets/T/tokens from here on count computed tokens only
            rows, lens, offsets = rows[share.perm], share.lens, share.offsets
            tokens, pos_of_tok, seq_of_tok = share.tokens, share.positions, share.seq
            copies, copy_off = share.copies, share.copy_off
            T = int(offsets[-1])
        else:
            T = int(offsets[-1]) if B else 0
            seq_of_tok = np.repeat(np.arange(B, dtype=np.int32), lens)
            # in int32 throughout (a chunk holds far fewer than 2^31 tokens): half the bytes of int64, on the first
            # chunk's way to the GPU
            pos_of_tok = np.arange(T, dtype=np.int32)
            pos_of_tok -= np.repeat(np.asarray(offsets[:-1], np.int32), lens)
            copies, copy_off = np.zeros((0, 3), np.int32), np.zeros(B + 1, np.int64)
        last = (offsets[1:] - 1).astype(np.int32)
        if tiles:
            tiles, tile_off = prefill_tiles(offsets)
        else:   # the per-row kernel needs no tiles
            tiles, tile_off = np.zeros((0, 2), np.int32), np.zeros(B + 1, np.int64)
        n32 = 3 * T + 2 * B
        n32 += n32 & 1
        return cls(B, T, lens, offsets, tokens, pos_of_tok, seq_of_tok, last, rows, tiles, tile_off, copies, copy_off,
                   n32, sel, ptok, ptok_off)

    # byte offsets of the parts
    @property
    def at_rows(self):
        return 4 * self.n32

    @property
    def at_tiles(self):
        return 4 * self.n32 + 8 * self.B

    @property
    def at_copies(self):
        return 4 * self.n32 + 8 * self.B + 8 * len(self.tiles)

    @property
    def at_params(self):
        """seed[B] at_params, temperature[B] + 8 B, top_p[B] + 16 B, top_k[B] + 24 B, penalty[B] + 28 B."""
        n = self.at_copies + 12 * len(self.copies)
        return n + (-n) % 8 if self.sel is not None else n

    @property
    def at_ptok(self):
        """every prompt token [TP] at_ptok, their prompt [TP] + 4 TP."""
        return self.at_params + (32 * self.B if self.sel is not None else 0)

    @property
    def nbytes(self):
        return self.at_ptok + (8 * len(self.ptok) if self.ptok is not None else 0)

    def write(self, host):
        """Write the upload into host (uint8, at least nbytes)."""
        T, B, n32 = self.T, self.B, self.n32
        h32 = host[:4 * n32].view(np.int32)
        h32[0:T] = self.tokens[:T]
        h32[T:2 * T] = self.positions
        h32[2 * T:3 * T] = self.seq
        h32[3 * T:3 * T + B] = self.last
        h32[3 * T + B:3 * T + 2 * B] = np.arange(B, dtype=np.int32)
        host[self.at_rows:self.at_tiles].view(np.int64)[:] = self.rows
        host[self.at_tiles:self.at_copies].view(np.int32)[:] = self.tiles.reshape(-1)
        host[self.at_copies:self.at_copies + 12 * len(self.copies)].view(np.int32)[:] = self.copies.reshape(-1)
        if self.sel is not None:
            rs, a = self.sel, self.at_params
            for i, (arr, t) in enumerate(((rs.seed, np.uint64), (rs.temperature, np.float64), (rs.top_p, np.float64))):
                host[a + 8 * i * B:a + 8 * (i + 1) * B].view(t)[:] = arr
            host[a + 24 * B:a + 28 * B].view(np.int32)[:] = rs.top_k
            host[a + 28 * B:a + 32 * B].view(np.float32)[:] = rs.penalty
        if self.ptok is not None:
            TP, a = len(self.ptok), self.at_ptok
            host[a:a + 4 * TP].view(np.int32)[:] = self.ptok
            host[a + 4 * TP:a + 8 * TP].view(np.int32)[:] = np.repeat(np.arange(B, dtype=np.int32),
                                                                      np.diff(self.ptok_off))


def prefill_passes(offsets, b0, b1, max_rows):
    """Split prompts b0..b1-1 (prompt b is tokens offsets[b]..offsets[b+1]) into passes of whole prompts
    holding at most max_rows tokens (a longer prompt gets a pass of its own), each as many as fit. Yields (first,
    end). (A search per pass: a loop over the prompts delayed a W1 chunk's first launch; benchmarks/RESULTS.md.)"""
    offsets = np.asarray(offsets, np.int64)
    p0 = b0
    while p0 < b1:
        fit = int(np.searchsorted(offsets, offsets[p0] + max_rows, side="right")) - 1   # offsets[fit] - start <= max
        p1 = min(max(fit, p0 + 1), b1)
        yield p0, p1
        p0 = p1


def prefill_tiles(offsets):
    """Tiles of attention_prefill for prompts b (tokens offsets[b]..offsets[b+1]): each prompt's tokens in tiles of
    PREFILL_TILE_ROWS consecutive rows, the last one partial. Returns (tiles int32 [NT, 2] {first_row, n_rows},
    tile_off int64 [B + 1]: prompt b's tiles are tile_off[b]..tile_off[b+1])."""
    offsets = np.asarray(offsets, np.int64)
    lens = np.diff(offsets)
    ntile = (lens + PREFILL_TILE_ROWS - 1) // PREFILL_TILE_ROWS          # [B]
    tile_off = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(ntile, out=tile_off[1:])
    tp = np.repeat(np.arange(len(lens)), ntile)                           # prompt of each tile [NT]
    first = PREFILL_TILE_ROWS * (np.arange(int(tile_off[-1])) - tile_off[:-1][tp])   # first row within its prompt
    tiles = np.empty((len(tp), 2), np.int32)
    tiles[:, 0] = offsets[:-1][tp] + first
    tiles[:, 1] = np.minimum(PREFILL_TILE_ROWS, lens[tp] - first)
    return tiles, tile_off


def kv_groups(lens, extra, bytes_per_position, budget, max_rows=None):
    """Split prompts 0..B-1 (lengths lens) into consecutive groups of at most max_rows prompts (None: any) whose KV
    caches fit budget bytes, a group of n prompts taking n x (its longest prompt + extra) positions. Greedy, then
    evened out: as many groups as greedy needs, of near-equal size when that fits too (a small last group would
    leave the GPU idle in decode). A prompt too long for the budget on its own still gets a group. Returns
    [(b0, b1), ...]."""
    lens = np.asarray(lens, np.int64)
    B = len(lens)

    def fits(b0, b1):
        return b1 - b0 == 1 or (b1 - b0 <= (max_rows or B) and
                                (b1 - b0) * (int(lens[b0:b1].max()) + extra) * bytes_per_position <= budget)

    greedy, b0 = [], 0
    while b0 < B:
        lo, hi = b0 + 1, B          # the largest b1 with fits(b0, b1): fits is monotone in b1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(b0, mid) else (lo, mid - 1)
        greedy.append((b0, lo))
        b0 = lo
    n = len(greedy)
    if n > 1:
        cuts = [B * i // n for i in range(n + 1)]
        even = list(zip(cuts[:-1], cuts[1:]))
        if all(fits(a, b) for a, b in even):
            return even
    return greedy


# ---------------------------------------------------------------- device memory (sizes), and chunks in parts

KV_FLOOR = 64 << 20    # bytes: the least KV cache budget
# A KV group holds up to this many head groups: a chunk of cheap rows may hold 4 preferred chunks (scheduler.py), and
# one decode step of them all runs faster than four (benchmarks/RESULTS.md, session 67)
GROUP_HEADS = 4


def group_rows(rows, head_rows):
    """The most sequences a KV group holds (Runner.kv_groups), the size Runner.reserve gives each buffer of a group's
    decode steps: GROUP_HEADS head groups, within a prefill pass's rows (a decode step's activations are those)."""
    return min(GROUP_HEADS * head_rows, rows)


UPLOAD_ROW_BYTES = 72  # a chunk upload's bytes per prefill row, pinned and on the GPU (Layout: 12 bytes a token, up
                       # to 6 tokens a row with each prompt's ~20 bytes; a chunk that needs more grows its upload)
HEAD_FLOOR = 64        # the fewest LM head rows the buffers shrink to
CHUNK_FLOOR = 64       # the fewest prompts per chunk a worker with little memory asks for


def size_floors(rows, head_rows, n_positions):
    """(prefill rows, head rows) the buffers never shrink below (nor above what was asked): a pass holds a longest
    prompt (a longer one gets a pass of its own, which grows the buffers)."""
    return min(rows, max(n_positions, 256)), min(head_rows, HEAD_FLOOR)


@dataclass(frozen=True)
class MemoryPlan:
    prefill_rows: int     # tokens per prefill pass (the activation buffers)
    head_rows: int        # rows per LM head product (ln_f output, logits or argmax partials, decode steps' buffers)
    kv_budget: int        # bytes for the KV cache
    reduced: bool         # False: the sizes asked for (the memory allows them)


def memory_plan(free, share_gpus, rows, head_rows, n_positions, estimate, reserve):
    """The buffer sizes of a worker with `free` bytes of device memory left after its weights and kernels.

    estimate(rows, head_rows): the activation bytes the KV budget leaves room for (Model.activation_bytes: an upper
    bound); reserve(rows, head_rows): the bytes reserved besides the KV cache (runner.pool_bytes and the uploads).
    The sizes asked for (rows, head_rows) whenever their estimate takes at most half the memory, with the
    KV budget f x (free - estimate) (f = 0.8; 0.4 when ranks share the GPU: they all measured the same free
    memory), at least KV_FLOOR: so nothing changes on a GPU with room. Otherwise rows and head rows halve together
    (not below size_floors) until the pool takes at most a quarter of the memory, the KV budget is f x (free -
    pool) (the backend then scales its preferred chunk with the head rows it could allocate: preferred_chunk)."""
    f = 0.4 if share_gpus else 0.8
    est = estimate(rows, head_rows)
    if 2 * est <= free:
        return MemoryPlan(rows, head_rows, max(int(f * (free - est)), KV_FLOOR), False)
    rmin, hmin = size_floors(rows, head_rows, n_positions)
    r, h = rows, head_rows
    while 4 * reserve(r, h) > free and (r > rmin or h > hmin):
        r, h = max(r // 2, rmin), max(h // 2, hmin)
    return MemoryPlan(r, h, max(int(f * (free - reserve(r, h))), KV_FLOOR), True)


def preferred_chunk(chunk, head_rows_asked, head_rows):
    """The chunk size asked for, scaled down with the head rows when those shrank."""
    if head_rows >= head_rows_asked:
        return chunk
    return min(chunk, max(CHUNK_FLOOR, chunk * head_rows // head_rows_asked))


def split_chunk(chunk):
    """The chunk's prompts in two halves (its order, its chunk_id, its rows' params): [first half, second half]
    (Runner._in_halves, when memory ran out).

    Why the halves' tokens are those of a run with room: each part runs the same model on the same prompts, and the
    kernels compute each row by itself: the embedding, the layer norms, the products (a row of the output is its
    input row times the weights, summed over K in one order whatever the number of rows), attention (a row reads its
    own prompt's keys, in key blocks counted from position 0, whichever tile or pass it is in), the argmax (ties to
    the lowest index). A prompt whose prefix a prompt now in the other half computed for it (prefix sharing) computes
    that prefix itself: the same rows, so the same keys and values as the copies. KV groups only decide which
    sequences share a step. Where it may not hold: the row count of a product picks its fp16 tile variant
    (picks.py), and variants that sum in another order would round differently (fp32: split-K is chosen by row count
    and head rows, model.py); a near tie (two logits within that rounding) could then pick the other token. The same
    holds for the smaller KV groups and prefill passes the halved budgets give later chunks, and already for a clean
    run, whose KV groups follow the free memory. tests/test_cuda_kernels.py checks that fp16 product rows are bitwise
    the same for every variant a Hopper worker compiles and every row count; tests/test_cuda_faults.py that W1
    tokens are identical under memory pressure and after a failure mid-chunk."""
    B = len(chunk.rows)
    offsets = np.asarray(chunk.offsets, np.int64)
    parts = []
    for a, b in ((0, B // 2), (B // 2, B)):
        t0, t1 = int(offsets[a]), int(offsets[b])
        params = chunk.params.take(np.arange(a, b)) if chunk.params is not None else None
        parts.append(Chunk(chunk.chunk_id, np.asarray(chunk.rows[a:b], np.int64), offsets[a:b + 1] - t0,
                           np.asarray(chunk.tokens[t0:t1], np.int32), params))
    return parts


def join_completions(chunk, parts):
    """The Completions of a chunk computed in consecutive parts (split_chunk), in the chunk's order."""
    return concat_completions(parts, chunk.chunk_id)


@dataclass
class ChunkPlan:
    """A submitted chunk: its layout (prompts in the order they run), its upload and the device addresses of the
    parts of it (Layout)."""
    chunk: Chunk
    settings: GenerationSettings
    layout: Layout
    upload: "Upload"
    ev_up: tuple                      # (start, end) events of the upload on the copy stream
    groups: Optional[list]            # the share plan's KV groups (None: the runner's own)
    perm: Optional[np.ndarray]        # the share plan's order of the chunk's prompts (None: the chunk's order)
    shared_tokens: int                # prompt tokens not computed (shared prefixes)
    rows: "RowPlan"                   # each row's settings (run order) and the host's checks of its tokens
    phases: List[Any] = field(default_factory=list)   # (kind, start event, end event) of prefill / decode steps
    last_down: Optional[tuple] = None                   # (start, end) events of the last token download
    ev_end: Optional[Any] = None                        # event after its last GPU work (its last decode step)

    def __post_init__(self):
        lay, base = self.layout, int(self.upload.dev)
        T, B = lay.T, lay.B
        self.p_tok, self.p_pos, self.p_seq = base, base + 4 * T, base + 8 * T
        self.p_last, self.p_arange = base + 12 * T, base + 12 * T + 4 * B
        self.p_rows, self.p_tiles, self.p_copies = base + lay.at_rows, base + lay.at_tiles, base + lay.at_copies

    def pass_tiles(self, pb0, pb1):
        """attention_prefill tiles of the prefill pass over prompts pb0..pb1-1: (pointer, count, row_base)."""
        t0, t1 = int(self.layout.tile_off[pb0]), int(self.layout.tile_off[pb1])
        return self.p_tiles + 8 * t0, t1 - t0, int(self.layout.offsets[pb0])


@dataclass
class Unplanned:
    """A submitted chunk whose plan or upload ran out of memory: run() computes it in halves."""
    chunk: Chunk
    settings: GenerationSettings
    error: BaseException
