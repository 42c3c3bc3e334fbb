"""Durable output: the journal (files/journal.py, fsynced per chunk) plus the HDF5 file the user reads.

Results are durable the moment their journal record is synced. The HDF5 file is written as results
arrive (flushed every few seconds); if a kill leaves it damaged, the next run rebuilds it from the
journal. When the job finishes the HDF5 file gets its final attributes and `finished = 1`, and the
journal is deleted. A finished output is never overwritten without --overwrite; an unfinished one is
resumed only by the same model, input and settings.

HDF5 layout (row i answers prompt i):
  completion_tokens  vlen int32 [N]   generated token ids (the truth; includes the stop token)
  completions        vlen str   [N]   decoded text without the stop token (when a tokenizer is known)
  text_exact         uint8      [N]   1 when `completions` is exactly the tokens' bytes as UTF-8;
                                      0 when invalid UTF-8 or NUL had to be replaced by U+FFFD
  done               uint8      [N]   1 when the row is complete
  finish_reason      vlen str   [N]   "length", "stop", "invalid" ("" while not done)
  prompt_length      int32      [N]
  attributes: gpt2job_version, model, model_fingerprint, input, input_fingerprint, settings (JSON),
              finished, and when finished: summary (JSON: timings, throughput, per-worker counts).
"""
import fcntl
import json
import os
import sys
import time

import numpy as np

from gpt2job import envs
from gpt2job.chunks import FINISH_INVALID, FINISH_NAMES, FINISH_STOP, Completions
from gpt2job.errors import AlreadyComplete, UserError
from gpt2job.files.journal import Journal, io_error, read_journal

JOURNAL_SUFFIX = ".journal"
LOCK_SUFFIX = ".lock"


def _same_file(fd, path):
    """Is the open file fd still the file at path (not removed or replaced since it was opened)?"""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


# ---------------------------------------------------------------- HDF5 output

def row_text(enc, tokens, finish):
    """Decoded text of one row and whether it is exact (no replacement needed)."""
    toks = tokens[:-1] if finish == FINISH_STOP and len(tokens) else tokens
    try:
        raw = enc.decode_bytes([int(t) for t in toks])
    except (KeyError, ValueError):
        return "", False
    try:
        text = raw.decode("utf-8")
        exact = True
    except UnicodeDecodeError:
        text, exact = raw.decode("utf-8", errors="replace"), False
    if "\x00" in text:  # HDF5 strings cannot hold NUL
        text, exact = text.replace("\x00", "\ufffd"), False
    return text, exact


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


def _contiguous_runs(sorted_rows):
    """Split sorted row indices into (start, stop, slice in the input) runs."""
    if len(sorted_rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(sorted_rows)]])
    return [(int(sorted_rows[a]), int(sorted_rows[b - 1]) + 1, a, b) for a, b in zip(starts, stops)]


