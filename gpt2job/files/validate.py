"""Compare an output's completion tokens with expected tokens: an int32 file [N, new_tokens] like the
old system's answer.bin, or another gpt2job output file. Reports the mismatch rate and the first
mismatch; passes at a tolerance (0.05% of compared tokens by default, as the old system did)."""
import contextlib
import os
import sys

import numpy as np

from gpt2job.errors import UserError, first_line
from gpt2job.files import h5flat
from gpt2job.files.h5files import contents, has_hdf5_signature, open_readable, reading

EXIT_VALIDATION_FAILED = 4


BLOCK = 1 << 16   # rows compared at once: two outputs of many millions of rows are streamed, never held whole
FIX = "give a gpt2job output file or an int32 answer file"


def _token_rows(f, path, a, b):
    """Rows a..b-1 of an open output's completion_tokens, as int64 arrays (a UserError where they are not ids)."""
    try:
        with reading(path):   # (each file's reads apart: an error names the file it came from)
            rows = h5flat.rows(f, "completion_tokens", a, b)
        return [np.asarray(r).astype(np.int64, casting="safe") for r in rows]
    except (TypeError, ValueError) as e:   # strings, floats, a scalar: not token ids
        raise UserError(f"its completion_tokens are not rows of token ids ({first_line(e)})", path,
                        "completion_tokens", FIX)


def _open_output(stack, path):
    """An output file opened for reading its rows (damaged: one line, h5files.reading); -> (file, its row count)."""
    import h5py
    f = stack.enter_context(open_readable(path, "file", FIX))
    with reading(path):
        if not h5flat.has(f, "completion_tokens") or "done" not in f:
            raise UserError(f"no 'completion_tokens' and 'done' datasets ({contents(f)})", path, "completion_tokens",
                            FIX)
        ds = f["completion_tokens_data" if h5flat.is_flat(f) else "completion_tokens"]
        base = h5py.check_vlen_dtype(ds.dtype) or ds.dtype   # (a vlen string's is str)
        if not isinstance(base, np.dtype) or base.kind not in "iu":   # strings, floats: said before any row is read
            raise UserError(f"its completion_tokens are not rows of token ids (dtype {ds.dtype})", path,
                            "completion_tokens", FIX)
        return f, len(f["done"])


class _Expected:
    """The expected tokens, a block of rows at a time: another gpt2job output (only its done rows count; a row
    ends where that job ended it, so our row's length is compared too) or an int32 answer file [N, new_tokens]
    (every row, as wide as the file)."""

    def __init__(self, stack, path, n_rows, field):
        self.field = field   # how the user named the file: run's --validate, the validate command's answer
        if not os.path.isfile(path):
            raise UserError("no such file", path, field, "give the expected-tokens file")
        self.h5 = has_hdf5_signature(path)   # (else an int32 answer file, whatever its name)
        self.path, self.exact, self.int64_like = path, self.h5, None
        if self.h5:
            self.f, n = _open_output(stack, path)
            if n != n_rows:
                raise UserError(f"has {n} rows, the output has {n_rows}", path, field,
                                "compare outputs of the same input")
            return
        size = os.path.getsize(path)
        if n_rows == 0 or size == 0 or size % (4 * n_rows):
            raise UserError(f"{size} bytes is not {n_rows} rows of int32", path, field,
                            "give an int32 file of shape [N, new_tokens] with one row per prompt")
        self.arr = np.memmap(path, dtype="<i4", mode="r").reshape(n_rows, -1)
        self.int64_like = self.arr.shape[1] >= 4 and self.arr.shape[1] % 2 == 0   # until a block says otherwise
        self.seen_low = False

    def block(self, a, b):
        """(expected rows a..b-1, the mask of those to compare)."""
        if self.h5:
            with reading(self.path):
                done = self.f["done"][a:b] == 1
            return _token_rows(self.f, self.path, a, b), done
        rows = np.asarray(self.arr[a:b])
        # token ids < 2^31: an int64 file's high words are 0 (4 columns at least: a 2-wide int32 file of tokens then
        # zeros is not taken for one); decided over every row, said after the scan
        if self.int64_like:
            self.seen_low |= bool(rows[:, 0::2].any())
            self.int64_like = not rows[:, 1::2].any()
        return [r.astype(np.int64) for r in rows], np.ones(b - a, bool)

    def check_width(self):
        if self.int64_like and self.seen_low:
            raise UserError("every second int32 is 0: int64 tokens, not int32", self.path, self.field,
                            "write the tokens as int32, e.g. numpy: tokens.astype('<i4').tofile(path)")


