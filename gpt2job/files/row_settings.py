"""Per-row generation settings: optional datasets of the input file beside the prompts, one value per row.

  max_new_tokens, top_k, seed               integers (a negative value: no value for that row); floats are
                                            accepted too (NaN: no value; other values must be whole numbers)
  temperature, top_p, repetition_penalty    numbers (NaN, or a negative integer in an integer dataset: no value)
  stop                                      UTF-8 strings, [N] (one stop string per row) or [N, K] (up to K);
                                            "" is no value

A row without a value takes the job's flag (--max-new-tokens, ..., --stop). Every value is read into NumPy arrays
(about 44 bytes a row, resolved, plus the stop strings' bytes) and checked before work starts: the first bad row
of a dataset is one clear line (UserError, exit 2). Only `stop` makes a Python object per row, while it is read
(files/row_stops.py).
"""
import difflib
import functools
import hashlib
import json
from dataclasses import dataclass

import numpy as np

from gpt2job.chunks import ROW_FIELDS, RowParams
from gpt2job.errors import UserError, first_line, plural, warn
from gpt2job.files.h5files import check_rows_shape
from gpt2job.files.prompts import BLOCK_ROWS, PROMPT_DATASETS
from gpt2job.files.row_stops import STOP, StopTable, read_stop_dataset
from gpt2job.settings import MIN_TEMPERATURE

NUMERIC = tuple(n for n, _ in ROW_FIELDS)
ROW_DATASETS = NUMERIC + (STOP,)
INTEGER = ("max_new_tokens", "top_k", "seed")
ALIASES = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens"}   # vLLM's and OpenAI's names
# settings a row cannot have: the job's flags (a row with one would silently take the flag's value) ...
JOB_WIDE = {"stop_token_ids": "--stop-token-ids", "ignore_eos": "--ignore-eos", "logprobs": "--logprobs",
            "top_logprobs": "--top-logprobs", "num_samples": "--num-samples"}
# ... and vLLM's sampling parameters that gpt2job does not have: warned of, not refused ("n" may be the user's own)
NOT_GPT2JOB = ("presence_penalty", "frequency_penalty", "min_p", "min_tokens", "best_of", "n", "logit_bias",
               "length_penalty", "use_beam_search", "skip_special_tokens", "include_stop_str_in_output")
NO_VALUE = "NaN (float datasets) or a negative number (integer datasets) takes the flag's value"
FIX = f"one value per row; {NO_VALUE}"

# (what a value must be, the test on the values as stored: float64/float32/int32/int64 arrays)
RULES = {
    "max_new_tokens": ("an integer in 1..2^31-1", lambda v: v >= 1),   # (beyond int32: refused by the conversion)
    "temperature": (f"a finite number >= 0 (below {MIN_TEMPERATURE}: greedy)", lambda v: np.isfinite(v) & (v >= 0)),
    "top_k": ("an integer in 0..2^31-1", lambda v: v >= 0),
    "top_p": ("a number in (0, 1]", lambda v: (v > 0) & (v <= 1)),
    "seed": ("an integer in 0..2^63-1", lambda v: v >= 0),
    "repetition_penalty": ("a finite number > 0", lambda v: np.isfinite(v) & (v > 0)),
}


@dataclass
class InputRowSettings:
    """The input's per-row settings, resolved (the job's flag where a row has no value)."""
    given: tuple             # the per-row datasets the input has
    values: dict             # name -> [N] array (ROW_FIELDS dtype), every row resolved
    stops: "StopTable"       # each row's stop strings, resolved
    fingerprint: str         # of the datasets as stored and the flags they fall back to (the resume key)

    @property
    def max_new_tokens(self):
        return self.values["max_new_tokens"]

    def key(self):
        """What the output's resume key records of them."""
        return {"datasets": list(self.given), "fingerprint": self.fingerprint}

    def params(self, rows):
        """RowParams of these input rows (a chunk's; with --num-samples N, output row r's input row is r // N)."""
        rows = np.asarray(rows, np.int64)
        so, sb = self.stops.take(rows)
        return RowParams(*(self.values[n][rows] for n in NUMERIC), so, sb)

    def describe(self):
        return f"per-row {', '.join(self.given)} from the input"


