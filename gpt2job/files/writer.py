"""The output writers the master's OutputStore starts: WriterThread (small jobs: a thread in the master's process,
nothing to start) and WriterProcess (large jobs). Both create the output file themselves, write the rows the master
gives them with h5write.RowWriter, and on `finish` mark the file finished.

The writer process (files/writer_process.py), in its own interpreter, never takes the GIL from the master's loop.
When the output has text, text processes (files/text_process.py) stand between the master and the writer: the
master deals its units out to them in turn, each adds its units' text, and the writer reads their pipes in the same
turn (pipes.InTurn). Without text the writer reads the master's messages on its stdin. Each process is one loop in
one thread (the writer also starts a short write-back thread after each periodic flush: writer_process.Writeback).

The master sends messages (files/pipes.py): a kind byte, a little-endian uint64 length, the payload:
  H  the header (JSON, h5write.make_header: with the job's stops; a per-row `stop` dataset is read from the input
     file it names, not sent); to every text process      P  the prompt lengths (int32 bytes); to the first
  R  results: journal record bytes (files/journal.py), the very bytes the master has made durable; the results
     queued while the master's feeder was busy go as one R (up to pipes.BATCH_BYTES): a unit
  S  sync: answer "synced" once everything before it is written and flushed: a unit
  F  finish (JSON summary): write the rest, mark the file finished, sync it, answer "ok", exit; to every text process
  C  close: write the rest, leave the file unfinished, exit (also at end of input: the master is gone); to every one
A text process sends each R followed by T (its rows' text), X (its seconds) before F, E (its error line).
The writer answers on stdout, one line each: "synced", "ok", or "error ERRNO MESSAGE" (then it exits with 1). The
kernel ends every one of them with the master (PR_SET_PDEATHSIG): a killed job leaves no writer behind; its journal
has every row.
"""
import fcntl
import json
import os
import queue
import subprocess
import sys
import threading
import time

from gpt2job.chunks import concat_completions
from gpt2job.files.h5write import RowWriter, close_quietly, create_output, flush_quietly
from gpt2job.files.pipes import MSG, grow_pipe, start_process, units
from gpt2job.files.row_stops import stop_table_of

QUEUE_BYTES = 256 << 20       # results the master may have queued for the writer before put() waits
MAX_QUEUED_ROWS = 1 << 22     # the same for the writer thread, in rows
# text processes of a writer process: one makes text about as fast as the writer then writes it (RESULTS.md);
# a second where the master's node has cores to spare
TEXT_PROCESSES = 2 if (os.cpu_count() or 1) >= 8 else 1


# ---------------------------------------------------------------- master side

class WriterEnded(RuntimeError):
    """The writer process or a text process ended before the job did (killed, out of memory)."""


