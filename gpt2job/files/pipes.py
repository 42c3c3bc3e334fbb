"""The pipes between the master, the text processes and the writer process (files/writer.py, writer_process.py,
text_process.py): messages framed as a kind byte, a little-endian uint64 length and the payload; an Inbox that reads
them; results joined into batches (units, batched); the text processes' pipes read in turn (InTurn); a child process
that dies with the master; errors as one line."""
import os
import struct

from gpt2job.errors import errno_of, first_line

MSG = struct.Struct("<cQ")
PIPE_BYTES = 1 << 20          # a pipe's buffer (Linux allows up to 1 MiB unprivileged)
BATCH_BYTES = 4 << 20         # result bytes (about 80,000 rows of 8 tokens) joined into one batch at most (batched)


def grow_pipe(pipe):
    try:
        import fcntl
        fcntl.fcntl(pipe.fileno(), 1031, PIPE_BYTES)     # F_SETPIPE_SZ
    except OSError:
        pass


def start_process(args, **popen):
    """subprocess.Popen of a text or writer process, SIGUSR1 blocked in it until die_with_parent ignores it (Slurm's
    --signal reaches every process of the job step; its default action would end one that is still starting)."""
    import signal
    import subprocess
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    try:
        return subprocess.Popen(args, **popen)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def die_with_parent(parent):
    """Ends this process with the master (PR_SET_PDEATHSIG); a SIGINT is the master's to handle (it closes its
    writer, which then finishes what it has): the master starts these processes in a session of their own, so a
    Ctrl-C at the terminal does not reach them, and one sent to them alone is ignored from here on. So is SIGUSR1,
    the master's to act on (job.stop_on_sigusr1), which Slurm's --signal sends to every process of the job step."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})   # (start_process blocked it)
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)    # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:     # the master died before this process could ask
        os._exit(1)


class Inbox:
    """The messages on a pipe, read with os.read into a buffer of its own, so that whether another one is waiting is
    known (waiting()); a large message's rest is read straight into its own buffer (each byte copied once).
    spent["wait_s"] adds up the seconds spent reading and waiting for input."""

    def __init__(self, fd, spent):
        self.fd, self.spent, self.buf, self.pos, self.eof = fd, spent, bytearray(), 0, False

    def _read(self):
        if self.pos > (len(self.buf) >> 1):
            del self.buf[:self.pos]
            self.pos = 0
        data = os.read(self.fd, 1 << 20)
        self.buf += data
        self.eof = not data
        return bool(data)

    def waiting(self):
        """Whether a message has begun to arrive (its sender writes the rest at once)."""
        import select
        import time
        t = time.perf_counter()
        try:
            while len(self.buf) - self.pos < MSG.size:
                if not select.select([self.fd], [], [], 0)[0] or not self._read():
                    return False
            return True
        finally:
            self.spent["wait_s"] += time.perf_counter() - t

    def wait(self, timeout):
        """Until input arrives or `timeout` seconds have passed."""
        import select
        select.select([self.fd], [], [], max(timeout, 0))

    def next(self):
        """(kind, payload) of the next message, or None at the end of input (a message cut off too)."""
        import time
        t = time.perf_counter()
        try:
            while len(self.buf) - self.pos < MSG.size:
                if not self._read():
                    return None
            kind, n = MSG.unpack_from(self.buf, self.pos)
            a = self.pos + MSG.size
            if len(self.buf) - a >= n:
                self.pos = a + n
                return kind, bytes(memoryview(self.buf)[a:a + n])
            payload = bytearray(n)      # the rest read into the message's own buffer
            have = len(self.buf) - a
            payload[:have] = memoryview(self.buf)[a:]
            self.buf, self.pos = bytearray(), 0
            view = memoryview(payload)
            while have < n:
                k = os.readv(self.fd, [view[have:]])
                if not k:
                    self.eof = True
                    return None
                have += k
            return kind, payload
        finally:
            self.spent["wait_s"] += time.perf_counter() - t


def batched(inbox):
    """The inbox's messages, with consecutive R's joined into one (up to BATCH_BYTES) while more are waiting: a
    writer that falls behind catches up in larger batches (batches of 256 KB made the writer slower on the device
    machine: benchmarks/RESULTS.md); any other message keeps its place."""
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


def units(msgs):
    """(kind, payloads) of what is sent: consecutive R's joined into one (up to BATCH_BYTES), every other message as
    it is. A writer that falls behind thus catches up in larger batches (batches of 256 KB made the writer slower on
    the device machine: benchmarks/RESULTS.md)."""
    pending, size = [], 0
    for kind, payload in msgs:
        if kind == b"R" and size < BATCH_BYTES:
            pending.append(payload)
            size += len(payload)
            continue
        if pending:
            yield b"R", pending
            pending, size = [], 0
        if kind == b"R":
            pending, size = [payload], len(payload)
        else:
            yield kind, [payload]
    if pending:
        yield b"R", pending


def error_line(e):
    """'error ERRNO MESSAGE' for the master (ERRNO 0 when the error has none: HDF5 names it in its text, if at all)."""
    code = errno_of(e) or 0
    msg = os.strerror(code) if code else first_line(e, 200)
    return f"error {code} {msg}\n"


class Relayed(Exception):
    """A text process's error, as its line for the master."""

    def __init__(self, line):
        super().__init__(line)
        self.line = line


class InTurn:
    """The text processes' messages in the order the master sent them (files/writer.py: WriterProcess deals its
    units out in turn): H and P from the first pipe; then a unit from each pipe in turn, an R with the T after it or
    an S; then F, with each process's X before it (read from every pipe), or C. A text process's E is raised as
    Relayed. The messages end early where a pipe ends before its F or C (its process, or the master, is gone).
    `box` is the inbox whose turn it is."""

    def __init__(self, inboxes):
        self.inboxes, self.turn = inboxes, 0

    @property
    def box(self):
        return self.inboxes[self.turn]

    def _next(self, box):
        msg = box.next()
        if msg is not None and msg[0] == b"E":
            raise Relayed(msg[1].decode(errors="replace"))
        return msg

    def __iter__(self):
        for _ in range(2):      # H, P
            msg = self._next(self.inboxes[0])
            if msg is None:
                return
            yield msg
        seconds = {}
        while True:
            msg = self._next(self.box)
            if msg is None:
                return
            kind = msg[0]
            if kind == b"X":
                seconds[self.turn] = msg
                continue
            if kind == b"F":     # every other pipe holds its X and F now: the units before F were all read
                for i, box in enumerate(self.inboxes):
                    if i == self.turn:
                        continue
                    x, f = self._next(box), self._next(box)
                    if x is None or f is None:
                        return
                    if (x[0], f[0]) != (b"X", b"F"):
                        raise RuntimeError(f"text process {i}: {x[0]!r} {f[0]!r} where X F belong")
                    seconds[i] = x
                yield from (seconds[i] for i in sorted(seconds))
                yield msg
                return
            if kind == b"R":
                yield msg
                msg = self._next(self.box)
                if msg is None:
                    return
            if kind in (b"R", b"S"):    # the next pipe's turn before the unit's last message is handled: the writer
                self.turn = (self.turn + 1) % len(self.inboxes)    # then waits on the pipe its next message comes from
            yield msg
            if kind == b"C":
                return
