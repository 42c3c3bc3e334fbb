"""The output writer of large jobs, a process of its own (`python -m gpt2job.files.writer PARENT_PID`, started by
the master's OutputStore): it creates the output file, writes the rows the master sends, and on `finish` marks the
file finished. In its own interpreter it never takes the GIL from the master's loop. One thread reads the master's
messages, another prepares the rows and makes the HDF5 calls, and the rows' text is made by a process of its own
(TextProcess): h5py holds the GIL through its calls, so text made by a thread here would wait for them.

The master sends messages on the writer's stdin: a kind byte, a little-endian uint64 length, the payload:
  H  the header (JSON, h5write.make_header: with the job's stops; a per-row `stop` dataset is read from the input
     file it names, not sent)                      P  the prompt lengths (int32 bytes)
  R  results: journal record bytes (files/journal.py), the very bytes the master has made durable
  S  sync: answer "synced" once everything before it is written and flushed
  F  finish (JSON summary): write the rest, mark the file finished, sync it, answer "ok", exit
  C  close: write the rest, leave the file unfinished, exit (also at end of input: the master is gone)
It answers on stdout, one line each: "synced", "ok", or "error ERRNO MESSAGE" (then it exits with 1). The kernel
ends it with the master (PR_SET_PDEATHSIG): a killed job leaves no writer behind; its journal has every row.
"""
import json
import os
import queue
import re
import struct
import subprocess
import sys
import threading

MSG = struct.Struct("<cQ")
PIPE_BYTES = 1 << 20          # the pipe's buffer (Linux allows up to 1 MiB unprivileged)
QUEUE_BYTES = 256 << 20       # results the master may have queued for the writer before put() waits


# ---------------------------------------------------------------- master side

def _grow_pipe(pipe):
    try:
        import fcntl
        fcntl.fcntl(pipe.fileno(), 1031, PIPE_BYTES)     # F_SETPIPE_SZ
    except OSError:
        pass


