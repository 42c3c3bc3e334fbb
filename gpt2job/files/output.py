"""Durable output: the journal (files/journal.py, one write and fsync per group of results received together, in
a thread of its own) plus the HDF5 file the user reads.

Results are durable the moment their journal record is synced; only then do they count for the master (collect()
returns them; `done` marks their rows as they are submitted, so that a row repeated within a group is taken once,
and is cleared again if the journal write fails). The HDF5 file is written beside the master's loop by a writer
(files/writer.py: a thread for small jobs, a process of its own for large ones, files/writer_process.py) that
creates the file, then writes the rows as they come, flushing every few seconds. A resumed job's writer builds the
file anew from the journal, which the master reads once, a block at a time. Rows the writer has no room for (a
rebuild's, or a slow disk's) stay in the journal until it has (pump): the master never waits on the writer, only the
end of the job does. When the job finishes the HDF5 file gets its final attributes and `finished = 1`, and the
journal is deleted. A finished output is never overwritten without --overwrite; an unfinished one is resumed only by
the same model, input and settings. The files --overwrite replaces are set aside (OUT.replaced,
OUT.journal.replaced) until the run that replaces them finishes: a run that completes nothing puts them back, one
that stops part-way leaves them there (its own rows resume as usual), and only the run that set them aside ever
moves or removes them (files/outpaths.py).

The datasets and attributes users read are README.md's "HDF5 contract" (files/h5write.py makes them; with
--layout flat, files/h5flat.py).
"""
import os

import numpy as np

from gpt2job import envs
from gpt2job.chunks import FINISH_INVALID, Completions
from gpt2job.errors import AlreadyComplete, UserError, first_line, say
from gpt2job.files import h5flat
from gpt2job.files.h5files import check_output_path
from gpt2job.files.h5read import h5_has_completed_rows, read_status, records_from_h5
from gpt2job.files.h5write import make_header
from gpt2job.files.journal import JOURNAL_SUFFIX, Journal, JournalReader, io_error, record_blocks
from gpt2job.files.outpaths import REPLACED_SUFFIX, OutputPaths, replaced_note
from gpt2job.files.resume_key import differences, differing
from gpt2job.files.text import TokenText
from gpt2job.files.writer import WriterEnded, WriterProcess, WriterThread

PROCESS_ROWS = 100_000     # GPT2JOB_WRITER=auto: jobs of this many rows or more write with a writer process
FLUSH_SECONDS = 2.0        # the writer flushes OUT at least this often while rows come (README: "every few seconds")
BIG_JOB_ROWS = 1_000_000   # from here the default layout's writer (under 1M rows/s) lags a fast job: say so once
PUMP_BYTES = 8 << 20       # the rows the writer lags behind by, read back from the journal at most this much a turn


