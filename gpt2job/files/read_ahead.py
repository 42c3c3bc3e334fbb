"""The input's read-ahead: the prompts read once in a child process with a deadline, before the master reads them.
On some damaged files the HDF5 library loops forever; a job must end with a message rather than hang, and a loop
in the master's own process could not be stopped. What the child read is not wasted: a text's digest (a rerun checks
its kept token ids by it, not reading the text again) and a token input's ids (handed back in an unlinked temporary
file: the master does not read them a second time; score's token pairs too). Both halves are here: read_ahead (the
master's) and read_in_child (the child's)."""
import os
import selectors
import subprocess
import sys
import tempfile
import time

import numpy as np

from gpt2job.errors import UserError
from gpt2job.files import prompts, token_cache
from gpt2job.files.h5files import read_rows

DEADLINE_S, DEADLINE_S_PER_GB = 60, 30   # the child's time to read the file: 60 s + 30 s per GB of it
WRITE_BYTES_PER_S = 20e6                 # the least speed of its hand-back's write (then the master reads itself)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the folder holding gpt2job
# The child's command (python -c): the parent's gpt2job first on its path (not one in the folder it starts in), then
# read_in_child with the arguments after the root
CHILD = ("import sys; sys.path[:] = [sys.argv[1]] + [p for p in sys.path if p not in ('', '.', sys.argv[1])]; "
         "from gpt2job.files.read_ahead import read_in_child; read_in_child(sys.argv[2:])")


def read_ahead(path, vocab_size, names=()):
    """(digest, arrays), each None where the child did not give it: a text's digest (prompts.texts_digest); the
    token datasets' arrays as the child read them (prompts.read_token_dataset): {dataset name: (offsets or None,
    tokens: [N, T] for a grid)}. With names (datasets other than the prompts: score's pairs) the child reads those
    only. Raises UserError where the child's read passes its deadline. Any other failure of the child is left to the
    master's own read, which names it."""
    try:
        size = os.path.getsize(path)
    except OSError:
        return None, None
    deadline = DEADLINE_S + DEADLINE_S_PER_GB * size / 1e9
    try:   # unlinked: nothing is left, even on SIGKILL
        hand = tempfile.TemporaryFile(prefix="gpt2job-read-ahead-")
    except OSError:
        hand = None   # (no temporary folder: the child reads, hands nothing back)
    fd = hand.fileno() if hand is not None else -1
    args = [sys.executable, "-c", CHILD, ROOT, path, "" if vocab_size is None else str(vocab_size), str(fd),
            str(prompts.BLOCK_ROWS), *names]   # (BLOCK_ROWS read now: tests change it)
    try:
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             pass_fds=(fd,) if fd >= 0 else (), text=True)
    except OSError:
        if hand is not None:
            hand.close()
        return None, None
    try:
        first = _line(p, deadline)
        if first is None:
            raise UserError(f"reading it did not finish within {deadline:.0f} s (the HDF5 library loops on this "
                            "file)", path, "input", "the file is damaged; write it again")
        if first.startswith("sha256:"):
            return (first if _exit_code(p, DEADLINE_S) == 0 else None), None
        n = int(first.split()[1]) if first.startswith("read ") else 0   # bytes handed back
        if n == 0:
            return None, None
        last = _line(p, DEADLINE_S + n / WRITE_BYTES_PER_S)   # the file is read: its hand-back's write
        if last is None or not last.startswith("arrays ") or _exit_code(p, DEADLINE_S) != 0:
            return None, None
        hand.seek(0)
        arrays = {}
        for name in last.split()[1:]:   # each: its array count (1: a grid; 2: offsets, tokens), then the arrays
            a = [np.load(hand) for _ in range(int(np.load(hand)[0]))]
            arrays[name] = (None, a[0]) if len(a) == 1 else (a[0], a[1])
        return None, arrays
    except (OSError, ValueError, EOFError):
        return None, None
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
        p.stdout.close()
        if hand is not None:
            hand.close()


def read_in_child(argv):
    """The child's read: the prompts read as the master reads them. argv = path, vocab size ('' for none), hand-back
    descriptor (-1: none), the master's prompts.BLOCK_ROWS, then the datasets to read where not the prompts (score's
    pairs). Prints what it gives: "read N" then "arrays NAME..." (the token datasets' arrays, N bytes written to the
    descriptor: for each, its array count, then the arrays), or a text's digest."""
    import h5py
    path, vocab, fd = argv[0], int(argv[1]) if argv[1] else None, int(argv[2])
    prompts.BLOCK_ROWS = block = int(argv[3])   # the master's (a text's digest is by blocks of it; tests change it)
    tokens, text = prompts.PROMPT_DATASETS
    with h5py.File(path, "r") as f:
        names = argv[4:] or [n for n in (tokens, text) if n in f][:1]
        kept = {}   # token ids: read as the master would, handed back
        for n in names:
            d = f[n]
            if n.endswith("_tokens") and isinstance(d, h5py.Dataset):
                ps = prompts.read_token_dataset(path, d, vocab)
                w = ps.grid_width
                kept[n] = [ps.tokens.reshape(len(ps), w)] if w is not None else [ps.offsets, ps.tokens]
            elif n == text and getattr(d, "ndim", 0) == 1 and token_cache.GROUP in f:
                print(prompts.texts_digest(d, read_rows), flush=True)   # a rerun checks its kept ids by it
            elif getattr(d, "ndim", 0) >= 1:
                for a in range(0, d.shape[0], block):   # (a block at a time: HDF5 would allocate what a bad row claims)
                    read_rows(d, a, a + block)
            elif isinstance(d, h5py.Dataset):
                d[()]
        if not kept:
            return
        size = sum(a.nbytes for arrays in kept.values() for a in arrays) if fd >= 0 else 0
        if size:
            st = os.fstatvfs(fd)
            size = size if size <= st.f_bavail * st.f_frsize // 2 else 0   # (never fill the temporary folder)
        print("read", size, flush=True)
        if size:
            with os.fdopen(fd, "wb") as fh:
                for arrays in kept.values():
                    np.save(fh, np.array([len(arrays)]))
                    for a in arrays:
                        np.save(fh, a)
            print("arrays", *kept, flush=True)


def _line(p, seconds):
    """The child's next line of output ('' at its end), or None where none came within `seconds`."""
    end = time.monotonic() + seconds
    with selectors.DefaultSelector() as sel:
        sel.register(p.stdout, selectors.EVENT_READ)
        while True:
            left = end - time.monotonic()
            if left <= 0:
                return None
            if sel.select(left):
                return p.stdout.readline().strip()


def _exit_code(p, seconds):
    """The child's exit code, or None where it did not end within `seconds` (then killed, in read_ahead)."""
    try:
        return p.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None