def present(f):
    """The per-row datasets an open input file has."""
    return tuple(n for n in ROW_DATASETS if n in f)


def _squash(name):
    return name.lower().replace("_", "").replace("-", "")


def _edits(a, b):
    """Levenshtein distance."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def near_setting(key):
    """(the per-row setting a JSONL field's or an input dataset's name stands for, or resembles; whether surely):
    surely for another spelling (topP, Max-New-Tokens), a known alias (max_tokens) or a long name two edits from one
    (temprature); resembles by difflib (step ~ stop, seeds ~ seed: perhaps the user's own field)."""
    if key in ALIASES:
        return ALIASES[key], True
    for name in ROW_DATASETS:
        if _squash(key) == _squash(name) or (len(key) >= 8 and _edits(key.lower(), name) <= 2):
            return name, True
    near = difflib.get_close_matches(key.lower(), ROW_DATASETS, n=1, cutoff=0.75)
    return (near[0] if near else None), False


@functools.lru_cache(maxsize=4096)   # asked for every JSONL line's own fields (an "id" on each of millions of lines)
def misnamed(key):
    """What a JSONL field or an input dataset that gpt2job does not read stands for: (what, fix) when it surely is a
    setting its rows would silently go without (temprature, topP, vLLM's max_tokens, a job-wide flag's name): refused;
    (what, None) when it may be one (step ~ stop, vLLM's presence_penalty): warned of; None: the user's own data."""
    if key in JOB_WIDE:
        return (f"is a setting of the whole job ({JOB_WIDE[key]}), not of a row",
                f"give {JOB_WIDE[key]} on the command line, or rename it if it is your own data")
    if key in NOT_GPT2JOB:
        return "is not a gpt2job setting (vLLM's): ignored", None
    setting, sure = near_setting(key)
    if sure:
        return f"is not a gpt2job setting (did you mean {setting!r}?)", f"name it {setting!r}, or rename it if it is " \
            "your own data"
    return (f"is not a gpt2job setting: ignored (a per-row setting is named {setting!r})", None) if setting else None


def check_names(path, f, known):
    """An input's top-level names other than known (its prompts) and the per-row datasets, as misnamed() says: one
    that surely is a setting is refused, as in a JSONL line; one that may be is warned of; the rest are the user's."""
    for key in f:
        if key in known or key in ROW_DATASETS or not (hit := misnamed(str(key))):
            continue
        if hit[1]:
            raise UserError(hit[0], path, key, hit[1])
        warn(f"{path}: dataset {key!r} {hit[0]}")


def read_row_settings(path, n_rows, s):
    """The input's per-row settings resolved against the job's flags (JobSettings s), every value checked; None
    when the input has none of the datasets (the job's flags then hold for every row, as before)."""
    from gpt2job.files.h5files import open_readable
    with open_readable(path, "input", "give an HDF5 file made by `python -m gpt2job prompts`") as f:
        check_names(path, f, PROMPT_DATASETS)
        given = present(f)
        if not given:
            return None
        h = hashlib.sha256()
        h.update(json.dumps({n: getattr(s, n) for n in NUMERIC} | {"stop": list(s.stop)}, sort_keys=True).encode())
        values, stops = {}, StopTable(s.stop)
        try:
            for name in NUMERIC:
                if name in f:
                    values[name] = _read_numeric(path, f[name], name, n_rows, getattr(s, name), h)
                else:
                    values[name] = np.full(n_rows, getattr(s, name), dict(ROW_FIELDS)[name])
            if STOP in f:
                so, sb = read_stop_dataset(path, f[STOP], n_rows, h)
                stops = StopTable(s.stop, so, sb)
        except (KeyError, OSError, RuntimeError, ValueError, TypeError) as e:
            raise UserError(f"cannot be read ({first_line(e)})",
                            path, "per-row settings", "the file is damaged; write it again")
        warn_greedy_rows(s.converted_from or path, given, values, s)   # (the file the user gave)
        return InputRowSettings(given, values, stops, "sha256:" + h.hexdigest()[:32])


def warn_greedy_rows(path, given, values, s):
    """Rows with their own top_k, top_p or seed that decode greedily (temperature 0, their own or the flag's): those
    have no effect there, as the flags' own warning says (cli.py); a vLLM user expects sampling (its default is 1)."""
    own = [n for n in ("top_k", "top_p", "seed") if n in given]
    greedy = values["temperature"] == 0   # (resolved: a temperature below MIN_TEMPERATURE is 0 here)
    hit = np.zeros(len(greedy), bool)
    for name in own:
        hit |= greedy & (values[name] != getattr(s, name))
    if hit.any():
        warn(f"{path}: {plural(int(hit.sum()), 'row')} with their own {', '.join(own)} "
             f"decode greedily (temperature 0: their own or --temperature's), where those have no effect; "
             f"give them a temperature >= {MIN_TEMPERATURE} to sample")


def _refuse(path, name, bad_rows_first, n_bad, what, got):
    raise UserError(f"row {bad_rows_first} is {got}: each value must be {what} "
                    f"({plural(n_bad, 'row')} bad)", path, name, FIX)


def _read_numeric(path, ds, name, n_rows, default, h):
    """One numeric dataset resolved: [N] of its ROW_FIELDS dtype; h hashes it as stored."""
    check_rows_shape(path, ds, name, n_rows, FIX)
    kind = ds.dtype.kind
    if kind not in "iuf":
        raise UserError(f"has dtype {ds.dtype}: it must be numbers", path, name,
                        f"write it as integers or floats, one value per row ({NO_VALUE})")
    dtype = np.dtype(dict(ROW_FIELDS)[name])
    out = np.empty(n_rows, dtype)
    what, ok = RULES[name]
    first, n_bad = None, 0
    h.update(f"{name}:{ds.dtype.str}".encode())
    for a in range(0, n_rows, BLOCK_ROWS):
        raw = ds[a:a + BLOCK_ROWS]
        h.update(np.ascontiguousarray(raw, raw.dtype.newbyteorder("<")))
        with np.errstate(over="ignore", invalid="ignore"):    # out of the dtype's range: inf, refused below
            vals, bad, missing = _convert(raw, kind, name, dtype)
            bad |= ~missing & ~ok(vals)
        vals[missing] = default
        if name == "temperature":    # greedy below it, as the flag (settings.MIN_TEMPERATURE)
            vals[vals < np.float32(MIN_TEMPERATURE)] = 0
        out[a:a + len(raw)] = vals
        if bad.any():
            idx = np.flatnonzero(bad)
            if first is None:
                first = (a + int(idx[0]), raw[idx[0]])
            n_bad += len(idx)
    if first is not None:
        _refuse(path, name, first[0], n_bad, what, _show(first[1]))
    return out


def _convert(raw, kind, name, dtype):
    """A block as stored -> (values in dtype, bad: not representable there, missing: no value)."""
    if kind == "f":
        raw = raw.astype(np.float64)
        missing = np.isnan(raw)
        bad = np.zeros(len(raw), bool)
        if name in INTEGER:           # whole numbers within the integer type
            lim = np.iinfo(dtype)
            bad = ~missing & ((raw != np.floor(raw)) | (raw < lim.min) | (raw >= float(lim.max) + 1))
        return np.where(missing | bad, 0, raw).astype(dtype), bad, missing
    missing = raw < 0 if kind == "i" else np.zeros(len(raw), bool)
    bad = np.zeros(len(raw), bool)
    if dtype.kind == "i":             # beyond the type (a uint64 seed above 2^63-1, a huge max_new_tokens)
        bad = ~missing & (raw > np.iinfo(dtype).max)
    return np.where(missing | bad, 0, raw).astype(dtype), bad, missing


def _show(v):
    v = v.item() if hasattr(v, "item") else v
    return repr(v) if isinstance(v, float) else str(v)
