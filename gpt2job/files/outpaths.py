"""The files of one output path OUT (files/output.py owns the job's use of them): OUT itself, OUT.journal, the lock
OUT.lock that keeps two runs from writing one output, and what --overwrite sets aside until the run replacing it
finishes, OUT.replaced and OUT.journal.replaced."""
import fcntl
import os
import time

from gpt2job import envs
from gpt2job.errors import UserError, rerun, warn
from gpt2job.files.h5read import read_status
from gpt2job.files.journal import JOURNAL_SUFFIX, io_error, journal_has_records

LOCK_SUFFIX = ".lock"
REPLACED_SUFFIX = ".replaced"
_HELD = {}   # OUT -> the OutputPaths of this process's run while it holds OUT's lock (put_back_unstarted)


def rows_kept(path, overwrite):
    """Did a run that ended early keep rows of its own at OUT (it leaves its journal, or what it set aside)? Not
    where an --overwrite run that kept nothing put back what it had set aside: then the same command is right."""
    return not overwrite or any(os.path.exists(path + x) for x in (REPLACED_SUFFIX, JOURNAL_SUFFIX))


def holds_rows(path):
    """Are rows of OUT kept on disk: in its journal, in what --overwrite set aside (OUT or its journal), or in an
    unfinished OUT whose journal is gone (a rerun resumes from the file's rows)? For the line a job stopped by a
    signal ends with."""
    return journal_has_records(path) or OutputPaths(path).replaced() is not None or (
        os.path.exists(path) and not os.path.exists(path + JOURNAL_SUFFIX))


def finished_at(path):
    """When OUT was written, where it is a finished output alone (marked finished, its journal gone, nothing set
    aside); else None. (A stop can land after the last row: written since the launch, the run finished it. An older
    finished OUT is another run's: one stopped before --overwrite set it aside, one that put it back, or one with other
    settings.)"""
    try:
        written = os.path.getmtime(path)
    except OSError:
        return None
    alone = not os.path.exists(path + JOURNAL_SUFFIX) and OutputPaths(path).replaced() is None
    return written if alone and read_status(path)[0] is True else None


def after_stop(path, overwrite, since):
    """What follows 'interrupted' or 'terminated (SIGTERM)' in the last line of a job launched at `since` and stopped
    by a signal: what OUT holds and what to run next."""
    written = finished_at(path)
    if written is not None and written >= since:
        return f" after the job had finished: {path} is complete"
    if written is not None and overwrite:   # an older finished OUT that this --overwrite run did not replace
        return f" before any row was completed: {path} is as it was before this run; run the same command again"
    if holds_rows(path):
        return f"; completed rows are kept: {rerun(overwrite, rows_kept(path, overwrite))}"
    return " before any row was completed: run the same command again"


def replaced_note(path):
    """The line of an --overwrite run stopped part-way (an error, Ctrl-C, SIGTERM) on the output it set aside."""
    return (f"the output this run replaces stays in {path + REPLACED_SUFFIX} (the same command without --overwrite "
            "resumes this run; remove it once it is not needed)")


def aside_by_this_run(path):
    """Whether this process's run (--overwrite) set OUT's files aside and they are still aside."""
    files = _HELD.get(os.path.abspath(path))
    return files is not None and files.aside and files.replaced() is not None


def put_back_unstarted(path):
    """SIGTERM ends the master without its output's close (job.say_on_sigterm). Where this process's run had set
    OUT's files aside (--overwrite) and has no row yet (its journal is there, empty: not yet finishing, which
    removes it first) and its own OUT is made (no OUT.tmp: the writer moves nothing onto OUT later), they go back,
    as the close puts them back after Ctrl-C or an error, so that the original command finds that output again.
    Each step leaves what a kill there left before this: the empty journal goes first, then one rename puts OUT
    back over this run's. Returns OUT where it did, else None."""
    files = _HELD.get(os.path.abspath(path))
    if files is None or not files.aside or not os.path.exists(files.journal) or journal_has_records(files.path) or \
            not os.path.exists(files.path) or os.path.exists(files.path + ".tmp"):   # (h5write.create_output's)
        return None
    try:
        os.remove(files.journal)
        files.put_back()
    except (OSError, UserError):   # (what is left is what a kill leaves: the line that follows says what OUT holds)
        return None
    return files.path


