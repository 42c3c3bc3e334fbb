"""The output writer of large jobs, a process of its own (`python -m gpt2job.files.writer PARENT_PID`, started by
the master's OutputStore): it creates the output file, writes the rows the master sends, and on `finish` marks the
file finished. In its own interpreter it never takes the GIL from the master's loop. When the output has text, a
second process (`... --text PARENT_PID`) stands between the master and the writer: it passes the master's messages
on and adds, after each group of results, their `completions` text (h5write.RowText). The text is then made while
the writer makes HDF5 calls; a thread of the writer could not do that, as h5py holds the GIL through them (RESULTS.md,
session 16). Each process is one loop in one thread.

The master sends messages on the first process's stdin: a kind byte, a little-endian uint64 length, the payload:
  H  the header (JSON, h5write.make_header: with the job's stops; a per-row `stop` dataset is read from the input
     file it names, not sent)                      P  the prompt lengths (int32 bytes)
  R  results: journal record bytes (files/journal.py), the very bytes the master has made durable
  S  sync: answer "synced" once everything before it is written and flushed
  F  finish (JSON summary): write the rest, mark the file finished, sync it, answer "ok", exit
  C  close: write the rest, leave the file unfinished, exit (also at end of input: the master is gone)
The text process adds  T  the text of the R before it (TEXT, below), and  E  its own error (an "error" line).
The writer answers on stdout, one line each: "synced", "ok", or "error ERRNO MESSAGE" (then it exits with 1). The
kernel ends both with the master (PR_SET_PDEATHSIG): a killed job leaves no writer behind; its journal has every row.
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
        me = str(os.getpid())
        self.procs = []              # [text process,] writer: the master writes to the first, reads the last
        if header["text"]:
            self.procs.append(subprocess.Popen([sys.executable, "-m", "gpt2job.files.writer", "--text", me],
                                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True))
            _grow_pipe(self.procs[0].stdout)
        self.procs.append(subprocess.Popen([sys.executable, "-m", "gpt2job.files.writer", me],
                                           stdin=self.procs[0].stdout if self.procs else subprocess.PIPE,
                                           stdout=subprocess.PIPE, close_fds=True))
        if len(self.procs) > 1:
            self.procs[0].stdout.close()     # the writer's now
        self.stdin, self.stdout, self.proc = self.procs[0].stdin, self.procs[-1].stdout, self.procs[-1]
        _grow_pipe(self.stdin)
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
                    self.stdin.write(part)
                self.stdin.flush()
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
            self.stdin.close()
        except OSError:
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
        for proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ---------------------------------------------------------------- the text process

TEXT = struct.Struct("<QQQ")     # T's payload: rows n, buffer bytes B, hits bytes H; then the buffer (NUL-terminated
                                 # UTF-8 strings) [B], starts int64 [n], exact uint8 [n], the hits (JSON) [H]


def text_main(parent):
    """The text process: passes every message on; after each R, a T with the text of its rows (its records' rows in
    order, copies left out: a copy takes its source's text)."""
    _die_with_parent(parent)
    import numpy as np
    from gpt2job.files.h5write import RowText, concat, stop_table, token_text
    from gpt2job.files.journal import records_of
    import time
    out = sys.stdout.buffer
    maker = None
    spent = {"wait_s": 0.0, "text_s": 0.0, "send_s": 0.0}     # its seconds: reading, making text, writing
    try:
        for kind, payload in _messages(sys.stdin.buffer, spent):
            t0 = time.perf_counter()
            if kind == b"F":     # its seconds, for the summary (the writer takes them out)
                x = json.dumps({k: round(v, 3) for k, v in spent.items()}).encode()
                out.write(MSG.pack(b"X", len(x)) + x)
            if kind == b"H":
                header = json.loads(payload)
                maker = RowText(token_text(header), stop_table(header))
            out.write(MSG.pack(kind, len(payload)))
            out.write(payload)
            if kind == b"R":
                comps = records_of(payload)
                if comps:
                    whole = concat(comps)
                    text = maker.make(whole.rows, whole.offsets, whole.tokens, whole.finish)
                else:
                    text = (np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, bool), {})
                buf, starts, exact, hits = text
                t1 = time.perf_counter()
                spent["text_s"] += t1 - t0
                t0 = t1
                h = json.dumps({str(k): v for k, v in hits.items()}).encode()
                parts = [TEXT.pack(len(starts), len(buf), len(h)), buf, np.ascontiguousarray(starts, np.int64),
                         np.ascontiguousarray(exact, np.uint8), h]
                parts = [memoryview(x).cast("B") for x in parts]
                out.write(MSG.pack(b"T", sum(len(x) for x in parts)))
                for x in parts:
                    out.write(x)
            out.flush()
            spent["send_s"] += time.perf_counter() - t0
            if kind in (b"F", b"C"):
                return
    except BaseException as e:       # the writer says it to the master
        line = _error_line(e).encode()
        try:
            out.write(MSG.pack(b"E", len(line)) + line)
            out.flush()
        except OSError:
            pass
        os._exit(1)