class OutputStore:
    """Owns OUT.h5 and OUT.h5.journal for one job (on the master)."""

    def __init__(self, path, n_rows, key, prompt_lengths, attrs=None, tokenizer=None, overwrite=False,
                 flush_interval=2.0):
        self.path = os.path.abspath(path)
        self.attrs = attrs or {}
        self.journal_path = self.path + JOURNAL_SUFFIX
        self.n = n_rows
        self.key = key
        self.prompt_lengths = prompt_lengths
        self.enc = tokenizer
        self.flush_interval = flush_interval
        self.done = np.zeros(n_rows, dtype=bool)
        self.pending = []
        self.last_flush = time.monotonic()
        self.flushed_any = False
        self.resumed_rows = 0
        self.completed = 0     # rows done with a result (rows marked 'invalid' are no completed work)
        self._open(overwrite)

    # ---- opening: fresh, resume, or refuse
    def _lock(self, wait_s=None):
        """One job writes an output at a time. A run killed a moment ago may leave ranks that still
        write for a second or two: wait for them rather than write beside them."""
        if wait_s is None:
            wait_s = envs.get("GPT2JOB_LOCK_WAIT")
        path = self.path + LOCK_SUFFIX
        try:
            self.lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise io_error(path, e)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.lockf(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _same_file(self.lock_fd, path):
                    return
                # the holder removed the lock file as it released it: lock the file now at that path instead
                os.close(self.lock_fd)
                self.lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                if time.monotonic() > deadline:
                    os.close(self.lock_fd)
                    raise UserError(f"another gpt2job run is writing this output (lock {path} held for "
                                    f"{wait_s:.0f} s)", self.path, "output",
                                    "wait for that run to end, or write to another output path")
                time.sleep(0.2)

    def _unlock(self, remove):
        fd, self.lock_fd = getattr(self, "lock_fd", None), None
        if fd is None:
            return
        if remove:
            try:
                os.remove(self.path + LOCK_SUFFIX)
            except OSError:
                pass
        os.close(fd)

    def _open(self, overwrite):
        out_dir = os.path.dirname(self.path)
        if not os.path.isdir(out_dir):
            raise UserError("folder does not exist", self.path, "output", f"create {out_dir} first")
        self._lock()
        try:
            self._open_locked(overwrite)
        except (UserError, AlreadyComplete):   # refused before writing anything: no lock file left behind
            self._unlock(remove=True)
            raise
        except BaseException:
            self._unlock(remove=False)
            raise

    def _open_locked(self, overwrite):
        exists, jexists = os.path.exists(self.path), os.path.exists(self.journal_path)
        if overwrite:
            if exists and not jexists and read_status(self.path)[0] is None:
                raise UserError("exists and is not a gpt2job output: --overwrite replaces only gpt2job outputs",
                                self.path, "output", "choose another output path, or remove the file yourself")
            self._remove_files()
            exists = jexists = False
        records = []
        if jexists:
            header, records, end = read_journal(self.journal_path)
            if header is None:
                records, jexists = [], False
            elif not self._start_afresh_if_empty(header, records):
                self._check_key(header, self.journal_path)
            else:
                records, exists, jexists = [], False, False
        if exists and not jexists:
            finished, key = read_status(self.path)
            if finished is None:
                raise UserError("exists and is not a gpt2job output (or is damaged with no journal)", self.path,
                                "output", "choose another output path, or pass --overwrite to replace it")
            if not self._start_afresh_if_empty(key, None):
                self._check_key(key, self.path)
                if finished:
                    raise AlreadyComplete(self.path)
                records = self._records_from_h5()
        for r in records:
            self.done[r.rows] = True
            self.completed += _completed_rows(r)
        self.resumed_rows = int(self.done.sum())
        # Rebuild the HDF5 file from what is known to be complete, then journal from there on.
        self._create_h5(self.path + ".tmp", records)
        os.replace(self.path + ".tmp", self.path)
        if jexists:
            self.journal = Journal(self.journal_path, truncate_at=end)
        else:
            self.journal = Journal(self.journal_path, header=self.key)
            for r in records:
                self.journal.append(r)
        self._reopen_h5()

    def _start_afresh_if_empty(self, key, records):
        """An output made with other settings that holds no completed row (a failed start, or every row marked
        'invalid') has nothing to keep: it never blocks a run with other settings. True when it was removed.
        records: the journal's, or None to look in the HDF5 file."""
        if key is None or not self._key_diff(key):
            return False
        if any(_completed_rows(r) for r in records) if records is not None else self._h5_has_completed_rows():
            return False
        self._remove_files()
        sys.stderr.write(f"gpt2job: {self.path} held no completed rows (made with other settings): starting afresh\n")
        return True

    def _remove_files(self):
        for p in (self.path, self.journal_path):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise io_error(p, e, "remove")

    def _key_diff(self, key):
        return [k for k in sorted(set(key) | set(self.key)) if key.get(k) != self.key.get(k)]

    def _h5_has_completed_rows(self):
        import h5py
        try:
            with h5py.File(self.path, "r") as f:
                done = np.flatnonzero(f["done"][()] == 1)
                if len(done) == 0:
                    return False
                reasons = f["finish_reason"][()][done]
        except (OSError, KeyError, RuntimeError, ValueError):
            return True    # unreadable: the resume check says what is wrong
        return any((r.decode() if isinstance(r, bytes) else r) != FINISH_NAMES[FINISH_INVALID] for r in reasons)

    def _check_key(self, key, where):
        if key is None:
            raise UserError("has no record of its settings", where, "resume_key",
                            "choose another output path, or pass --overwrite to start over")
        diff = self._key_diff(key)
        if diff:
            details = ", ".join(f"{k}: was {key.get(k)!r}, now {self.key.get(k)!r}" for k in diff[:4])
            raise UserError(f"was started with a different model, input or settings ({details})", where,
                            "resume", "rerun with the original settings, choose another output path, "
                                      "or pass --overwrite to start over")

    def _records_from_h5(self):
        import h5py
        with h5py.File(self.path, "r") as f:
            done = np.flatnonzero(f["done"][()] == 1)
            if len(done) == 0:
                return []
            toks = f["completion_tokens"][()]
            reasons = f["finish_reason"][()]
        codes = {v: k for k, v in FINISH_NAMES.items()}
        finish = [codes.get(r.decode() if isinstance(r, bytes) else r, 0) for r in reasons[done]]
        return [Completions.from_lists(-1, done, [toks[i] for i in done], finish)]

    def _create_h5(self, path, records):
        import h5py
        try:
            with h5py.File(path, "w") as f:
                vint = h5py.vlen_dtype(np.int32)
                vstr = h5py.string_dtype("utf-8")
                f.create_dataset("completion_tokens", (self.n,), dtype=vint)
                if self.enc is not None:
                    f.create_dataset("completions", (self.n,), dtype=vstr)
                    f.create_dataset("text_exact", (self.n,), dtype=np.uint8)
                f.create_dataset("done", (self.n,), dtype=np.uint8)
                f.create_dataset("finish_reason", (self.n,), dtype=vstr)
                f.create_dataset("prompt_length", data=self.prompt_lengths.astype(np.int32))
                for k, v in {**self.key, **self.attrs}.items():
                    f.attrs[k] = v if isinstance(v, (int, float, str)) else json.dumps(v, sort_keys=True)
                f.attrs["resume_key"] = json.dumps(self.key, sort_keys=True)
                f.attrs["finished"] = 0
                for r in records:
                    self._write_rows(f, r)
        except (OSError, RuntimeError) as e:
            raise io_error(path, e)

    def _reopen_h5(self):
        import h5py
        try:
            self.h5 = h5py.File(self.path, "r+")
        except (OSError, RuntimeError) as e:
            raise io_error(self.path, e)

    def _write_rows(self, f, comp: Completions):
        order = np.argsort(comp.rows, kind="stable")
        rows = comp.rows[order]
        toks = [comp.row_tokens(i) for i in order]
        fin = comp.finish[order]
        texts = [row_text(self.enc, t, c) for t, c in zip(toks, fin)] if self.enc is not None else None
        for start, stop, a, b in _contiguous_runs(rows):
            tok_obj = np.empty(b - a, dtype=object)
            for k, t in enumerate(toks[a:b]):  # one by one: equal-length rows must not become a 2-D array
                tok_obj[k] = np.asarray(t, np.int32)
            # write_direct: slice assignment mistakes equal-length rows for a 2-D array
            f["completion_tokens"].write_direct(tok_obj, dest_sel=np.s_[start:stop])
            f["finish_reason"][start:stop] = [FINISH_NAMES[int(c)] for c in fin[a:b]]
            if texts is not None:
                f["completions"][start:stop] = [t for t, _ in texts[a:b]]
                f["text_exact"][start:stop] = np.array([e for _, e in texts[a:b]], np.uint8)
            f["done"][start:stop] = 1

    # ---- while running
    def add(self, comp: Completions):
        """Make a chunk's results durable (journal) and queue them for the HDF5 file. Returns what was
        new (None when every row was done already: a late duplicate from a retired worker)."""
        new = ~self.done[comp.rows]
        if not new.any():
            return None
        if not new.all():
            keep = np.flatnonzero(new)
            comp = Completions.from_lists(comp.chunk_id, comp.rows[keep], [comp.row_tokens(i) for i in keep],
                                          comp.finish[keep])
        self.journal.append(comp)
        self.done[comp.rows] = True
        self.completed += _completed_rows(comp)
        if not self.pending and not self.flushed_any:
            self.last_flush = time.monotonic()   # the first rows wait a full interval, like the rest
        self.pending.append(comp)
        return comp

    def flush_due(self):
        return bool(self.pending) and time.monotonic() - self.last_flush >= self.flush_interval

    def flush(self):
        try:
            for comp in self.pending:
                self._write_rows(self.h5, comp)
            self.pending = []
            self.h5.flush()
            self.flushed_any = True
        except (OSError, RuntimeError) as e:
            raise io_error(self.path, e)
        self.last_flush = time.monotonic()

    def finish(self, summary):
        """Write the last rows and the summary, mark the file finished, drop the journal."""
        self.flush()
        try:
            self.h5.attrs["summary"] = json.dumps(summary, sort_keys=True)
            self.h5.attrs["finished"] = 1
            self.h5.close()
            fd = os.open(self.path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except (OSError, RuntimeError) as e:
            raise io_error(self.path, e)
        self.journal.close()
        os.remove(self.journal_path)
        self._unlock(remove=True)

    def close(self, discard_if_empty=False):
        """Leave an unfinished output resumable (after an error). discard_if_empty: when no row has a result (a
        start that failed: only rows marked 'invalid' or none), remove the output and its journal instead, so
        that nothing is left behind to block the corrected command."""
        try:
            self.flush()
        except Exception:  # the journal already holds every completed row
            pass
        for closer in (getattr(self, "h5", None), getattr(self, "journal", None)):
            try:
                if closer is not None:
                    closer.close()
            except Exception:
                pass
        discard = discard_if_empty and self.completed == 0
        if discard:
            try:
                self._remove_files()
            except UserError:
                discard = False
        self._unlock(remove=discard)


def _completed_rows(comp: Completions):
    """Rows of comp with a result (not marked 'invalid')."""
    return int(np.count_nonzero(np.asarray(comp.finish) != FINISH_INVALID))