def check_answer(path, n_rows):
    """The UserError report_validation would raise for an expected-tokens file of the wrong size or row count."""
    with contextlib.ExitStack() as stack:
        _Expected(stack, path, n_rows, "--validate")


def compare(ours, expected, exact=False):
    """Token-by-token comparison over each row's expected length (a missing token is a mismatch; exact: a token
    past it too)."""
    total = mismatched = 0
    first = None
    for i, (a, e) in enumerate(zip(ours, expected)):
        n = len(e)
        extra = max(0, len(a) - n) if exact else 0
        total += n + extra
        a = a[:n + extra]
        m = min(len(a), n)
        diff = np.flatnonzero(a[:m] != e[:m]).tolist() + list(range(m, n + extra))
        mismatched += len(diff)
        if diff and first is None:
            j = diff[0]
            first = (i, j, int(a[j]) if j < len(a) else None, int(e[j]) if j < n else None)
    return total, mismatched, first


def report_validation(output, expected_path, tolerance, out=None, field="--validate"):
    """Compare a finished output's tokens with expected_path's (the exit code: 0 within tolerance; 0 when no
    reference is given), a block of rows at a time."""
    out = out or sys.stdout   # (looked up now: a default bound at import outlives a replaced stdout)
    if not expected_path:
        return 0
    with contextlib.ExitStack() as stack:
        f, n = _open_output(stack, output)
        exp = _Expected(stack, expected_path, n, field)
        total = bad = compared = unfinished = 0
        first = None
        for a in range(0, n, BLOCK):
            b = min(n, a + BLOCK)
            with reading(output):   # (an unfinished output's rows not done are no evidence either: a stopped job's)
                mine = f["done"][a:b] == 1
            unfinished += int((~mine).sum())
            ours, (expected, take) = _token_rows(f, output, a, b), exp.block(a, b)
            rows = np.flatnonzero(take & mine)
            t, m, fb = compare([ours[i] for i in rows], [expected[i] for i in rows], exp.exact)
            total, bad, compared = total + t, bad + m, compared + len(rows)
            if fb and first is None:
                first = (a + int(rows[fb[0]]), *fb[1:])
        exp.check_width()
    if compared == 0:
        raise UserError("has no completed row to compare with", output if unfinished == n else expected_path,
                        "file" if unfinished == n else field, "give a finished output, or rerun its job to finish it")
    if compared < n:   # an unfinished output, either: its missing rows are no evidence either way
        where = f"{output} or {expected_path}" if unfinished else expected_path
        out.write(f"gpt2job: validate: {n - compared:,} of {n:,} rows are not done in {where}: compared the other "
                  f"{compared:,}\n")
    rate = bad / total if total else 0.0
    ok = rate <= tolerance
    out.write(f"gpt2job: validate against {expected_path}: {bad} of {total} tokens differ "
              f"({100 * rate:.4f}%, tolerance {100 * tolerance:.4f}%): {'PASS' if ok else 'FAIL'}\n")
    if first:
        row, pos, got, want = (x if x is not None else "the row's end" for x in first)
        out.write(f"gpt2job:   first mismatch: row {row}, token {pos}: got {got}, expected {want}\n")
    out.flush()
    return 0 if ok else EXIT_VALIDATION_FAILED