class WriterProcess:
    """The master's handle on the writer process (same interface as h5write.WriterThread)."""

    def __init__(self, header, prompt_lengths):
        import numpy as np
        self.proc = subprocess.Popen([sys.executable, "-m", "gpt2job.files.writer", str(os.getpid())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        _grow_pipe(self.proc.stdin)
        self.path, self.error, self.replies = header["path"], None, queue.Queue()
        self.cond = threading.Condition()
        self.outbox, self.queued, self.closed = [], 0, False
        self.written_rows, self.write_s = None, 0.0
        self.feeder = threading.Thread(target=self._feed, name="gpt2job-writer-feed", daemon=True)
        self.reader = threading.Thread(target=self._read, name="gpt2job-writer-read", daemon=True)
        self.feeder.start()
        self.reader.start()
        self._send(b"H", json.dumps(header).encode())
        self._send(b"P", np.ascontiguousarray(prompt_lengths, np.int32).tobytes())

    def _send(self, kind, payload):
        with self.cond:
            self._raise()
            while self.queued > QUEUE_BYTES and self.error is None:
                self.cond.wait(0.5)
            self._raise()
            self.outbox.append(MSG.pack(kind, len(payload)) + bytes(payload) if len(payload) < 1 << 16 else
                               MSG.pack(kind, len(payload)))
            if len(payload) >= 1 << 16:
                self.outbox.append(payload)
            self.queued += len(payload)
            self.cond.notify_all()

    def _feed(self):
        while True:
            with self.cond:
                while not self.outbox and not self.closed:
                    self.cond.wait()
                if not self.outbox:
                    break
                parts, self.outbox = self.outbox, []
            try:
                for part in parts:
                    self.proc.stdin.write(part)
                self.proc.stdin.flush()
            except (OSError, ValueError) as e:   # the writer ended: what it said, else this
                self.reader.join(timeout=10)
                if self.error is None:
                    try:
                        from gpt2job.files.h5write import check_room
                        check_room(self.path, 1 << 20)
                    except OSError as full:
                        self._fail(full)
                self._fail(self.error or OSError(getattr(e, "errno", None) or 0, "the output writer is gone"))
                return
            with self.cond:
                self.queued -= sum(len(p) for p in parts)
                self.cond.notify_all()
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def _read(self):
        for line in self.proc.stdout:
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
            code = self.proc.wait()
            from gpt2job.files.h5write import check_room
            check_room(self.path, 1 << 20)     # a crash on a full disk (HDF5 may crash there): say that
            raise RuntimeError(f"the output writer ended unexpectedly ({f'signal {-code}' if code < 0 else f'exit {code}'})")

    def put(self, comps, blob):
        self._send(b"R", blob)

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
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------- the text process

BATCH = struct.Struct("<QQ")          # rows n, tokens T; then rows int64 [n], offsets int64 [n+1], tokens int32 [T],
                                      # finish uint8 [n]
TEXT = struct.Struct("<QQQ")          # rows n, buffer bytes, hits JSON bytes; then the buffer, starts int64 [n],
                                      # exact uint8 [n], the hits


class TextProcess:
    """The writer's handle on its text process (`python -m gpt2job.files.writer --text PARENT_PID`), which makes the
    `completions` text of each batch (h5write.RowText) while the writer makes HDF5 calls: h5py holds the GIL
    through them, so text made by a thread of the writer waits for them (RESULTS.md, session 16). Batches are
    answered in the order they were sent: send(), then take() once per batch."""

    def __init__(self, header):
        self.proc = subprocess.Popen([sys.executable, "-m", "gpt2job.files.writer", "--text", str(os.getpid())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        for pipe in (self.proc.stdin, self.proc.stdout):
            _grow_pipe(pipe)
        h = json.dumps(header).encode()
        self.proc.stdin.write(struct.pack("<Q", len(h)) + h)

    def send(self, rows, offsets, tokens, finish):
        import numpy as np
        w = self.proc.stdin
        w.write(BATCH.pack(len(rows), len(tokens)))
        for a, t in ((rows, np.int64), (offsets, np.int64), (tokens, np.int32), (finish, np.uint8)):
            w.write(memoryview(np.ascontiguousarray(a, t)).cast("B"))
        w.flush()

    def take(self):
        import numpy as np
        r = self.proc.stdout
        head = r.read(TEXT.size)
        if len(head) < TEXT.size:
            code = self.proc.wait()
            raise RuntimeError(f"the output writer's text process ended unexpectedly "
                               f"({f'signal {-code}' if code < 0 else f'exit {code}'})")
        n, nbuf, nhits = TEXT.unpack(head)
        buf = np.frombuffer(r.read(nbuf), np.uint8).copy()     # (writable: HDF5 takes pointers into it)
        starts = np.frombuffer(r.read(8 * n), np.int64)
        exact = np.frombuffer(r.read(n), np.uint8).astype(bool)
        hits = {int(k): v for k, v in json.loads(r.read(nhits)).items()}
        return buf, starts, exact, hits

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def text_main(parent):
    """The text process: reads the header, then batches; answers each with its text."""
    _die_with_parent(parent)
    import numpy as np
    from gpt2job.files.h5write import RowText, stop_table, token_text
    r, w = sys.stdin.buffer, sys.stdout.buffer
    header = json.loads(r.read(struct.unpack("<Q", r.read(8))[0]))
    maker = RowText(token_text(header), stop_table(header))
    while True:
        head = r.read(BATCH.size)
        if len(head) < BATCH.size:
            return
        n, t = BATCH.unpack(head)
        rows = np.frombuffer(r.read(8 * n), np.int64)
        offsets = np.frombuffer(r.read(8 * (n + 1)), np.int64)
        tokens = np.frombuffer(r.read(4 * t), np.int32)
        finish = np.frombuffer(r.read(n), np.uint8)
        buf, starts, exact, hits = maker.make(rows, offsets, tokens, finish)
        h = json.dumps({str(k): v for k, v in hits.items()}).encode()
        w.write(TEXT.pack(n, len(buf), len(h)))
        w.write(memoryview(np.ascontiguousarray(buf)).cast("B"))
        w.write(memoryview(np.ascontiguousarray(starts, np.int64)).cast("B"))
        w.write(memoryview(np.ascontiguousarray(exact, np.uint8)).cast("B"))
        w.write(h)
        w.flush()


# ---------------------------------------------------------------- the process

def _die_with_parent(parent):
    try:
        import ctypes
        import signal
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)    # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:     # the master died before this process could ask
        os._exit(1)


def _messages(stream):
    while True:
        head = stream.read(MSG.size)
        if len(head) < MSG.size:
            return
        kind, n = MSG.unpack(head)
        payload = stream.read(n)
        if len(payload) < n:
            return
        yield kind, payload


def _error_line(e):
    """'error ERRNO MESSAGE' for the master (ERRNO 0 when the error has none: HDF5 names it in its text, if at all)."""
    code = getattr(e, "errno", None) or 0
    if not code:
        m = re.search(r"errno = (\d+)", str(e))
        code = int(m.group(1)) if m else 0
    msg = os.strerror(code) if code else ((str(e).splitlines() or [""])[0][:200] or type(e).__name__)
    return f"error {code} {msg}\n"


def main(parent):
    _die_with_parent(parent)
    import numpy as np
    from gpt2job.files.h5write import BATCH_ROWS, RowWriter, concat, create_output, finish_output, stop_table
    from gpt2job.files.journal import records_of
    out = sys.stdout
    todo = queue.Queue(maxsize=4)       # batches (BATCH_ROWS rows at most) for the HDF5 thread
    failed = []

    def hdf5(writer, f, interval, texts):
        """The HDF5 half: prepares and writes each batch (its text from the text process); after an error it only
        empties the queue."""
        import time
        last = time.monotonic()
        while True:
            item = todo.get()
            try:
                if item is None:
                    return
                if not failed and isinstance(item, threading.Event):
                    f.flush()
                    last = time.monotonic()
                elif not failed:
                    comp, parts = item
                    writer.write(writer.prepare(comp, [texts.take() for _ in range(parts)] if texts else None))
                    if time.monotonic() - last >= interval:
                        f.flush()
                        last = time.monotonic()
            except BaseException as e:
                failed.append(e)
            finally:
                if isinstance(item, threading.Event):
                    item.set()
                todo.task_done()

    stream = sys.stdin.buffer
    msgs = _messages(stream)
    f = thread = texts = None
    try:
        (_, h), (_, lengths) = next(msgs), next(msgs)
        header = json.loads(h)
        texts = TextProcess(header) if header["text"] else None
        f = create_output(header, np.frombuffer(lengths, np.int32))
        del lengths
        writer = RowWriter(f, None, stop_table(header))   # per-row stops: read from the input; text: from `texts`
        thread = threading.Thread(target=hdf5, args=(writer, f, header["flush_interval"], texts), daemon=True)
        thread.start()
        end = b"C"
        for kind, payload in msgs:
            if failed:
                raise failed[0]
            if kind == b"R":       # a group commit, or a block of a journal being rebuilt: BATCH_ROWS at a time
                batch, n = [], 0
                for comp in records_of(payload) + [None]:
                    if batch and (comp is None or n + len(comp.rows) > BATCH_ROWS):
                        whole = concat(batch)
                        parts = list(writer.batches(whole))
                        for part in parts if texts else ():
                            texts.send(*part)
                        todo.put((whole, len(parts)))
                        batch, n = [], 0
                    if comp is not None:
                        batch.append(comp)
                        n += len(comp.rows)
            elif kind == b"S":
                done = threading.Event()
                todo.put(done)
                done.wait()
                if failed:
                    raise failed[0]
                out.write("synced\n")
                out.flush()
            elif kind in (b"F", b"C"):
                end = kind
                summary = json.loads(payload) if kind == b"F" else None
                break
        todo.put(None)
        thread.join()
        if failed:
            raise failed[0]
        if end == b"F":
            from gpt2job.files.progress import peak_rss_mb
            summary["output_writer"] = {"process": True, "peak_rss_mb": peak_rss_mb()}
            finish_output(f, summary)
            f = None
            out.write("ok\n")
            out.flush()
    except BaseException as e:
        try:
            out.write(_error_line(e))
            out.flush()
        except OSError:
            pass
        os._exit(1)
    finally:
        if texts is not None:
            texts.close()
        if f is not None:
            try:
                f.close()
            except Exception:
                pass


if __name__ == "__main__":
    if sys.argv[1] == "--text":
        text_main(int(sys.argv[2]))
    else:
        main(int(sys.argv[1]))
