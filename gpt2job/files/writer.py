"""The output writer of large jobs, a process of its own (`python -m gpt2job.files.writer PARENT_PID`, started by
the master's OutputStore): it creates the output file, writes the rows the master sends, and on `finish` marks the
file finished. In its own interpreter it never takes the GIL from the master's loop. When the output has text, one
or two text processes (`... --text PARENT_PID I N`, text_main) stand between the master and the writer: they pass
the master's messages on, join consecutive results into batches, and add the `completions` text of each batch
(h5write.RowText) right behind it. The text is then made while the writer makes HDF5 calls; a thread of the writer
could not do that, as h5py holds the GIL through them (RESULTS.md, session 16). Each process is one loop in one
thread.

The master sends messages on the first process's stdin: a kind byte, a little-endian uint64 length, the payload:
  H  the header (JSON, h5write.make_header: with the job's stops; a per-row `stop` dataset is read from the input
     file it names, not sent)                      P  the prompt lengths (int32 bytes)
  R  results: journal record bytes (files/journal.py), the very bytes the master has made durable
  S  sync: answer "synced" once everything before it is written and flushed
  F  finish (JSON summary): write the rest, mark the file finished, sync it, answer "ok", exit
  C  close: write the rest, leave the file unfinished, exit (also at end of input: the master is gone)
A text process sends a batch whose text it made as  D  (the R's bytes) followed by  T  (its text: TEXT, below);
it adds  X  (its seconds, for the summary) before F, and  E  (its error, as an "error" line) when it fails.
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
BATCH_BYTES = 4 << 20         # result bytes (about 80,000 rows of 8 tokens) joined into one batch at most (_batched)


# ---------------------------------------------------------------- master side

def _grow_pipe(pipe):
    try:
        import fcntl
        fcntl.fcntl(pipe.fileno(), 1031, PIPE_BYTES)     # F_SETPIPE_SZ
    except OSError:
        pass


class WriterProcess:
    """The master's handle on the writer process (same interface as h5write.WriterThread)."""

    def __init__(self, header, prompt_lengths, text_processes=None):
        import numpy as np
        me = str(os.getpid())
        n = (text_processes or text_process_count()) if header["text"] else 0
        # the text processes, then the writer, each reading the one before: the master writes to the first, reads
        # the writer's answers
        self.procs = []
        for i in range(n + 1):
            args = ["--text", me, str(i), str(n)] if i < n else [me]
            self.procs.append(subprocess.Popen([sys.executable, "-m", "gpt2job.files.writer"] + args,
                                               stdin=self.procs[-1].stdout if self.procs else subprocess.PIPE,
                                               stdout=subprocess.PIPE, close_fds=True))
            if i:
                self.procs[-2].stdout.close()     # the next process's now
            if i < n:
                _grow_pipe(self.procs[-1].stdout)
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


# ---------------------------------------------------------------- the text processes

def text_process_count():
    """How many text processes a writer process has: GPT2JOB_TEXT_PROCESSES, else 2 on a machine of 8 cores or
    more (one makes text at about 1 us a row, the writer's HDF5 calls take about as long), else 1."""
    from gpt2job import envs
    return envs.get("GPT2JOB_TEXT_PROCESSES") or (2 if (os.cpu_count() or 1) >= 8 else 1)


TEXT = struct.Struct("<QQQ")     # T's payload: rows n, buffer bytes B, hits bytes H; then the buffer (NUL-terminated
                                 # UTF-8 strings) [B], starts int64 [n], exact uint8 [n], the hits (JSON) [H]


def text_main(parent, i, n):
    """Text process i of n: passes every message on, and makes the text of every n-th batch (batch k when k % n ==
    i; the first process joins the master's R's into batches): that R goes on as D (done), followed by a T with the
    text of its rows (its records' rows in order, copies left out: a copy takes its source's text). The text is made
    before the R is passed on: the writer then writes the previous batch meanwhile, where it would otherwise wait for
    this one's text."""
    _die_with_parent(parent)
    import time

    import numpy as np
    from gpt2job.files.h5write import RowText, concat, stop_table, token_text
    from gpt2job.files.journal import records_of
    out = sys.stdout.buffer
    maker = None
    spent = {"wait_s": 0.0, "text_s": 0.0, "send_s": 0.0}     # its seconds: reading, making text, writing
    inbox, k = Inbox(sys.stdin.fileno(), spent), 0
    try:
        for kind, payload in _batched(inbox) if i == 0 else iter(inbox.next, None):
            t = time.perf_counter()
            parts = [MSG.pack(kind, len(payload)), payload]
            mine = kind == b"R" and k % n == i
            k += kind in (b"R", b"D")
            if kind == b"H":
                header = json.loads(payload)
                maker = RowText(token_text(header), stop_table(header))
            elif mine:
                parts[0] = MSG.pack(b"D", len(payload))
                comps = records_of(payload)
                whole = concat(comps) if comps else None
                buf, starts, exact, hits = (maker.make(whole.rows, whole.offsets, whole.tokens, whole.finish) if comps
                                            else (np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, bool), {}))
                h = json.dumps({str(k): v for k, v in hits.items()}).encode()
                text = [memoryview(x).cast("B") for x in (TEXT.pack(len(starts), len(buf), len(h)), buf,
                                                           np.ascontiguousarray(starts, np.int64),
                                                           np.ascontiguousarray(exact, np.uint8), h)]
                parts += [MSG.pack(b"T", sum(len(x) for x in text))] + text
            elif kind == b"F":     # its seconds, for the summary (the writer takes them out)
                x = json.dumps({k: round(v, 3) for k, v in spent.items()}).encode()
                parts = [MSG.pack(b"X", len(x)), x] + parts
            t1 = time.perf_counter()
            spent["text_s"] += t1 - t
            for x in parts:
                out.write(x)
            out.flush()
            spent["send_s"] += time.perf_counter() - t1
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


