"""Stop strings (vLLM's meaning), checked on the host by both backends: a row ends at the first generated token
after which the bytes of its generated tokens (not the prompt) contain one of its stop strings (UTF-8), matched
across token boundaries. The row keeps every token up to and including that one.

A step's tokens are checked together, with NumPy and no Python loop over rows (StopStrings.ends): a Python call per
row and step costs more than a GPU decode step. A match that ends within a new token T lies wholly inside T, or
starts earlier: then T begins with the last j bytes of the stop string s (1 <= j < len(s)) and the row's earlier
bytes end with the first len(s) - j. So each row keeps its last K earlier bytes (K: the longest stop string of the
batch less one; a match wholly in earlier bytes would have ended the row then), and for each (row, s, j) whose
token begins with s's last j bytes, one vectorised comparison of those tails decides. The tails are uint64 words
that each step's tokens shift their bytes into.

TokenTable.candidates(s) describes the tokens of both kinds compactly: the ids of those holding s, and per j the
range of tokens, in byte order, that begin with s's last j bytes (a string ending in a space has most of the
vocabulary as its j = 1 range: one range, not 33,000 ids). A StopStrings joins the candidates of its distinct
strings, not of row groups, into one sorted array of (string, token rank) intervals: one searchsorted per (row,
string) says whether the token holds the string and which of its ranges hold the token. So rows with thousands of
different strings cost their strings' candidates, not a vocabulary-sized table per group.
"""
import bisect
import collections
import functools
import operator

import numpy as np

from gpt2job.model.tokenizer import load_tokenizer

CACHE_BYTES = 64 << 20     # candidates kept per TokenTable: a bound on their bytes, whatever the strings' number


@functools.lru_cache(maxsize=4)
def token_bytes(vocab_dir, vocab_size):
    """The TokenTable of every token id below vocab_size (b"" for ids the tokenizer does not know)."""
    enc = load_tokenizer(vocab_dir)
    out = []
    for t in range(vocab_size):
        try:
            out.append(enc.decode_single_token_bytes(t))
        except KeyError:
            out.append(b"")
    return TokenTable(out)


def prepare(vocab_dir, vocab_size):
    """What a worker whose chunks have stop strings does before it is ready, so that its first chunk does not: the
    token table (a fraction of a second), and a matcher built and run once, which imports what NumPy loads lazily
    and builds the table's words for strings of up to 9 bytes (without this the first chunk's matcher took many
    times a later one's: benchmarks/RESULTS.md, "the stop strings' first matcher out of the first chunk")."""
    table = token_bytes(vocab_dir, vocab_size)
    StopStrings([("\n\n",)], table).ends(np.zeros(1, np.int64), np.zeros(1, np.int64), lambda b: [0])


class Candidates(collections.namedtuple("Candidates", "inside edge")):
    """A stop string s's candidate tokens: inside: int32 [k] ascending, the tokens that hold s; edge: int64 [r, 3]
    rows (j, lo, hi), j ascending and lo < hi: TokenTable.order[lo:hi] are the tokens that begin with s's last j
    bytes."""

    @property
    def nbytes(self):
        return self.inside.nbytes + self.edge.nbytes