class OutputStore:
    """Owns OUT.h5 and OUT.h5.journal for one job (on the master)."""

    def __init__(self, path, n_rows, key, prompt_lengths, attrs=None, tokenizer=None, overwrite=False,
                 vocab_dir=None, stops=None):
        self.files = OutputPaths(path)    # OUT, its journal, lock and set-aside files
        self.path = self.files.path
        self.attrs = attrs or {}
        self.journal_path = self.files.journal
        self.n = n_rows
        self.key = key
        self.prompt_lengths = prompt_lengths
        self.enc = tokenizer
        self.text = TokenText(tokenizer) if tokenizer is not None else None
        self.vocab_dir = vocab_dir     # where a writer process loads the same tokenizer
        self.stops = stops             # the job's stops for the writer (row_stops.stops_header), or None
        self.done = np.zeros(n_rows, dtype=bool)
        self.writer = None
        self.inflight = None   # (added, fresh, bytes) of the group whose journal write is in flight
        self.lag = None        # (start, stop): journal bytes whose rows the writer had no room for yet (pump)
        self.resumed_rows = 0
        self.completed = 0     # rows done with a result (rows marked 'invalid' are no completed work)
        self._open(overwrite)

    # ---- opening: fresh, resume, or refuse
    def _open(self, overwrite):
        check_output_path(self.path, example="out.h5")
        self.files.lock()
        try:
            self._open_locked(overwrite)
        except BaseException as e:   # a refusal (UserError, AlreadyComplete) wrote nothing: no lock file left behind
            self._stop_writer()
            try:
                self._put_back()
            except UserError:
                pass
            self.files.unlock(remove=isinstance(e, (UserError, AlreadyComplete)))
            raise

    def _put_back(self):
        """What this run's --overwrite set aside, back as it was (this run's own files removed first)."""
        if self.files.aside:
            self.files.remove()
            self.files.put_back()
            say(f"{self.path} is put back as it was before this run")

    def _stop_writer(self):
        if self.writer is not None:
            try:
                self.writer.close()
            except Exception:
                pass

    def _open_locked(self, overwrite):
        exists, jexists = os.path.exists(self.path), os.path.exists(self.journal_path)
        if overwrite:
            refuse_foreign(self.path, overwrite, jexists)
            self.files.set_aside()
            exists = jexists = False
        reader = None
        if jexists:
            try:
                reader = JournalReader(self.journal_path)
            except OSError as e:
                raise io_error(self.journal_path, e, "read")
            if reader.header is None:
                reader, jexists = None, False
            else:
                if exists:
                    self._check_pair(reader.header)
                if self._start_afresh_if_empty(reader.header, self._journal_has_completed_rows):
                    reader, exists, jexists = None, False, False
                else:
                    self._check_key(reader.header, self.journal_path)
        from_h5 = False
        if exists and not jexists:
            refuse_foreign(self.path, overwrite, journal=False)   # (a journal without its header counts as none)
            finished, key = read_status(self.path)
            if not self._start_afresh_if_empty(key, lambda: h5_has_completed_rows(self.path)):
                self._check_key(key, self.path)
                if finished:
                    raise AlreadyComplete(self.path)
                from_h5 = True
        if from_h5:
            # an unfinished file without journal: its rows go into a new journal first, which replaces nothing until
            # it holds them all; from then on it is the truth, as after any run
            journal = Journal(self.journal_path + ".tmp", header=self.key)
            try:
                for batch in records_from_h5(self.path):
                    journal.append_many([batch])
            except (OSError, RuntimeError, KeyError, ValueError) as e:    # attributes readable, rows not: a torn file
                journal.close()
                os.remove(self.journal_path + ".tmp")
                raise UserError(f"its rows cannot be read ({first_line(e)}) and it has no journal", self.path, "output",
                                "pass --overwrite to compute it anew, or restore its .journal file") from None
            journal.close()
            os.replace(self.journal_path + ".tmp", self.journal_path)
            reader = JournalReader(self.journal_path)
        self._start_writer()
        if reader is None:
            self.journal = Journal(self.journal_path, header=self.key)
            return
        # the journal, read once, a block at a time: its rows are done, and its bytes go to the writer as they are,
        # which rebuilds the file from them; what the writer has no room for yet, it gets as the job goes (pump)
        for comps, blob in reader.blocks():
            for comp in comps:
                self.done[comp.all_rows] = True
                self.completed += _count_completed(comp)
            self._put_or_lag(comps, blob, reader.end)
        self.resumed_rows = int(np.count_nonzero(self.done))
        self.journal = Journal(self.journal_path, truncate_at=reader.end)

    def _start_writer(self):
        """The writer that creates the output file and writes its rows: a thread of this process for small jobs, a
        process of its own for large ones (files/writer.py; GPT2JOB_WRITER chooses)."""
        header = make_header(self.path, self.n, self.key, self.attrs, self.enc is not None, self.vocab_dir,
                             FLUSH_SECONDS, self.stops)
        if self.n >= BIG_JOB_ROWS and self.enc is not None and not h5flat.wanted(header):
            say(f"note: for {self.n:,} rows, --layout flat writes the output about twice as "
                "fast on nodes of many cores (README, \"The flat layout\")")
        kind = envs.get("GPT2JOB_WRITER")
        if kind == "process" or (kind == "auto" and self.n >= PROCESS_ROWS):
            self.writer = WriterProcess(header, self.prompt_lengths)
        else:
            self.writer = WriterThread(header, self.prompt_lengths, text=self.text)

    def _start_afresh_if_empty(self, key, has_completed_rows):
        """An output made with other settings that holds no completed row (a failed start, or every row marked
        'invalid') has nothing to keep: it never blocks a run with other settings. True when it was removed.
        has_completed_rows(): looks in the journal or in the HDF5 file."""
        if key is None or not self._key_diff(key):
            return False
        if has_completed_rows():
            return False
        self.files.remove()
        say(f"{self.path} held no completed rows (made with other settings): starting afresh")
        return True

    def _key_diff(self, key):
        return differing(key, self.key)

    def _journal_has_completed_rows(self):   # (journal_has_records, cheap enough for a signal handler, also counts
                                             # a record that holds only rows marked 'invalid')
        return any(_count_completed(r) for r in JournalReader(self.journal_path).records())

    def _check_pair(self, journal_key):
        """OUT and its journal are one run's. A journal beside a gpt2job output of other settings (a finished output
        put back after an --overwrite run that stopped, a journal left from elsewhere) must neither rebuild OUT from
        itself nor remove it: refused, the choice is the user's. Nothing is said where they agree, or where OUT is
        unreadable (a crash mid-write: the journal is the truth)."""
        finished, key = read_status(self.path)
        if key is None or key == journal_key:
            return
        raise UserError(f"is {'a finished' if finished else 'an unfinished'} output of other settings than the journal "
                        f"beside it ({differences(key, journal_key, pair=True)}), so neither is resumed or replaced",
                        self.path, "output", f"move {self.journal_path} away to keep {self.path}, or move "
                                             f"{self.path} away to resume the journal's run, or pass --overwrite to "
                                             "start over")

    def _check_key(self, key, where):
        if key is None:
            raise UserError("has no record of its settings", where, "resume_key",
                            "choose another output path, or pass --overwrite to start over")
        if self._key_diff(key):
            details, aside = differences(key, self.key), self.files.replaced()
            raise UserError(f"was started with a different model, input or settings ({details})", where, "resume",
                            "rerun with the original settings, choose another output path, or pass --overwrite to "
                            "start over" if not aside else "rerun with the original settings, or choose another "
                            f"output path ({aside} is what an --overwrite run set aside: to go back to it, remove "
                            f"{self.path} and its journal, then take .replaced off the set-aside files' names)")

    # ---- while running
    def add_many(self, comps):
        """Make the results of several chunks durable with one journal write and one fsync (a group commit), then
        queue them for the HDF5 file. Returns, for each, what was new: (rows, tokens, tokens computed), or None."""
        self.submit(comps)
        return self.collect(block=True)

    def submit(self, comps):
        """Start making the results of several chunks durable (one journal write and fsync, in the background); none
        counts before collect() returns it. One group at a time. Copies ride along (Completions.copy_rows)."""
        assert self.inflight is None, "collect() the group submitted before"
        fresh, stats = [], []
        for comp in comps:
            rows = comp.all_rows
            new = ~self.done[rows]
            if not new.any():
                stats.append(None)
                continue
            computed = int(comp.offsets[-1])     # the tokens the worker generated (its prompts' copies' not)
            if not new.all():    # some rows were done already (a late duplicate, a retried chunk): keep the others
                keep = np.flatnonzero(new)
                full = comp.expanded()
                computed = int(np.diff(full.offsets)[keep[keep < len(comp.rows)]].sum())
                comp = full.take(keep)     # tokens and log-probabilities
                rows = comp.rows
            self.done[rows] = True      # rows repeated within comps are taken once
            fresh.append(comp)
            stats.append((len(rows), comp.n_generated, computed))
        blob = Journal.encode(fresh) if fresh else b""
        self.inflight = (stats, fresh, blob)
        if fresh:
            self.journal.submit(blob)

    def committing(self):
        return self.inflight is not None

    def collect(self, block=False):
        """What the group submitted last added, once it is durable (from then on its rows count): for each chunk,
        in the order submit() got them, (rows, tokens, tokens computed by the worker: copies excluded), or None
        where nothing was new. None while it is not durable yet (block: wait for it); [] when no group was
        submitted."""
        if self.inflight is None:
            return []
        stats, fresh, blob = self.inflight
        if fresh:
            if not block and not self.journal.ready():
                return None
            try:
                self.journal.wait()
            except BaseException:
                for c in fresh:
                    self.done[c.all_rows] = False    # not durable: not done
                self.inflight = None
                raise
        self.inflight = None
        if fresh:
            self.completed += sum(_count_completed(c) for c in fresh)
            self._put_or_lag(fresh, blob, self.journal.end)
        return stats

    def _put_or_lag(self, comps, blob, end):
        """Rows made durable (their journal bytes end at end) go to the writer, in journal order; when it has no room
        (a resume's rebuild, a slow disk) they wait in the journal, not in memory, and the master does not wait."""
        if self.lag is None and self.writer.has_room():
            self._put(comps, blob)
        else:
            self.lag = (self.lag[0] if self.lag else end - len(blob), end)

    def pump(self, block=False):
        """Give the writer the next PUMP_BYTES of the rows it lags behind by, if it has room (the master's loop calls
        this on every turn); block: all of them, waiting for room."""
        while self.lag is not None and (block or self.writer.has_room()):
            start, stop = self.lag
            try:
                with open(self.journal_path, "rb") as f:
                    f.seek(start)
                    comps, blob = next(record_blocks(f, stop - start, PUMP_BYTES), (None, b""))
            except OSError as e:
                raise io_error(self.journal_path, e, "read")
            if not blob:
                raise UserError("cannot be read back: it ends before the rows it held", self.journal_path, "output",
                                "run the same command again: it resumes from the rows the journal still holds")
            self._put(comps, blob)
            self.lag = (start + len(blob), stop) if start + len(blob) < stop else None
            if not block:
                return

    def _put(self, comps, blob):
        try:
            self.writer.put(comps, blob)
        except (OSError, RuntimeError) as e:     # the writer failed meanwhile (a full disk)
            raise self._writer_failed(e)

    def _writer_failed(self, e):
        if isinstance(e, WriterEnded):   # (not the path's fault)
            return UserError(f"{e}; completed rows are kept", self.path, "output", "run the same command again to "
                             "resume; if it ends again, look for what ends it (the node's memory: dmesg)")
        return io_error(self.path, e)

    def wait_written(self):
        """Until the HDF5 file holds every row added so far, flushed (benchmarks/master_scale.py)."""
        self.pump(block=True)
        try:
            self.writer.wait()
        except (OSError, RuntimeError) as e:
            raise self._writer_failed(e)

    def finish(self, summary):
        """Write the last rows and the summary, mark the file finished (synced), drop the journal."""
        self.collect(block=True)
        self.pump(block=True)
        try:
            self.writer.finish(summary)
        except (OSError, RuntimeError) as e:
            raise self._writer_failed(e)
        self.journal.close()
        self.files.tidy_finished()
        self._say_replaced()
        self.files.unlock(remove=True)

    def close(self, discard_if_empty=False):
        """Leave an unfinished output resumable (after an error). discard_if_empty: when no row has a result (a
        start that failed: only rows marked 'invalid' or none), remove the output and its journal instead, so
        that nothing is left behind to block the corrected command."""
        try:
            self.collect(block=True)            # a group in flight becomes durable (and goes to the HDF5 file)
        except Exception:
            pass
        for closer in (self.writer, getattr(self, "journal", None)):   # the writer writes what it can: the journal
            try:                                                       # holds it anyway
                if closer is not None:
                    closer.close()
            except Exception:
                pass
        discard = discard_if_empty and self.completed == 0
        if discard:
            try:
                self.files.remove()
                self._put_back()
            except UserError:
                discard = False
        elif self.files.aside:
            say(replaced_note(self.path))
        self._say_replaced()
        self.files.unlock(remove=discard)

    def _say_replaced(self):
        """A set-aside file this run did not make (an earlier --overwrite run's, or another file) is never touched:
        say that it is there."""
        if self.files.replaced() and not self.files.aside:
            say(f"{self.path + REPLACED_SUFFIX} (set aside by an earlier --overwrite run, or "
                "another file) is left as it is: remove it once it is not needed")


def refuse_foreign(path, overwrite, journal=None):
    """A file at OUT with no journal (journal: whether it has one; None: look) that is not a gpt2job output (or is
    damaged) is never written, not even with --overwrite: a UserError. (Also checked before a text's conversion.)"""
    if not (os.path.exists(path + JOURNAL_SUFFIX) if journal is None else journal) and os.path.isfile(path) and \
            read_status(path)[0] is None:
        only = "--overwrite replaces only gpt2job outputs"
        raise UserError("exists and is not a gpt2job output" + (f": {only}" if overwrite else " (or is damaged with "
                        "no journal)"), path, "output", "choose another output path, or remove the file yourself"
                        + ("" if overwrite else f" ({only})"))


def _count_completed(comp: Completions):
    """Rows of comp with a result (not marked 'invalid'), copies included."""
    return int(np.count_nonzero(np.asarray(comp.all_finish) != FINISH_INVALID))