class Inbox:
    """The messages on a pipe, read with os.read into a buffer of its own, so that whether another one is waiting is
    known (waiting()). spent["wait_s"] adds up the seconds spent waiting for input."""

    def __init__(self, fd, spent):
        self.fd, self.spent, self.buf, self.pos = fd, spent, bytearray(), 0

    def _whole(self):
        """The length of the message at the buffer's start when it is all there, else 0."""
        if len(self.buf) - self.pos < MSG.size:
            return 0
        n = MSG.size + MSG.unpack_from(self.buf, self.pos)[1]
        return n if len(self.buf) - self.pos >= n else 0

    def _read(self):
        if self.pos > (len(self.buf) >> 1):
            del self.buf[:self.pos]
            self.pos = 0
        data = os.read(self.fd, 1 << 20)
        self.buf += data
        return bool(data)

    def waiting(self):
        """Whether a whole message can be had without waiting."""
        import select
        while not self._whole():
            if not select.select([self.fd], [], [], 0)[0] or not self._read():
                return False
        return True

    def next(self):
        """(kind, payload) of the next message, or None at the end of input."""
        import time
        t = time.perf_counter()
        while not self._whole():
            if not self._read():
                self.spent["wait_s"] += time.perf_counter() - t
                return None
        self.spent["wait_s"] += time.perf_counter() - t
        kind, n = MSG.unpack_from(self.buf, self.pos)
        a = self.pos + MSG.size
        self.pos = a + n
        return kind, bytes(memoryview(self.buf)[a:a + n])


def _batched(inbox):
    """The inbox's messages, with consecutive R's joined into one (up to BATCH_BYTES) while more are waiting: the
    text and the HDF5 writes of a batch cost about 3 ms besides their rows' own cost (RESULTS.md, session 16), so a
    writer that falls behind catches up in larger batches. A T or E stays right behind its R."""
    pending, size = [], 0
    while True:
        if pending and (size >= BATCH_BYTES or not inbox.waiting()):
            yield b"R", b"".join(pending)
            pending, size = [], 0
        msg = inbox.next()
        if msg is None:
            break
        if msg[0] == b"R":
            pending.append(msg[1])
            size += len(msg[1])
            continue
        if pending:
            yield b"R", b"".join(pending)
            pending, size = [], 0
        yield msg
    if pending:
        yield b"R", b"".join(pending)


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
    msgs = _relayed(_batched(Inbox(sys.stdin.fileno(), spent)))
    f = None
    try:
        (_, h), (_, lengths) = next(msgs), next(msgs)
        header = json.loads(h)
        f = create_output(header, np.frombuffer(lengths, np.int32))
        del lengths
        writer = RowWriter(f, None, stop_table(header))   # per-row stops: read from the input; text: from T
        interval, last, dirty = header["flush_interval"], time.monotonic(), False
        end, comps, text_spent = b"C", None, []
        for kind, payload in msgs:
            t = time.perf_counter()
            if kind in (b"R", b"D"):     # D: an R with its T next
                comps = records_of(payload)
                if comps and not header["text"]:
                    writer.put(concat(comps))
                    dirty = True
            elif kind == b"T":         # the text of the R just before it
                if comps:
                    writer.write(writer.prepare(concat(comps), _text_of(payload)))
                    dirty = True
            elif kind == b"X":
                text_spent.append(json.loads(payload))
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
            if text_spent:
                summary["output_writer"]["text_processes"] = text_spent
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
        text_main(*map(int, sys.argv[2:5]))
    else:
        main(int(sys.argv[1]))