class Relayed(Exception):
    """The text process's error, as its line for the master."""

    def __init__(self, line):
        super().__init__(line)
        self.line = line


def _relayed(msgs):
    """The messages, the text process's error (E) raised as Relayed."""
    for kind, payload in msgs:
        if kind == b"E":
            raise Relayed(payload.decode(errors="replace"))
        yield kind, payload


def _text_of(payload):
    """T's payload -> (buffer, starts, exact, hits): RowText.make's result."""
    import numpy as np
    n, nbuf, nhits = TEXT.unpack_from(payload)
    at = TEXT.size
    buf = np.frombuffer(payload, np.uint8, nbuf, at)
    starts = np.frombuffer(payload, np.int64, n, at + nbuf)
    exact = np.frombuffer(payload, np.uint8, n, at + nbuf + 8 * n).astype(bool)
    hits = {int(k): v for k, v in json.loads(bytes(payload[at + nbuf + 9 * n:])).items()}
    return buf, starts, exact, hits


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


def _messages(stream, spent=None):
    """(kind, payload) of each message; spent["wait_s"] (when given) adds up the seconds spent waiting to read."""
    import time
    while True:
        t = time.perf_counter()
        head = stream.read(MSG.size)
        payload = b""
        if len(head) == MSG.size:
            kind, n = MSG.unpack(head)
            payload = stream.read(n)
        if spent is not None:
            spent["wait_s"] += time.perf_counter() - t
        if len(head) < MSG.size or len(payload) < n:
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
    """The writer: one loop (h5py holds the GIL through HDF5 calls: a second thread would wait for them)."""
    _die_with_parent(parent)
    import time

    import numpy as np
    from gpt2job.files.h5write import RowWriter, concat, create_output, finish_output, stop_table
    from gpt2job.files.journal import records_of
    out = sys.stdout
    spent = {"wait_s": 0.0, "write_s": 0.0}     # seconds reading its input, and preparing and writing rows
    msgs = _relayed(_messages(sys.stdin.buffer, spent))
    f = None
    try:
        (_, h), (_, lengths) = next(msgs), next(msgs)
        header = json.loads(h)
        f = create_output(header, np.frombuffer(lengths, np.int32))
        del lengths
        writer = RowWriter(f, None, stop_table(header))   # per-row stops: read from the input; text: from T
        interval, last, dirty = header["flush_interval"], time.monotonic(), False
        end, comps, text_spent = b"C", None, None
        for kind, payload in msgs:
            t = time.perf_counter()
            if kind == b"R":
                comps = records_of(payload)
                if comps and not header["text"]:
                    writer.put(concat(comps))
                    dirty = True
            elif kind == b"T":         # the text of the R just before it
                if comps:
                    writer.write(writer.prepare(concat(comps), _text_of(payload)))
                    dirty = True
            elif kind == b"X":
                text_spent = json.loads(payload)
            elif kind in (b"F", b"C"):
                end = kind
                summary = json.loads(payload) if kind == b"F" else None
                break
            if kind == b"S" or (dirty and time.monotonic() - last >= interval):
                f.flush()
                last, dirty = time.monotonic(), False
            if kind == b"S":
                out.write("synced\n")
                out.flush()
            spent["write_s"] += time.perf_counter() - t
        if end == b"F":
            from gpt2job.files.progress import peak_rss_mb
            summary["output_writer"] = {"process": True, "peak_rss_mb": peak_rss_mb(),
                                        **{k: round(v, 3) for k, v in spent.items()}}
            if text_spent is not None:
                summary["output_writer"]["text_process"] = text_spent
            finish_output(f, summary)
            f = None
            out.write("ok\n")
            out.flush()
    except BaseException as e:
        try:
            out.write(e.line if isinstance(e, Relayed) else _error_line(e))
            out.flush()
        except OSError:
            pass
        os._exit(1)
    finally:
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
