"""Reading an existing output file before a job decides what to do with it: its status and resume key, whether it
holds completed rows, and those rows (for an unfinished output whose journal is gone), a block of rows at a time."""
import json

import numpy as np

from gpt2job.chunks import FINISH_INVALID, FINISH_NAMES, Completions

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
    codes = {v: k for k, v in FINISH_NAMES.items()}
    with h5py.File(path, "r") as f:
        for a in range(0, len(f["done"]), BLOCK_ROWS):
            done = np.flatnonzero(f["done"][a:a + BLOCK_ROWS] == 1)
            if len(done) == 0:
                continue
            toks = f["completion_tokens"][a:a + BLOCK_ROWS]
            reasons = f["finish_reason"][a:a + BLOCK_ROWS]
            finish = [codes.get(r.decode() if isinstance(r, bytes) else r, 0) for r in reasons[done]]
            yield Completions.from_lists(-1, done + a, [toks[i] for i in done], finish)