class TokenTable:
    """Token id -> bytes (table[t]), with the bytes of all tokens joined in one array and the tokens in byte order,
    so that a stop string's candidate tokens are found in well under a millisecond. They are cached here (at most
    CACHE_BYTES): token_bytes keeps its tables, so chunks with the same stop strings find them built. Arrays over
    ids have one more entry, V: ids outside the table, which have no bytes."""

    def __init__(self, blobs):
        self.blobs = list(blobs)
        V = len(self.blobs)
        self.lens = np.array([len(x) for x in self.blobs] + [0], np.int64)                   # [V + 1]
        self.data = np.frombuffer(b"".join(self.blobs), np.uint8)                            # [total]
        self.owner = np.repeat(np.arange(V, dtype=np.int32), self.lens[:V])                  # [total] token
        self.at = np.argsort(self.data, kind="stable")          # positions in data by byte: of byte c from
        self.at_byte = np.searchsorted(self.data[self.at], np.arange(257))    # at_byte[c] to at_byte[c + 1]
        self.order = np.array(sorted(range(V), key=self.blobs.__getitem__), np.int64)      # [V] by bytes
        self.sorted = [self.blobs[t] for t in self.order]
        self.rank = np.arange(V + 1, dtype=np.int64)           # [V + 1] place in order (V: ids outside)
        self.rank[self.order] = np.arange(V)
        self.longest = int(self.lens.max())
        self._cands = collections.OrderedDict()                 # s -> Candidates, least recently used first
        self._cand_bytes = 0
        self.last_words = functools.lru_cache(maxsize=2)(self._last_words)

    @classmethod
    def of(cls, table):
        """table itself when a TokenTable, else the TokenTable of that sequence of bytes (tests' small tables)."""
        return table if isinstance(table, cls) else cls(table)

    def __len__(self):
        return len(self.blobs)

    def __getitem__(self, t):
        return self.blobs[t]

    def get(self, t):
        """The bytes of token t, b"" for ids outside the table."""
        return self.blobs[t] if 0 <= t < len(self.blobs) else b""

    def candidates(self, s):
        """Stop string s (bytes, not empty): its Candidates, cached."""
        c = self._cands.get(s)
        if c is not None:
            self._cands.move_to_end(s)
            return c
        c = self._cands[s] = self._candidates(s)
        self._cand_bytes += c.nbytes
        while self._cand_bytes > CACHE_BYTES and len(self._cands) > 1:
            self._cand_bytes -= self._cands.popitem(last=False)[1].nbytes
        return c

    def _candidates(self, s):
        L, data = len(s), self.data
        k0 = min(range(L), key=lambda k: self.at_byte[s[k] + 1] - self.at_byte[s[k]])    # s's rarest byte
        p = self.at[self.at_byte[s[k0]]:self.at_byte[s[k0] + 1]] - k0   # occurrences in the joined bytes...
        p = p[(p >= 0) & (p <= len(data) - L)]
        for k in range(L):
            p = p[data[p + k] == s[k]]
        inside = np.unique(self.owner[p[self.owner[p] == self.owner[p + L - 1]]])         # ...within one token
        edge = []
        for j in range(1, min(L - 1, self.longest) + 1):   # the tokens that begin with s[L-j:]: a range in order
            head = operator.itemgetter(slice(j))
            lo = bisect.bisect_left(self.sorted, s[L - j:], key=head)
            hi = bisect.bisect_right(self.sorted, s[L - j:], lo, key=head)
            if lo < hi:
                edge.append((j, lo, hi))
        return Candidates(inside.astype(np.int32), np.array(edge, np.int64).reshape(-1, 3))

    def _last_words(self, nw):
        """Each token's last bytes as StopStrings keeps tails, in C = min(nw, words of the longest token) words:
        (words uint64 [C, V + 1]: the last 8 C bytes (all when shorter) right-aligned, as big-endian words; bits
        uint64 [C, V + 1]: 8 x the token's bytes in each word; chunks [V + 1]: its words that hold any)."""
        w = 8 * min(nw, -(-self.longest // 8))
        n = np.minimum(self.lens, w)
        col = np.arange(w)
        keep = col >= w - n[:, None]
        at = np.where(keep, np.cumsum(self.lens)[:, None] - w + col, 0)      # [V + 1, w] positions in data
        b = np.where(keep, self.data[at] if len(self.data) else 0, 0).astype(np.uint8)
        bits = 8 * np.clip(np.arange(8, w + 1, 8) - (w - n[:, None]), 0, 8)
        return words_of(b), np.ascontiguousarray(bits.T, np.uint64), -(-n // 8)


def words_of(b):
    """uint8 [n, 8 w] -> uint64 [w, n]: each row's bytes as big-endian words (a word's first byte in its high bits,
    so that shifts move bytes from word to word), the words of a place contiguous."""
    return np.ascontiguousarray(b.view(">u8").T, np.uint64)


def spans(start, count):
    """The indices start[i] .. start[i] + count[i] - 1 for every i, concatenated, and the i of each."""
    if count.max(initial=0) <= 1:                     # the common case, in fewer steps
        owner = np.flatnonzero(count)
        return start[owner], owner
    owner = np.repeat(np.arange(len(count)), count)
    first = np.cumsum(count) - count
    return np.arange(len(owner)) + np.repeat(start - first, count), owner


class StopStrings:
    """The stop strings of a batch's rows; ends(rows, tok, earlier) says which rows a step's tokens end."""

    def __init__(self, stops, table):
        """stops: [B] sequences of str (empty strings never match); table: a TokenTable or token id -> bytes."""
        self.table = tb = TokenTable.of(table)
        self.V = V = len(tb)
        sid, memo = {}, {}   # (memo: rows mostly share their stop strings; each distinct row once)
        per_row = [memo[row] if row in memo else memo.setdefault(
            row, sorted({sid.setdefault(s.encode("utf-8"), len(sid)) for s in row if s})) for row in stops]
        self.strings = list(sid)                                                              # [N] distinct
        with_stops = [b for b, x in enumerate(per_row) if x]
        R = len(with_stops)
        self.slot = np.full(len(stops), -1, np.int64)        # [B] row -> its slot among the rows with stops
        self.slot[with_stops] = np.arange(R)
        # (slot, string) pairs by slot; a pair's key is its string's base in the (string, rank) keys below
        self.pair_count = np.array([len(per_row[b]) for b in with_stops], np.int64)          # [R]
        self.pair_start = np.cumsum(self.pair_count) - self.pair_count
        self.one_each = bool((self.pair_count == 1).all())   # (common) pair i is slot i's: fewer steps
        self.pair_key = np.array([i for b in with_stops for i in per_row[b]], np.int64) * (V + 1)   # [P]
        # The candidates of all strings as intervals of (string, rank) keys, string * (V + 1) + rank of the token
        # in byte order (V: ids outside the table): an interval starts at each token that holds its string and
        # after it, and at the ends of each edge range; it knows whether its token holds the string and which
        # edge ranges cover it.
        cands = [tb.candidates(s) for s in self.strings]
        base = np.arange(len(cands), dtype=np.int64) * (V + 1)
        inside = np.repeat(base, [len(c.inside) for c in cands]) + tb.rank[
            np.concatenate([c.inside for c in cands] + [np.zeros(0, np.int32)])]
        n_edge = [len(c.edge) for c in cands]
        edge = np.concatenate([c.edge for c in cands] + [np.zeros((0, 3), np.int64)])       # [E] (j, lo, hi)
        e_str = np.repeat(np.arange(len(cands)), n_edge)
        lo, hi = base[e_str] + edge[:, 1], base[e_str] + edge[:, 2]
        self.starts = np.unique(np.concatenate([[-1], inside, inside + 1, lo, hi]))   # [I]; -1: before all
        self.holds = np.zeros(len(self.starts), bool)                                     # [I]
        self.holds[np.searchsorted(self.starts, inside)] = True
        first = np.searchsorted(self.starts, lo)
        at, rg = spans(first, np.searchsorted(self.starts, hi) - first)    # (interval, edge range covering it)
        self.cover = rg[np.argsort(at, kind="stable")]       # [C] each interval's ranges, by interval
        self.cover_count = np.bincount(at, minlength=len(self.starts))
        self.cover_start = np.cumsum(self.cover_count) - self.cover_count
        self.m = np.array([len(self.strings[i]) for i in e_str], np.int64) - edge[:, 0]   # bytes before the token
        # each row's last earlier bytes, right-aligned in Kp (a multiple of 8) bytes, kept as Kp / 8 big-endian
        # uint64 words: a token's bytes come in by shifts, tails compare word by word (arrays [word, row]: NumPy
        # gathers and scatters along one axis much faster)
        K = max(map(len, self.strings), default=1) - 1
        self.Kp = Kp = -(-K // 8) * 8
        self.tail = np.zeros((Kp // 8, R), np.uint64)
        self.tlen = np.zeros(R, np.int64)                    # [R] bytes of tail that are the row's (at most Kp)
        self.fresh = np.full(R, Kp > 0)                      # rows not seen yet: their tails come from earlier
        self.n_fresh = int(self.fresh.sum())
        self.tok_words, self.tok_bits, self.tok_chunks = tb.last_words(Kp // 8) if Kp else (None,) * 3
        # an edge range's first m bytes of its string, right-aligned like the tails, and the mask of those bytes
        pat = np.zeros((len(edge), Kp), np.uint8)
        for r, (i, m) in enumerate(zip(e_str, self.m)):
            pat[r, Kp - m:] = np.frombuffer(self.strings[i][:m], np.uint8)
        self.pat = words_of(pat)                                                          # [Kp / 8, E]
        self.mask = words_of((np.arange(Kp) >= Kp - self.m[:, None]).astype(np.uint8) * np.uint8(255))

    @classmethod
    def of(cls, stops, vocab_dir, vocab_size):
        """A matcher for rows with these stop strings, or None when no row has one (the token table, which needs
        the tokenizer, is built only then)."""
        if not any(s for row in set(stops) for s in row):   # (set: a chunk's rows mostly share their stops)
            return None
        return cls(stops, token_bytes(vocab_dir, vocab_size))

    def ends(self, rows, tok, earlier):
        """Rows rows [n] generated tokens tok [n]; earlier(b): row b's generated tokens before this one (oldest
        first, a list or array). Returns a mask [n]: the rows whose generated text now contains one of their stop
        strings. The matcher keeps each row's last bytes: it reads earlier(b) at most once, when it first sees row b,
        and must then see the row at each of its steps until it ends (rows without stop strings cost a look-up)."""
        rows = np.asarray(rows, np.int64)
        hit = np.zeros(len(rows), bool)
        sl = self.slot[rows]
        i = np.flatnonzero(sl >= 0)
        if not len(i):
            return hit
        sl, t = sl[i], np.minimum(np.asarray(tok, np.int64)[i], self.V)      # V: ids outside the table
        if self.n_fresh:
            self._start(rows[i], sl, earlier)
        if self.one_each:                                                   # the pairs are the rows
            ps, key = sl, self.pair_key[sl] + self.table.rank[t]
        else:
            p, own = spans(self.pair_start[sl], self.pair_count[sl])
            ps, key = sl[own], self.pair_key[p] + self.table.rank[t][own]
        k = np.searchsorted(self.starts, key, side="right") - 1          # each pair's interval
        got = self.holds[k]                                               # [pairs]
        if self.Kp:
            c, at = spans(self.cover_start[k], self.cover_count[k])    # (range, pair): the range holds its token
            c, ts = self.cover[c], ps[at]
            ok = self.tlen[ts] >= self.m[c]
            c, at, ts = c[ok], at[ok], ts[ok]
            if len(c):
                same = np.ones(len(c), bool)
                words = -(-int(self.m[c].max()) // 8)                    # the last words hold every m bytes
                for q in range(len(self.tail) - words, len(self.tail)):
                    same &= ((self.tail[q][ts] ^ self.pat[q][c]) & self.mask[q][c]) == 0
                got[at[same]] = True
            self._push(sl, t)
        hit[i] = got if self.one_each else np.bincount(own, got, len(i)) > 0
        return hit

    def _push(self, sl, t):
        """Slots sl's tails take tokens t's bytes, a word of them at a time (shifts by 64 bits give 0 in NumPy)."""
        tail, C = [x[sl] for x in self.tail], len(self.tok_words)
        for k in range(C - int(self.tok_chunks[t].max()) if C > 1 else 0, C):   # words with bytes of a token
            b = self.tok_bits[k][t]
            tail = [x << b | y >> (64 - b) for x, y in zip(tail, tail[1:])] + [tail[-1] << b | self.tok_words[k][t]]
        for x, y in zip(self.tail, tail):
            x[sl] = y
        self.tlen[sl] = np.minimum(self.tlen[sl] + self.table.lens[t], self.Kp)

    def _start(self, rows, sl, earlier):
        """The tails of rows (slots sl) seen for the first time: their last earlier bytes."""
        new = self.fresh[sl]
        for b, s in zip(rows[new].tolist(), sl[new].tolist()):
            prev = earlier(b)
            k, head = 0, b""
            while len(head) < self.Kp and k < len(prev):    # enough tokens (some may hold no bytes)
                k = min(2 * k or 1, len(prev))
                head = b"".join([self.table.get(int(x)) for x in prev[len(prev) - k:]])
            if head:
                head = head[-self.Kp:]
                self.tail[:, s] = np.frombuffer(head.rjust(self.Kp, b"\0"), ">u8")
                self.tlen[s] = len(head)
        self.fresh[sl] = False
        self.n_fresh -= int(new.sum())
