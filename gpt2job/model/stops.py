"""Stop strings (vLLM's meaning), checked on the host by both backends: a row ends at the first generated token
after which the bytes of its generated tokens (not the prompt) contain one of its stop strings (UTF-8), matched
across token boundaries. The row keeps every token up to and including that one.

A step's tokens are checked together, with NumPy (StopStrings.ends): a Python call per row and step costs more
than a GPU decode step. A match that ends within a new token T lies wholly inside T (the row ends), or starts
earlier, and then a non-empty prefix of T is a proper suffix of the stop string (the earlier bytes decide).
TokenTable.candidates lists the tokens of both kinds for a stop string; StopStrings looks each row's token up among
its strings' candidates. Only rows whose token is of the second kind read their earlier tokens back, as far as
their longest stop string reaches: a match wholly in earlier bytes would have ended the row then.
"""
import bisect
import functools
import operator

import numpy as np

from gpt2job.model.tokenizer import load_tokenizer, vocab_dir_from

INSIDE, EDGE = 2, 1      # candidate codes: the stop string is in the token; a prefix of the token may end one


@functools.lru_cache(maxsize=4)
def token_bytes(vocab_dir, vocab_size):
    """The TokenTable of every token id below vocab_size (b"" for ids the tokenizer does not know)."""
    enc = load_tokenizer(vocab_dir_from(vocab_dir))   # the worker's GPT2_VOCAB_DIR when the job named none
    out = []
    for t in range(vocab_size):
        try:
            out.append(enc.decode_single_token_bytes(t))
        except KeyError:
            out.append(b"")
    return TokenTable(out)


class TokenTable:
    """Token id -> bytes (table[t]), with the bytes of all tokens joined in one array and the tokens in byte order,
    so that a stop string's candidate tokens are found in well under a millisecond. They are cached here:
    token_bytes keeps its tables, so chunks with the same stop strings find them built."""

    def __init__(self, blobs):
        self.blobs = list(blobs)
        V = len(self.blobs)
        self.data = np.frombuffer(b"".join(self.blobs), np.uint8)                            # [total]
        self.owner = np.repeat(np.arange(V, dtype=np.int32), [len(x) for x in self.blobs])  # [total] token
        self.at = np.argsort(self.data, kind="stable")          # positions in data by byte: of byte c from
        self.at_byte = np.searchsorted(self.data[self.at], np.arange(257))    # at_byte[c] to at_byte[c + 1]
        self.order = np.array(sorted(range(V), key=self.blobs.__getitem__), np.int64)      # [V] by bytes
        self.sorted = [self.blobs[t] for t in self.order]
        self.candidates = functools.lru_cache(maxsize=4096)(self._candidates)

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

    def _candidates(self, s):
        """Stop string s (bytes, not empty): (token ids [k] ascending, codes [k]: INSIDE or EDGE)."""
        L, data = len(s), self.data
        k0 = min(range(L), key=lambda k: self.at_byte[s[k] + 1] - self.at_byte[s[k]])    # s's rarest byte
        p = self.at[self.at_byte[s[k0]]:self.at_byte[s[k0] + 1]] - k0   # occurrences in the joined bytes...
        p = p[(p >= 0) & (p <= len(data) - L)]
        for k in range(L):
            p = p[data[p + k] == s[k]]
        inside = self.owner[p[self.owner[p] == self.owner[p + L - 1]]]                   # ...within one token
        edge = [inside[:0]]
        for j in range(1, L):      # the tokens that begin with s[L-j:]: a range of them in byte order
            head = operator.itemgetter(slice(j))
            lo = bisect.bisect_left(self.sorted, s[L - j:], key=head)
            edge.append(self.order[lo:bisect.bisect_right(self.sorted, s[L - j:], lo, key=head)])
        code = np.zeros(len(self.blobs), np.int8)
        code[np.concatenate(edge)] = EDGE
        code[inside] = INSIDE
        ids = np.flatnonzero(code)
        return ids, code[ids]


class StopStrings:
    """The stop strings of a batch's rows; ends(rows, tok, earlier) says which rows a step's tokens end."""

    def __init__(self, stops, table):
        """stops: [B] sequences of str (empty strings never match); table: a TokenTable or token id -> bytes."""
        self.table = TokenTable.of(table)
        self.W = len(self.table) + 1          # key stride: token id W-1 stands for ids outside the table
        # rows with the same stop strings form a group; group 0: none
        groups = {(): 0}
        self.group = np.array([groups.setdefault(tuple(sorted({s.encode("utf-8") for s in row if s})), len(groups))
                               for row in stops], np.int64)                                          # [B]
        self.strings = list(groups)                                                                  # [G]
        self.keep = [max(map(len, g), default=1) - 1 for g in self.strings]   # [G] bytes before a token to read
        # each group's candidate tokens as keys group * W + token, ascending, then one above any key
        keys, codes = [], []
        for g, strings in enumerate(self.strings):
            found = [self.table.candidates(s) for s in strings]
            ids = np.unique(np.concatenate([i for i, _ in found] + [np.zeros(0, np.int64)]))
            code = np.zeros(self.W, np.int8)
            for i, c in found:
                code[i] = np.maximum(code[i], c)
            keys.append(g * self.W + ids)
            codes.append(code[ids])
        self.keys = np.concatenate(keys + [[np.iinfo(np.int64).max]])
        self.codes = np.concatenate(codes + [np.zeros(1, np.int8)])

    @classmethod
    def of(cls, stops, vocab_dir, vocab_size):
        """A matcher for rows with these stop strings, or None when no row has one (the token table, which needs
        the tokenizer, is built only then)."""
        if not any(s for row in stops for s in row):
            return None
        return cls(stops, token_bytes(vocab_dir, vocab_size))

    def ends(self, rows, tok, earlier):
        """Rows rows [n] generated tokens tok [n]; earlier(b): row b's generated tokens before this one (oldest
        first, a list or array; read only for a few rows). Returns a mask [n]: the rows whose generated text now
        contains one of their stop strings (rows without any cost a look-up)."""
        key = self.group[rows] * self.W + np.minimum(tok, self.W - 1)
        pos = np.searchsorted(self.keys, key)
        code = np.where(self.keys[pos] == key, self.codes[pos], 0)
        hit = code == INSIDE
        for i in np.flatnonzero(code == EDGE):
            b = int(rows[i])
            hit[i] = self._straddles(self.group[b], int(tok[i]), earlier(b))
        return hit

    def _straddles(self, g, t, prev):
        """Whether the text of a row of group g ends in one of its stop strings within token t, prev its earlier
        tokens."""
        need = k = self.keep[g]
        get = self.table.get
        while True:        # need tokens hold need bytes, unless some hold none (ids the tokenizer does not know)
            head = b"".join([get(x) for x in prev[max(len(prev) - k, 0):]])
            if len(head) >= need or k >= len(prev):
                break
            k *= 2
        text = head + get(t)
        return any(s in text for s in self.strings[g])
