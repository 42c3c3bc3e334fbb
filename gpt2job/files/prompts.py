"""Input prompts: reading the input HDF5, tokenising text, validating every prompt before work starts.

Input contract: a dataset `prompt_tokens` (variable-length int rows [N] or a 2-D int array [N, T])
or `prompts` (variable-length UTF-8 strings [N]); `prompt_tokens` wins when both exist.
"""
import hashlib
import os
import sys
from dataclasses import dataclass

import numpy as np

from gpt2job.errors import UserError, plural
from gpt2job.files.h5files import contents, open_readable
from gpt2job.settings import max_prompt_length

DATASET_FIX = "write a dataset 'prompts' (UTF-8 strings) or 'prompt_tokens' (int token rows); see README"


@dataclass
class PromptSet:
    """All prompts as one flat token array: prompt i is tokens[offsets[i]:offsets[i+1]]."""
    offsets: np.ndarray   # [N+1] int64
    tokens: np.ndarray    # [total] int64 (wide enough to hold bad ids for the error message)
    source: str           # which dataset they came from

    def __len__(self):
        return len(self.offsets) - 1

    @property
    def lengths(self):
        return np.diff(self.offsets)

    def prompt(self, i):
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def fingerprint(self):
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.offsets, "<i8").tobytes())
        h.update(np.ascontiguousarray(self.tokens, "<i8").tobytes())
        return "sha256:" + h.hexdigest()[:32]

    @classmethod
    def from_lists(cls, rows, source):
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(r) for r in rows])
        tokens = np.concatenate([np.asarray(r, np.int64) for r in rows]) if rows else np.zeros(0, np.int64)
        return cls(offsets, tokens.astype(np.int64), source)


def group_identical(prompts: PromptSet, rows):
    """Group rows whose prompts are identical token sequences.

    Returns (representatives, copies): representatives are the rows (in the given order) whose prompt
    no earlier row of `rows` has; copies maps each representative that has copies to an int64 array of
    the later rows with the same prompt, in order."""
    rows = np.asarray(rows, np.int64)
    off = prompts.offsets.tolist()
    tok = prompts.tokens
    first = {}
    rep_of = np.empty(len(rows), np.int64)
    for k, r in enumerate(rows.tolist()):  # the bytes of an int64 slice: its length is part of the key
        rep_of[k] = first.setdefault(tok[off[r]:off[r + 1]].tobytes(), r)
    is_copy = rep_of != rows
    if not is_copy.any():
        return rows, {}
    dup_rows, dup_reps = rows[is_copy], rep_of[is_copy]
    order = np.argsort(dup_reps, kind="stable")
    dup_rows, dup_reps = dup_rows[order], dup_reps[order]
    starts = np.flatnonzero(np.r_[True, dup_reps[1:] != dup_reps[:-1]])
    copies = {int(dup_reps[a]): c for a, c in zip(starts, np.split(dup_rows, starts[1:]))}
    return rows[~is_copy], copies


PROBE = """
import sys, h5py
with h5py.File(sys.argv[1], "r") as f:
    for name in ("prompt_tokens", "prompts"):
        if name in f:
            f[name][()]
            break
"""


def probe_readable(path):
    """Read the prompts once in a child process with a deadline: on some damaged files the HDF5
    library loops forever, and a job must end with a message rather than hang. Any other failure
    is left to the real read, which names it."""
    import subprocess
    try:
        size = os.path.getsize(path)
    except OSError:
        return
    timeout = 60 + 30 * size / 1e9
    try:
        subprocess.run([sys.executable, "-c", PROBE, path], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"reading it did not finish within {timeout:.0f} s (the HDF5 library loops on this file)",
                        path, "input", "the file is damaged; write it again")
    except OSError:
        pass


def read_prompts(path, tokenizer_factory):
    """Read the prompts of an input file. tokenizer_factory() is called only for text prompts."""
    probe_readable(path)
    with open_readable(path, "input", "give an HDF5 file made by `python -m gpt2job prompts`") as f:
        try:
            if "prompt_tokens" in f:
                return _read_token_dataset(path, f["prompt_tokens"])
            if "prompts" in f:
                texts = _read_text_dataset(path, f["prompts"])
            else:
                raise UserError(f"no 'prompts' or 'prompt_tokens' dataset ({contents(f)})", path, "datasets",
                                DATASET_FIX)
        except (KeyError, OSError, RuntimeError, ValueError, TypeError) as e:
            # damaged structure, dangling or looping links, unreadable types
            raise UserError(f"cannot be read ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})",
                            path, "datasets", "the file is damaged; write it again (" + DATASET_FIX + ")")
    enc = tokenizer_factory()
    from gpt2job.model.tokenizer import EOT
    rows = enc.encode_batch(texts, allowed_special={EOT}) if texts else []
    return PromptSet.from_lists(rows, "prompts")


