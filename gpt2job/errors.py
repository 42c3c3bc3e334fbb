"""User-facing errors: one clear line naming the file, the field and the fix (exit code 2); say and warn, the one
way any part writes a note, warning or error line on stderr (a command's result, such as `prompts`' "wrote", goes to
stdout)."""
import re
import sys


def say(msg):
    """One line for the user on stderr, "gpt2job: " first, flushed at once (ranks' lines interleave)."""
    sys.stderr.write(f"gpt2job: {msg}\n")
    sys.stderr.flush()


def warn(msg):
    say(f"warning: {msg}")


class UserError(Exception):
    """A mistake the user can fix. Printed as one line, no traceback; the process exits with 2."""

    def __init__(self, message, path=None, field=None, fix=None):
        self.message = message
        self.path = path
        self.field = field
        self.fix = fix
        parts = []
        if path is not None:
            parts.append(str(path))
        if field is not None:
            parts.append(str(field))
        head = ": ".join(parts)
        text = f"{head}: {message}" if head else message
        if fix:
            text = f"{text} (fix: {fix})"
        super().__init__(text)


class WorkerFailure(Exception):
    """Raised on the master when no worker is left to finish the job."""


class Stopped(Exception):
    """The job stopped early, as asked (SIGUSR1), once the chunks handed out were done: completed rows are kept."""


class Reported(Exception):
    """A failed job's master already printed its error (it then waited for ranks still starting): the process exits
    with .code and prints nothing more."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


def exit_code(e):
    """The process's exit status for a job that ended in e: 2 a user mistake, 3 no worker left, 5 stopped as asked
    (SIGUSR1), 1 anything else."""
    return 2 if isinstance(e, UserError) else 3 if isinstance(e, WorkerFailure) else 5 if isinstance(e, Stopped) else 1


class AlreadyComplete(Exception):
    """The output is finished with these very settings: nothing is left to do (exit 0)."""


def rerun(overwrite, resume=True):
    """What to run after a job ended early: the same command; less --overwrite where it had it and its rows are kept
    (run again, that flag would set them aside and start over). resume False: this run kept nothing (an --overwrite
    run then put back what it had set aside), so the same command is right."""
    if not resume:
        return "run the same command again"
    return ("run the same command without --overwrite" if overwrite else "run the same command again") + " to resume"


def plural(n, word, words=None):
    """'1 prompt', '2 prompts' (words: the plural when it is not word + 's')."""
    return f"{n:,} {word if n == 1 else (words or word + 's')}"


def errno_of(e):
    """An I/O error's errno: its own, else the 'errno = N' HDF5 writes into its message (h5py's errors often carry
    none); None when neither says."""
    code = getattr(e, "errno", None)
    if not code:
        m = re.search(r"errno = (\d+)", str(e))
        code = int(m.group(1)) if m else None
    return code or None


def first_line(e, limit=120):
    """An exception's message for a one-line error: its first line (at most limit characters), or its type's name
    when that line is empty."""
    return (str(e).splitlines() or [""])[0][:limit] or type(e).__name__