class WriterProcess:
    """The master's handle on the writer process (same interface as WriterThread)."""

    def __init__(self, header, prompt_lengths, text_processes=None):
        """text_processes: how many text processes make the text (None: TEXT_PROCESSES; only with text)."""
        import numpy as np
        me = str(os.getpid())
        n = (TEXT_PROCESSES if text_processes is None else text_processes) if header["text"] else 0
        # the text processes, then the writer, which reads their output: the master writes to the text processes
        # (or, without text, to the writer) and reads the writer's answers. Each in a session of its own: a Ctrl-C
        # (SIGINT to the terminal's process group) is the master's to handle, even while a process is still starting
        self.procs = [start_process([sys.executable, "-m", "gpt2job.files.text_process", me, str(i)],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
                                    start_new_session=True)
                      for i in range(n)]
        texts = [os.fdopen(fcntl.fcntl(p.stdout.fileno(), fcntl.F_DUPFD_CLOEXEC, 3), "rb") for p in self.procs]
        for p in self.procs:           # (copies numbered 3 or more: the writer's stdin and stdout replace 0 to 2)
            p.stdout.close()
        for pipe in texts:
            grow_pipe(pipe)
        self.proc = start_process([sys.executable, "-m", "gpt2job.files.writer_process", me]
                                  + [str(pipe.fileno()) for pipe in texts],
                                  stdin=subprocess.DEVNULL if n else subprocess.PIPE, stdout=subprocess.PIPE,
                                  pass_fds=[pipe.fileno() for pipe in texts], close_fds=True, start_new_session=True)
        for pipe in texts:
            pipe.close()     # the writer's now
        self.procs.append(self.proc)
        self.pipes = [p.stdin for p in self.procs[:-1]] or [self.proc.stdin]
        for pipe in self.pipes:
            grow_pipe(pipe)
        self.stdout = self.proc.stdout
        self.path, self.error, self.replies = header["path"], None, queue.Queue()
        self.cond = threading.Condition()
        self.outbox, self.queued, self.closed = [], 0, False
        self.feeder = threading.Thread(target=self._feed, name="gpt2job-writer-feed", daemon=True)
        self.reader = threading.Thread(target=self._read, name="gpt2job-writer-read", daemon=True)
        self.feeder.start()
        self.reader.start()
        self._send(b"H", json.dumps(header).encode())
        self._send(b"P", np.ascontiguousarray(prompt_lengths, np.int32).tobytes())

    def _send(self, kind, payload):
        with self.cond:
            self._raise()
            while not self.has_room():
                self.cond.wait(0.5)
            self._raise()
            self.outbox.append((kind, payload))
            self.queued += len(payload)
            self.cond.notify_all()

    def _feed(self):
        """Writes the queued messages: H, F and C to every pipe, P to the first, and the units (consecutive R's
        joined, or an S) to each pipe in turn: the writer reads them back in that turn."""
        turn = 0
        while True:
            with self.cond:
                while not self.outbox and not self.closed:
                    self.cond.wait()
                if not self.outbox:
                    break
                msgs, self.outbox = self.outbox, []
            try:
                for kind, parts in units(msgs):
                    size = sum(len(x) for x in parts)
                    if kind in (b"H", b"F", b"C"):
                        pipes = self.pipes[turn:] + self.pipes[:turn]
                    elif kind == b"P":
                        pipes = self.pipes[:1]
                    else:                       # a unit: the pipe whose turn it is
                        pipes = [self.pipes[turn]]
                        turn = (turn + 1) % len(self.pipes)
                    for pipe in pipes:
                        pipe.write(MSG.pack(kind, size))
                        for x in parts:
                            pipe.write(x)
                        pipe.flush()
            except (OSError, ValueError) as e:   # the writer or a text process ended: what the writer said, else
                self.reader.join(timeout=10)     # a full disk, else which process ended
                self._close_pipes()
                if self.error is None:
                    try:
                        from gpt2job.files.h5write import check_disk_room
                        check_disk_room(self.path, 1 << 20)
                    except OSError as full:
                        self._fail(full)
                self._fail(self.error or self._ended(wait_s=10) or
                           OSError(getattr(e, "errno", None) or 0, "the output writer is gone"))
                return
            with self.cond:
                self.queued -= sum(len(payload) for _, payload in msgs)
                self.cond.notify_all()
        self._close_pipes()

    def _close_pipes(self):
        for pipe in self.pipes:
            try:
                pipe.close()
            except (OSError, ValueError):
                pass

    def _read(self):
        for line in self.stdout:
            text = line.decode(errors="replace").strip()
            if text.startswith("error "):
                code, _, msg = text[6:].partition(" ")
                self._fail(OSError(int(code), msg) if int(code) else RuntimeError(msg))
            else:
                self.replies.put(text)
        self.replies.put(None)

    def _fail(self, e):
        with self.cond:
            self.error = self.error or e
            self.cond.notify_all()

    def _raise(self):
        if self.error is not None:
            raise self.error

    def _answer(self, want):
        reply = self.replies.get()
        if reply != want:
            self._raise()
            with self.cond:        # the writer is gone: the text processes end with their input
                self.closed = True
                self.cond.notify_all()
            self.feeder.join(timeout=10)
            ended = self._ended(wait_s=10)
            from gpt2job.files.h5write import check_disk_room
            check_disk_room(self.path, 1 << 20)     # a crash on a full disk (HDF5 may crash there): say that
            self._raise()                      # (what the feeder found meanwhile: the same, or what the writer said)
            raise ended or WriterEnded("the output writer ended unexpectedly (exit 0)")

    def _ended(self, wait_s):
        """The error naming the process that ended first, as far as exit codes tell (a signal before an exit code:
        the others then end on their broken pipes), or None when each exited 0 or is still running."""
        codes = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout=wait_s))
            except subprocess.TimeoutExpired:
                codes.append(0)
        bad = [(c >= 0, i, c) for i, c in enumerate(codes) if c]
        if not bad:
            return None
        _, who, code = min(bad)
        name = "the output writer" + ("'s text process" if who < len(codes) - 1 else "")
        return WriterEnded(f"{name} ended unexpectedly ({f'signal {-code}' if code < 0 else f'exit {code}'})")

    def put(self, comps, blob):
        self._send(b"R", blob)

    def has_room(self):
        """Would put() go on at once? (True after an error: put() raises it.)"""
        return self.queued <= QUEUE_BYTES or self.error is not None

    def wait(self):
        self._send(b"S", b"")
        self._answer("synced")

    def finish(self, summary):
        self._send(b"F", json.dumps(summary, sort_keys=True).encode())
        self._answer("ok")
        self._end()

    def close(self):
        try:
            self._send(b"C", b"")
        except Exception:
            pass
        self._end()

    def _end(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.feeder.join(timeout=60)
        if self.feeder.is_alive():      # stuck in a write (a stuck writer): closing its pipe would wait for that write
            for proc in self.procs:
                proc.kill()
            self.feeder.join()          # (its write then fails: it closes the pipes)
        self._close_pipes()
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- the writer in a thread (small jobs)

class WriterThread(threading.Thread):
    """Creates the output, then writes the results put() queues while the master goes on, and flushes the file every
    flush_interval seconds. put() waits while more than MAX_QUEUED_ROWS rows are queued (memory stays bounded when
    the disk is slower than the results come). text: the TokenText of the output's text, or None (no text). The
    first error it meets is kept and raised, as it is, by the next put(), wait(), finish() or close()."""

    def __init__(self, header, prompt_lengths, text):
        super().__init__(name="gpt2job-output-writer", daemon=True)
        self.header, self.prompt_lengths, self.text = header, prompt_lengths, text
        self.flush_interval = header["flush_interval"]
        self.cond = threading.Condition()
        self.queue, self.queued_rows, self.busy, self.closing, self.error = [], 0, True, None, None
        self.written_rows, self.write_s = 0, 0.0
        self.start()

    def put(self, comps, blob=None):
        with self.cond:
            self._raise()
            while not self.has_room():
                self.cond.wait(0.5)
            self._raise()
            self.queue += comps
            self.queued_rows += sum(len(c.rows) for c in comps)
            self.cond.notify_all()

    def has_room(self):
        """As WriterProcess.has_room, in rows."""
        return self.queued_rows <= MAX_QUEUED_ROWS or self.error is not None

    def wait(self):
        """Until every queued row is written and flushed (raises the writer's error, if any)."""
        with self.cond:
            self.queue.append("flush")
            self.cond.notify_all()
            while (self.queue or self.busy) and self.error is None:
                self.cond.wait(0.5)
            self._raise()

    def finish(self, summary):
        self._end(("finish", summary))

    def close(self):
        self._end(("close", None), check=False)

    def _end(self, how, check=True):
        with self.cond:
            self.closing = how
            self.cond.notify_all()
        self.join()
        if check:
            self._raise()

    def _raise(self):
        if self.error is not None:
            raise self.error

    def run(self):
        f = None
        try:
            f = create_output(self.header, self.prompt_lengths)
            self.prompt_lengths = None
            writer = RowWriter(f, self.text, stop_table_of(self.header))
            last_flush, dirty = time.monotonic(), False
            while True:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()
                    while not self.queue and not self.closing:
                        due = self.flush_interval - (time.monotonic() - last_flush)
                        if dirty and due <= 0:
                            break
                        self.cond.wait(max(0.05, due) if dirty else 0.5)
                    items, self.queue, self.busy = self.queue, [], True
                    n, self.queued_rows = self.queued_rows, 0
                    closing = self.closing
                t = time.perf_counter()
                comps = [c for c in items if not isinstance(c, str)]
                if comps:
                    writer.put(concat_completions(comps))
                    dirty = True
                if dirty and ("flush" in items or time.monotonic() - last_flush >= self.flush_interval):
                    writer.flush()
                    last_flush, dirty = time.monotonic(), False
                self.written_rows += n
                self.write_s += time.perf_counter() - t
                if closing:
                    if closing[0] == "finish":
                        writer.finish(closing[1])
                        f = None
                    else:
                        flush_quietly(writer)
                    return
        except BaseException as e:   # kept for the master's thread, which turns it into the one clear line
            self.error = e
        finally:
            close_quietly(f)
            with self.cond:
                self.busy = False
                self.cond.notify_all()