def _read_token_dataset(path, ds):
    import h5py
    field = "prompt_tokens"
    if not isinstance(ds, h5py.Dataset):
        raise UserError("is a group, not a dataset", path, field, DATASET_FIX)
    vlen = h5py.check_vlen_dtype(ds.dtype)
    try:
        if vlen is not None:
            if ds.ndim != 1 or not isinstance(vlen, np.dtype) or vlen.kind not in "iu":
                raise UserError(f"variable-length rows must be integers in a 1-D dataset (got {vlen}, ndim {ds.ndim})",
                                path, field, "store token ids as vlen int32 rows [N]")
            rows = ds[()]
            return PromptSet.from_lists([np.asarray(r, np.int64) for r in rows], field)
        if ds.dtype.kind not in "iu" or ds.ndim != 2:
            raise UserError(f"must be integer token ids, [N, T] or variable-length rows (got dtype {ds.dtype}, "
                            f"shape {ds.shape})", path, field, "store token ids as int32")
        arr = ds[()].astype(np.int64)                                            # [N, T]
    except (OSError, RuntimeError) as e:
        raise UserError(f"cannot be read ({str(e).splitlines()[0][:120]})", path, field,
                        "the file is damaged; write it again")
    n, t = arr.shape
    return PromptSet(np.arange(n + 1, dtype=np.int64) * t, arr.reshape(-1), field)


def _read_text_dataset(path, ds):
    import h5py
    field = "prompts"
    if not isinstance(ds, h5py.Dataset):
        raise UserError("is a group, not a dataset", path, field, DATASET_FIX)
    if ds.ndim != 1 or (h5py.check_string_dtype(ds.dtype) is None and ds.dtype.kind not in "SUO"):
        raise UserError(f"must be a 1-D dataset of strings (got dtype {ds.dtype}, shape {ds.shape})", path, field,
                        "write prompts as variable-length UTF-8 strings")
    try:
        raw = ds[()]
    except (OSError, RuntimeError) as e:
        raise UserError(f"cannot be read ({str(e).splitlines()[0][:120]})", path, field,
                        "the file is damaged; write it again")
    texts = []
    for i, s in enumerate(raw):
        if isinstance(s, bytes):
            try:
                s = s.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"row {i} is not valid UTF-8 ({e.reason} at byte {e.start})", path, field,
                                "store prompts as UTF-8 text, or give token ids in 'prompt_tokens'")
        elif not isinstance(s, str):
            s = str(s)
        texts.append(s)
    return texts


@dataclass
class Validation:
    invalid: np.ndarray          # [N] bool
    reasons: dict                # reason -> indices (int64 array)

    @property
    def n_invalid(self):
        return int(self.invalid.sum())

    def message(self, path, limit=10):
        parts = []
        for reason, idx in self.reasons.items():
            if len(idx):
                first = ", ".join(str(int(i)) for i in idx[:limit])
                more = ", ..." if len(idx) > limit else ""
                parts.append(f"{len(idx)} {reason} ({'row' if len(idx) == 1 else 'rows'} {first}{more})")
        return (f"{self.n_invalid} of {plural(len(self.invalid), 'prompt')} {'is' if self.n_invalid == 1 else 'are'} "
                "invalid: " + "; ".join(parts))


def validate(prompts: PromptSet, n_positions, vocab_size, max_new_tokens):
    """Flag empty prompts, prompts too long to leave room for max_new_tokens (settings.max_prompt_length), ids
    outside the vocabulary."""
    lengths = prompts.lengths                                                   # [N]
    limit = max_prompt_length(n_positions, max_new_tokens)
    empty = lengths == 0
    too_long = lengths > limit
    bad_tok = np.zeros(len(prompts), dtype=bool)
    if prompts.tokens.size:
        bad = (prompts.tokens < 0) | (prompts.tokens >= vocab_size)             # [total]
        if bad.any():
            row_of = np.searchsorted(prompts.offsets, np.flatnonzero(bad), side="right") - 1
            bad_tok[np.unique(row_of)] = True
    reasons = {
        "empty": np.flatnonzero(empty),
        f"longer than {limit} tokens (n_positions {n_positions} - max_new_tokens {max_new_tokens} + 1)":
            np.flatnonzero(too_long),
        f"with token ids outside 0..{vocab_size - 1}": np.flatnonzero(bad_tok),
    }
    return Validation(empty | too_long | bad_tok, reasons)