def being_written(path):
    """Does a process hold OUT's lock now (a run writing it)? A shared lock tried and let go; call it only where this
    process holds no lock on OUT (closing any descriptor of the file ends this process's locks on it)."""
    try:
        fd = os.open(os.path.abspath(path) + LOCK_SUFFIX, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def _same_file(fd, path):
    """Is the open file fd still the file at path (not removed or replaced since it was opened)?"""
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class OutputPaths:
    def __init__(self, path):
        self.path = os.path.abspath(path)
        self.journal = self.path + JOURNAL_SUFFIX
        self.lock_fd = None
        self.aside = False      # set_aside moved files in this run

    def lock(self, wait_s=None):
        """One job writes an output at a time. A run killed a moment ago may leave ranks that still
        write for a second or two: wait for them rather than write beside them."""
        if wait_s is None:
            wait_s = envs.get("GPT2JOB_LOCK_WAIT")
        path = self.path + LOCK_SUFFIX
        try:
            self.lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:   # the job's first write: nothing is computed yet, nothing is lost
            raise UserError(f"cannot create its lock file {os.path.basename(path)} "
                            f"({os.strerror(e.errno) if e.errno else e})", self.path, "output",
                            "write the output to a folder you can write to (with free space)") from e
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.lockf(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                if _same_file(self.lock_fd, path):
                    _HELD[self.path] = self
                    return
                # the holder removed the lock file as it released it: lock the file now at that path instead
                os.close(self.lock_fd)
                self.lock_fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError:
                if time.monotonic() > deadline:
                    os.close(self.lock_fd)
                    self.lock_fd = None
                    raise UserError(f"another gpt2job run is writing this output (lock {path} held for "
                                    f"{wait_s:.0f} s)", self.path, "output",
                                    "wait for that run to end, or write to another output path")
                time.sleep(0.2)

    def unlock(self, remove):
        fd, self.lock_fd = self.lock_fd, None
        if fd is None:
            return
        if _HELD.get(self.path) is self:
            del _HELD[self.path]
        if remove:
            try:
                os.remove(self.path + LOCK_SUFFIX)
            except OSError:
                pass
        os.close(fd)

    def remove(self):
        """OUT and its journal, where they exist."""
        for p in (self.path, self.journal):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise io_error(p, e, "remove")

    def set_aside(self):
        """--overwrite: OUT and its journal moved to their REPLACED_SUFFIX names. Where one of those exists already
        (set aside by an earlier run that did not finish, or some other file) nothing is moved: a UserError (which
        of the outputs to keep is the user's choice; none is removed here)."""
        there = self.replaced()
        if there:
            raise UserError(f"{there} exists (an output an earlier --overwrite run set aside "
                            "until it finished, or another file): nothing is moved", self.path, "output",
                            "rerun without --overwrite to resume that run, or move or remove the .replaced file")
        for p in (self.path, self.journal):
            try:
                os.replace(p, p + REPLACED_SUFFIX)
                self.aside = True
            except FileNotFoundError:
                pass
            except OSError as e:
                raise io_error(p, e, "move aside")

    def replaced(self):
        """The first file at a set-aside name (this run's, an earlier replacing run's, or another file), or None."""
        aside = (p + REPLACED_SUFFIX for p in (self.path, self.journal))
        return next((p for p in aside if os.path.exists(p)), None)

    def put_back(self):
        """The files this run set aside (only those: self.aside) put back: it completed nothing and its own files are
        gone."""
        if not self.aside:
            return
        self.aside = False
        for p in (self.path, self.journal):
            try:
                os.replace(p + REPLACED_SUFFIX, p)
            except FileNotFoundError:
                pass
            except OSError as e:
                raise io_error(p + REPLACED_SUFFIX, e, "restore")

    def tidy_finished(self):
        """Once OUT is finished: its journal and the files this run set aside removed. Those that cannot be (the folder
        made read-only during the job) are a warning, not the job's error: OUT is complete all the same."""
        left, why = [], None
        for p in [self.journal] + ([p + REPLACED_SUFFIX for p in (self.path, self.journal)] if self.aside else []):
            try:
                os.remove(p)
            except FileNotFoundError:
                pass
            except OSError as e:
                left, why = left + [p], why or e.strerror or e
        if left:   # (self.aside stays: the set-aside files left are this run's, not another's to warn of)
            warn(f"{self.path} is complete, but {' and '.join(left)} could not be "
                 f"removed ({why}): remove {'them' if len(left) > 1 else 'it'} once the folder is writable "
                 "again")
        else:
            self.aside = False
