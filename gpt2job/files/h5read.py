"""Reading an existing output file before a job decides what to do with it: its status and resume key, whether it
holds completed rows, and those rows (for an unfinished output whose journal is gone), a block of rows at a time."""
import json
import os

import numpy as np

from gpt2job.chunks import FINISH_INVALID, FINISH_NAMES, FINISH_STOP, FINISH_STOP_STRING, Completions
from gpt2job.errors import UserError
from gpt2job.files import h5flat

BLOCK_ROWS = 1 << 20


def read_status(path):
    """(finished, settings key) of an existing gpt2job output; (None, None) for anything else: a file
    that is not HDF5, is damaged, or is HDF5 without our resume key."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            if "resume_key" not in f.attrs:
                return None, None
            return bool(f.attrs.get("finished", 0)), json.loads(f.attrs["resume_key"])
    except (OSError, ValueError, KeyError, RuntimeError, TypeError):
        return None, None


def h5_has_completed_rows(path):
    """Does the output hold a row with a result (rows marked 'invalid' are none)? True when unreadable: the resume
    check then says what is wrong."""
    import h5py
    invalid = FINISH_NAMES[FINISH_INVALID]
    try:
        with h5py.File(path, "r") as f:
            for a in range(0, len(f["done"]), BLOCK_ROWS):
                done = np.flatnonzero(f["done"][a:a + BLOCK_ROWS] == 1)
                reasons = f["finish_reason"][a:a + BLOCK_ROWS][done] if len(done) else []
                if any((r.decode() if isinstance(r, bytes) else r) != invalid for r in reasons):
                    return True
    except (OSError, KeyError, RuntimeError, ValueError):
        return True
    return False


def records_from_h5(path):
    """The completed rows of an unfinished output that has no journal, as Completions of up to BLOCK_ROWS rows."""
    import h5py
    codes = {v: k for k, v in FINISH_NAMES.items() if k != FINISH_STOP_STRING}    # "stop": see stop_codes
    with h5py.File(path, "r") as f:
        for a in range(0, len(f["done"]), BLOCK_ROWS):
            done = np.flatnonzero(f["done"][a:a + BLOCK_ROWS] == 1)
            if len(done) == 0:
                continue
            toks = h5flat.rows(f, "completion_tokens", a, a + BLOCK_ROWS)
            reasons = f["finish_reason"][a:a + BLOCK_ROWS]
            finish = np.array([codes.get(r.decode() if isinstance(r, bytes) else r, 0) for r in reasons[done]],
                              np.uint8)
            if "stop_reason" in f:
                stop_codes(finish, [toks[i] for i in done], f["stop_reason"][a:a + BLOCK_ROWS][done])
            comp = Completions.from_lists(-1, done + a, [toks[i] for i in done], finish)
            if h5flat.has(f, "completion_logprobs"):     # --logprobs: they go into the journal with their rows
                _read_logprobs(f, comp, done, a)
            yield comp


def _read_logprobs(f, comp, done, a):
    """comp (rows a + done of the file) gets the rows' log-probabilities and top K (h5logprobs.py layout)."""
    b = a + BLOCK_ROWS
    lp = h5flat.rows(f, "completion_logprobs", a, b)
    comp.logprobs = np.concatenate([np.asarray(lp[i], np.float32) for i in done] + [np.zeros(0, np.float32)])
    if h5flat.has(f, "top_logprobs"):
        k = int(h5flat.top_dataset(f).attrs["top_logprobs_k"])
        ids, top = h5flat.rows(f, "top_logprob_ids", a, b), h5flat.rows(f, "top_logprobs", a, b)
        comp.top_ids = np.concatenate([np.asarray(ids[i], np.int32) for i in done] + [np.zeros(0, np.int32)]
                                      ).reshape(-1, k)
        comp.top_logprobs = np.concatenate([np.asarray(top[i], np.float32) for i in done] +
                                           [np.zeros(0, np.float32)]).reshape(-1, k)


def stop_codes(finish, tokens, stop_reason):
    """"stop" is two codes: FINISH_STOP (the last token is EOS or a stop token id: stop_reason "" or that id) and
    FINISH_STOP_STRING (stop_reason the stop string). finish (uint8, FINISH_STOP for both) is set in place from each
    row's stop_reason and last token."""
    for k in np.flatnonzero(finish == FINISH_STOP).tolist():
        r = stop_reason[k]
        r = r.decode("utf-8", "replace") if isinstance(r, bytes) else str(r)
        if r and not (len(tokens[k]) and r == str(int(tokens[k][-1]))):
            finish[k] = FINISH_STOP_STRING


def check_text_kept(output, overwrite):
    """A job without its tokenizer writes no text: it must not resume an unfinished output that has text, whose rows
    would lose theirs (the file is rebuilt without the column). A UserError then."""
    import h5py
    if overwrite or not os.path.isfile(output) or read_status(output)[0] is not False:
        return
    try:
        with h5py.File(output, "r") as f:
            has_text = h5flat.has(f, "completions")
    except (OSError, ValueError):
        return
    if has_text:
        raise UserError("holds completion text, but the tokenizer was not found: the rows kept would lose theirs",
                        output, "tokenizer", "pass the --vocab-dir (or GPT2_VOCAB_DIR) of the run that started it")
