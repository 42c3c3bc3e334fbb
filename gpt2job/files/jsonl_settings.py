"""Per-row settings given in a JSONL prompts file: {"prompt": "...", "max_new_tokens": 8, "temperature": 0.7,
"stop": ["\n"]}. The fields are those of the input's per-row datasets (files/row_settings.py); the conversion
(files/prompt_files.py) checks each value where its line is known and writes them as those datasets, with "no value"
(NaN, -1, "") for lines without the field: such rows take the job's flag, as in an HDF5 input."""
from array import array

import numpy as np

from gpt2job.errors import UserError, warn
from gpt2job.files.row_settings import INTEGER, ROW_DATASETS, RULES, STOP, misnamed

FIX = "give the value as README 'Per-row settings and stops' says, or leave the field out (the flag's value)"
PROMPT_FIELDS = {"prompt": None, "text": str, "tokens": list, "prompt_tokens": list}   # a line's prompt: its type
KNOWN = (*ROW_DATASETS, *PROMPT_FIELDS)   # the fields gpt2job reads from a line
LIMITS = {"max_new_tokens": 2 ** 31 - 1, "top_k": 2 ** 31 - 1, "seed": 2 ** 63 - 1}   # the datasets' int32 / int64


class JsonlRows:
    """The per-row settings of a JSONL file's lines, as read: name -> (prompt indices, values), in compact arrays
    (16 bytes a value; a stop's strings are a tuple each), for a file of millions of lines."""

    def __init__(self):
        self.values = {}
        self.warned = set()   # fields named like a setting, said once

    def add(self, i, obj, path, n):
        """The settings fields of line n's object (prompt i), checked. Other fields are the user's own (an id), but
        one that surely stands for a setting (row_settings.misnamed: temprature, vLLM's max_tokens, stop_token_ids) is
        refused, and one that may (step, presence_penalty) is warned of once."""
        for key in obj:
            if key not in KNOWN and (hit := misnamed(str(key))):
                if hit[1]:
                    raise UserError(f"field {key!r} {hit[0]}", path, f"line {n}", hit[1])
                if key not in self.warned:
                    self.warned.add(key)
                    warn(f"{path}: line {n}: field {key!r} {hit[0]}")
        for name in ROW_DATASETS:
            if name in obj and obj[name] is not None:
                v = _value(name, obj[name], path, n)
                if name not in self.values:
                    self.values[name] = (array("q"), [] if name == STOP else array("q" if name in INTEGER else "d"))
                self.values[name][0].append(i)
                self.values[name][1].append(v)

    def write(self, f, n_rows):
        """The datasets, into the HDF5 file f being written (only those some line gave)."""
        import h5py
        for name, (rows, vals) in self.values.items():
            rows = np.frombuffer(rows, np.int64)
            if name == STOP:
                k = max(map(len, vals))
                data = np.full((n_rows, k), "", object)
                for r, stops in zip(rows, vals):
                    data[r, :len(stops)] = stops
                f.create_dataset(name, data=data[:, 0] if k == 1 else data, dtype=h5py.string_dtype("utf-8"))
            elif name in INTEGER:
                data = np.full(n_rows, -1, np.int64)
                data[rows] = np.frombuffer(vals, np.int64)
                f.create_dataset(name, data=data)
            else:
                data = np.full(n_rows, np.nan, np.float64)
                data[rows] = np.frombuffer(vals, np.float64)
                f.create_dataset(name, data=data)


def _value(name, v, path, n):
    where = f"line {n}"
    if name == STOP:
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(x, str) and x and "\x00" not in x for x in stops):
            raise UserError("stop must be a string or a list of strings (not empty, without NUL; for the --stop "
                            "strings leave the field out or give [])", path, where, FIX)
        return tuple(stops)
    integral = isinstance(v, int) or (isinstance(v, float) and v.is_integer())
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (name in INTEGER and not integral):
        raise UserError(f"{name} is {v!r}: it must be {RULES[name][0]}", path, where, FIX)
    if name in INTEGER:   # (each value its own NumPy scalar: the datasets' rules, 3-4x faster than a 1-array)
        v = int(v)
        ok = 0 <= v <= LIMITS[name] and bool(RULES[name][1](np.int64(v)))
    else:
        ok = abs(v) < 1e300 and bool(RULES[name][1](np.float64(v)))   # (a huge JSON integer)
    if not ok:
        raise UserError(f"{name} is {v!r}: it must be {RULES[name][0]}", path, where, FIX)
    return v
