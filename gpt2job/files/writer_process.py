"""The writer process (`python -m gpt2job.files.writer_process PARENT_PID [FD ...]`, started by files/writer.py's
WriterProcess for large jobs): creates the output, writes the rows it is sent with h5write.RowWriter, flushes the file
every flush_interval seconds and when asked (S), and on F marks it finished. Its input: the master's messages on stdin
(files/writer.py lists them), or with text the text processes' pipes FD ..., read in the turn the master dealt them
(pipes.InTurn). One loop in one thread: h5py holds the GIL through HDF5 calls, so a second thread would wait for them
(only Writeback's call, which holds no HDF5 lock, runs in a thread of its own after each flush).
"""
import itertools
import json
import os
import sys
import time

from gpt2job.chunks import concat_completions
from gpt2job.files.h5write import RowWriter, close_quietly, create_output, flush_quietly
from gpt2job.files.pipes import Inbox, InTurn, Relayed, batched, die_with_parent, error_line
from gpt2job.files.row_stops import stop_table_of


def main(parent, fds):
    """The writer: one loop (h5py holds the GIL through HDF5 calls: a second thread would wait for them). fds: the
    text processes' pipes, read in turn (none: the master's messages on stdin)."""
    die_with_parent(parent)
    import numpy as np
    from gpt2job.files.journal import records_of
    from gpt2job.files.text_process import read_text
    out = sys.stdout
    spent = {"wait_s": 0.0, "write_s": 0.0}     # seconds reading its input, and preparing and writing rows
    if fds:
        turns = InTurn([Inbox(fd, spent) for fd in fds])
        msgs = iter(turns)
    else:
        turns = None
        inbox = Inbox(sys.stdin.fileno(), spent)
        msgs = batched(inbox)
    f = writeback = None
    try:
        first = list(itertools.islice(msgs, 2))
        if len(first) < 2:       # the input ended before the header: the master (or a text process) is gone
            return
        (_, h), (_, lengths) = first
        header = json.loads(h)
        f = create_output(header, np.frombuffer(lengths, np.int32))
        del lengths
        writer = RowWriter(f, None, stop_table_of(header))   # per-row stops: read from the input; text: from T
        writeback = Writeback(f.filename)

        def flush():     # the rows to the file, and its pages on their way to disk: -> the time of it
            writer.flush()
            writeback.start()
            return time.monotonic()
        interval, last, dirty = header["flush_interval"], time.monotonic(), False
        end, comps, text_spent = b"C", None, None
        while True:
            inbox = turns.box if turns else inbox
            while dirty and not inbox.waiting() and not inbox.eof:   # a quiet job: flushed once it is time
                due = interval - (time.monotonic() - last)
                if due <= 0:
                    last, dirty = flush(), False
                else:
                    inbox.wait(due)
            kind, payload = next(msgs, (None, None))
            if kind is None:
                break
            t = time.perf_counter()
            if kind == b"R":
                comps = records_of(payload)
                if comps and not header["text"]:
                    writer.put(concat_completions(comps))
                    dirty = True
            elif kind == b"T":         # the text of the R just before it
                if comps:
                    writer.write(writer.prepare(concat_completions(comps), read_text(payload)))
                    dirty = True
            elif kind == b"X":         # each text process's seconds
                text_spent = (text_spent or []) + [json.loads(payload)]
            elif kind in (b"F", b"C"):
                end = kind
                summary = json.loads(payload) if kind == b"F" else None
                break
            if kind == b"S" or (dirty and time.monotonic() - last >= interval):
                last, dirty = flush(), False
            if kind == b"S":
                out.write("synced\n")
                out.flush()
            spent["write_s"] += time.perf_counter() - t
        if end == b"F":
            from gpt2job.files.progress import peak_rss_mb
            summary["output_writer"] = {"process": True, "peak_rss_mb": peak_rss_mb(),
                                        **{k: round(v, 3) for k, v in spent.items()}}
            if text_spent is not None:
                summary["output_writer"]["text_process"] = text_spent[0] if len(text_spent) == 1 else text_spent
            writer.finish(summary)
            f = None
            out.write("ok\n")
            out.flush()
        else:
            flush_quietly(writer)
    except BaseException as e:
        try:
            out.write(e.line if isinstance(e, Relayed) else error_line(e))
            out.flush()
        except OSError:
            pass
        os._exit(1)
    finally:
        close_quietly(f)
        if writeback is not None:      # (its second descriptor closed after the file: closing it could drop the
            writeback.close()          # file's lock where locks are per process, as on NFS)


class Writeback:
    """Starts the kernel writing a file's dirty pages to disk without waiting for it (Linux sync_file_range,
    SYNC_FILE_RANGE_WRITE), from a thread (ctypes lets go of the GIL), after each periodic flush of a large output:
    otherwise the final fsync writes the whole file while the job waits (with much memory, the kernel starts on its
    own only once gigabytes are dirty). Nothing where the call is missing."""

    def __init__(self, path):
        import ctypes
        try:
            self.call = ctypes.CDLL(None, use_errno=True).sync_file_range
            self.fd = os.open(path, os.O_RDONLY)
        except (AttributeError, OSError):
            self.call, self.fd = None, None
        self.thread, self.rc = None, None

    def start(self):
        import ctypes
        import threading
        if self.fd is None or (self.thread is not None and self.thread.is_alive()):
            return
        self.thread = threading.Thread(target=self._run, args=(ctypes.c_int64(0),), name="gpt2job-writeback",
                                       daemon=True)
        self.thread.start()

    def _run(self, zero):
        self.rc = self.call(self.fd, zero, zero, 2)     # the whole file (offset 0, length 0: to its end), no wait

    def close(self):
        if self.thread is not None:
            self.thread.join()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


if __name__ == "__main__":
    main(int(sys.argv[1]), [int(x) for x in sys.argv[2:]])
