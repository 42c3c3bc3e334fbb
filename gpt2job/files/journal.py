"""The journal beside an output (OUT.journal): append-only records of completed chunks, each checksummed and
fsynced, so that results are durable the moment they arrive and a killed job resumes from them. A record cut
short by a kill or a full disk ends the journal: everything before it is good.

Format: a header record (JSON: the resume key) then records of completed rows, each REC_HEAD (magic, payload
length, crc32) + payload. A record written now (GJR2) holds one chunk's completions in their compact form (45 bytes a
row of 8 tokens, 12 a copy): chunk id, rows B, tokens T, copies C (int64 each), rows (int64 [B]), copy rows (int64
[C]), tokens (int32 [T]), lengths (int32 [B]), copy sources (int32 [C]: the row whose completion a copy has),
finish codes (uint8 [B]), all little-endian. A chunk with log-probabilities (--logprobs) is a GJR3 record: the GJR2
payload, then K (int64), the logprobs (float32 [T]), the top ids (int32 [T, K]) and top logprobs (float32 [T, K]);
chunks without them stay GJR2. Records of older journals (GJR1: chunks.py's former int64 buffer) are read too. Results
received together are appended with one write and one fsync (Journal.submit / wait: a group commit)."""
import errno
import json
import os
import struct
import threading
import zlib

import numpy as np

from gpt2job.chunks import FINISH_INVALID, Completions
from gpt2job.errors import UserError, errno_of, first_line

JOURNAL_SUFFIX = ".journal"   # OUT's journal is OUT.journal

MAGIC_HEAD, MAGIC_REC_V1, MAGIC_REC, MAGIC_REC_LP = b"GJH1", b"GJR1", b"GJR2", b"GJR3"
REC_HEAD = struct.Struct("<4sQI")  # magic, payload length, crc32


def io_error(path, e, what="write"):
    """A UserError for an OSError, or for HDF5's RuntimeError that carries 'errno = N' in its text."""
    code = errno_of(e)
    reason = os.strerror(code) if code else first_line(e, 160)
    full = code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    fix = ("free disk space, then run the same command again to resume" if full
           else "check the path and its permissions, then run the same command again")
    return UserError(f"cannot {what} ({reason}); completed rows are kept", path, "output", fix)


def encode_record(c: Completions) -> bytes:
    """The GJR2 payload of one chunk's completions."""
    b, t, n = len(c.rows), int(c.offsets[-1]), len(c.copy_rows)
    return b"".join((np.array([c.chunk_id, b, t, n], "<i8").tobytes(), np.asarray(c.rows, "<i8").tobytes(),
                     np.asarray(c.copy_rows, "<i8").tobytes(), np.asarray(c.tokens, "<i4").tobytes(),
                     np.diff(c.offsets).astype("<i4").tobytes(), np.asarray(c.copy_src, "<i4").tobytes(),
                     np.asarray(c.finish, np.uint8).tobytes()))


def encode_logprobs(c: Completions) -> bytes:
    """What a GJR3 record adds to the GJR2 payload: K, logprobs [T], top ids [T, K], top logprobs [T, K]."""
    parts = [np.array([c.top_k], "<i8").tobytes(), np.asarray(c.logprobs, "<f4").tobytes()]
    if c.top_k:
        parts += [np.asarray(c.top_ids, "<i4").tobytes(), np.asarray(c.top_logprobs, "<f4").tobytes()]
    return b"".join(parts)


def decode_record(payload, with_logprobs=False) -> Completions:
    """A GJR2 payload (with_logprobs: GJR3) as Completions whose arrays are views of it (no copies but the
    offsets and copy_src)."""
    cid, b, t, n = (int(x) for x in np.frombuffer(payload, "<i8", 4))
    size = 32 + 13 * b + 4 * t + 12 * n
    if (len(payload) < size + 8) if with_logprobs else (len(payload) != size):
        raise ValueError("malformed journal record")
    p = 32
    rows = np.frombuffer(payload, "<i8", b, p)
    copy_rows = np.frombuffer(payload, "<i8", n, p + 8 * b)
    p += 8 * (b + n)
    tokens = np.frombuffer(payload, "<i4", t, p)
    offsets = np.zeros(b + 1, np.int64)
    np.cumsum(np.frombuffer(payload, "<i4", b, p + 4 * t), out=offsets[1:])
    copy_src = np.frombuffer(payload, "<i4", n, p + 4 * (t + b)).astype(np.int64)
    finish = np.frombuffer(payload, np.uint8, b, p + 4 * (t + b + n))
    if offsets[-1] != t or (n and (copy_src.min() < 0 or copy_src.max() >= b)):
        raise ValueError("malformed journal record")
    c = Completions(cid, rows, offsets, tokens, finish, copy_rows, copy_src)
    if with_logprobs:
        k = int(np.frombuffer(payload, "<i8", 1, size)[0])
        if k < 0 or len(payload) != size + 8 + 4 * t * (1 + 2 * k):
            raise ValueError("malformed journal record")
        c.logprobs = np.frombuffer(payload, "<f4", t, size + 8)
        if k:
            c.top_ids = np.frombuffer(payload, "<i4", t * k, size + 8 + 4 * t).reshape(t, k)
            c.top_logprobs = np.frombuffer(payload, "<f4", t * k, size + 8 + 4 * t * (1 + k)).reshape(t, k)
    return c


def decode_any(magic, payload) -> Completions:
    """The Completions of a record of any kind (GJR1, GJR2, GJR3)."""
    if magic == MAGIC_REC_V1:
        return decode_record_v1(payload)
    return decode_record(payload, magic == MAGIC_REC_LP)


def decode_record_v1(payload) -> Completions:
    """A record of an older journal: int64 [chunk_id, B, compute_us, rows(B), offsets(B+1), finish(B), tokens(T)]."""
    buf = np.frombuffer(payload, "<i8")
    cid, b = int(buf[0]), int(buf[1])
    rows, offsets = buf[3:3 + b].astype(np.int64), buf[3 + b:4 + 2 * b].astype(np.int64)
    finish, tokens = buf[4 + 2 * b:4 + 3 * b].astype(np.uint8), buf[4 + 3 * b:].astype(np.int32)
    if len(offsets) != b + 1 or offsets[-1] != len(tokens) or len(finish) != b:
        raise ValueError("malformed journal record")
    return Completions(cid, rows, offsets, tokens, finish)


class JournalReader:
    """Reads a journal front to back without holding it: header (the resume key, or None when the file has none),
    records() yields its chunks' Completions one by one, and afterwards end is the offset where the last good
    record ends (a record cut short by a kill or a full disk, or a damaged one, ends the journal)."""

    def __init__(self, path):
        self.path, self.header, self.end = path, None, 0
        self.f = open(path, "rb")
        head = self.f.read(REC_HEAD.size)
        if len(head) == REC_HEAD.size:
            magic, n, crc = REC_HEAD.unpack(head)
            payload = self.f.read(n) if magic == MAGIC_HEAD else b""
            if magic == MAGIC_HEAD and len(payload) == n and zlib.crc32(payload) == crc:
                try:
                    self.header = json.loads(payload.decode())
                    self.end = self.f.tell()
                except (ValueError, UnicodeDecodeError):
                    self.header = None
        if self.header is None:
            self.f.close()

    def records(self):
        """Each record's Completions, one by one."""
        for comps, _ in self.blocks():
            yield from comps

    def blocks(self, size=1 << 26):
        """The good records, a block of the file at a time: (their Completions, their bytes as they are in the file:
        what Journal.encode made of them)."""
        if self.header is None:
            return
        with self.f:
            for comps, blob in record_blocks(self.f, size=size):
                self.end += len(blob)
                yield comps, blob


def record_blocks(f, limit=None, size=1 << 26):
    """The good records of f from where it stands (at most limit bytes of it), a block of about size bytes at a
    time (a longer record: a block of its own): (their Completions, their bytes). A record cut short or damaged
    ends them."""
    buf, left = b"", limit
    while True:
        more = f.read(size if left is None else min(size, left))
        if left is not None:
            left -= len(more)
        buf = buf + more if buf else more
        view, pos, comps, bad = memoryview(buf), 0, [], False
        while pos + REC_HEAD.size <= len(buf):
            magic, n, crc = REC_HEAD.unpack_from(buf, pos)
            if magic not in (MAGIC_REC, MAGIC_REC_V1, MAGIC_REC_LP):
                bad = True
                break
            if pos + REC_HEAD.size + n > len(buf):
                break          # the rest of it is in the next block (or cut short, at the end)
            payload = view[pos + REC_HEAD.size:pos + REC_HEAD.size + n]
            try:
                if zlib.crc32(payload) != crc:
                    raise ValueError("checksum")
                comps.append(decode_any(magic, payload))
            except ValueError:
                bad = True
                break
            pos += REC_HEAD.size + n
        if comps:
            yield comps, view[:pos]
        if bad or not more:
            return
        buf = buf[pos:]


def records_of(blob):
    """The Completions of journal record bytes (Journal.encode)."""
    out, pos, view = [], 0, memoryview(blob)
    while pos < len(blob):
        magic, n, _ = REC_HEAD.unpack_from(blob, pos)
        payload = view[pos + REC_HEAD.size: pos + REC_HEAD.size + n]
        out.append(decode_any(magic, payload))
        pos += REC_HEAD.size + n
    return out


def read_journal(path):
    """-> (header dict or None, list of (Completions) records, offset of the end of the last good record). Holds every
    record: for tests and tools; a job reads its journal with JournalReader."""
    j = JournalReader(path)
    records = list(j.records())
    return j.header, records, j.end


class Journal:
    """Append-only, fsynced. append_many() returns when its records are durable; submit() hands them to a thread that
    writes and syncs them while the caller goes on, and wait() returns when they are durable (one group in flight at
    a time: a group commit whose fsync overlaps the master's other work)."""

    def __init__(self, path, header=None, truncate_at=None):
        """A new journal (header: the resume key), or one reopened to append after its last whole record, truncate_at
        (its reader's end)."""
        if (header is None) == (truncate_at is None):   # (truncate(None) would empty a journal that holds rows)
            raise ValueError("Journal: give a header or truncate_at, not both or neither")
        self.path = path
        self.busy, self.error, self.thread = False, None, None
        self.end = 0     # where the durable records end (read it once wait() has returned)
        try:
            if header is not None:
                self.f = open(path, "wb")
                self._append(MAGIC_HEAD, json.dumps(header, sort_keys=True).encode())
            else:
                self.f = open(path, "r+b")
                self.f.truncate(truncate_at)
                self.f.seek(truncate_at)
                self.end = truncate_at
        except OSError as e:
            raise io_error(path, e)

    def _append(self, magic, payload):
        self._write(REC_HEAD.pack(magic, len(payload), zlib.crc32(payload)) + payload)

    def _write(self, blob):
        self.f.write(blob)
        self.f.flush()
        os.fsync(self.f.fileno())
        self.end += len(blob)

    @staticmethod
    def encode(comps):
        """The bytes that append the records of these chunks."""
        parts = []
        for c in comps:
            payload = encode_record(c)
            magic = MAGIC_REC
            if c.logprobs is not None:
                payload, magic = payload + encode_logprobs(c), MAGIC_REC_LP
            parts += [REC_HEAD.pack(magic, len(payload), zlib.crc32(payload)), payload]
        return b"".join(parts)

    def append(self, comp: Completions):
        self.append_many([comp])

    def append_many(self, comps):
        """Append the records of several chunks with one write and one fsync: durable when this returns."""
        self.submit(self.encode(comps))
        self.wait()

    def submit(self, blob):
        """Start writing and syncing blob (Journal.encode) in the background; wait() before the next submit."""
        assert not self.busy, "one group commit at a time"
        self.busy, self.error = True, None
        if self.thread is None:
            self.cond = threading.Condition()
            self.blob = None
            self.thread = threading.Thread(target=self._serve, name="gpt2job-journal", daemon=True)
            self.thread.start()
        with self.cond:
            self.blob = blob
            self.cond.notify_all()

    def ready(self):
        """Is the group submitted last durable (or failed)? Never blocks."""
        return not self.busy or self.blob is None and not self._writing

    def wait(self):
        """Until the group submitted last is durable; raises the one clear error when it could not be written."""
        if not self.busy:
            return
        with self.cond:
            while self.blob is not None or self._writing:
                self.cond.wait()
        self.busy = False
        if self.error is not None:
            e, self.error = self.error, None
            raise io_error(self.path, e)

    _writing = False

    def _serve(self):
        while True:
            with self.cond:
                while self.blob is None:
                    self.cond.wait()
                blob, self._writing = self.blob, True
                self.blob = None
            try:
                self._write(blob)
            except OSError as e:
                self.error = e
            with self.cond:
                self._writing = False
                self.cond.notify_all()

    def close(self):
        try:
            self.wait()
        except UserError:
            pass
        try:
            self.f.close()
        except OSError:
            pass


def journal_has_records(output):
    """Does OUTPUT.journal hold a whole record past its header (rows completed by this run or one before it; a
    record cut short by a kill holds none)? Reads two record heads, not the records: cheap enough for a signal
    handler."""
    try:
        with open(output + JOURNAL_SUFFIX, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(REC_HEAD.size)
            if len(head) < REC_HEAD.size:
                return False
            magic, header_bytes, _ = REC_HEAD.unpack(head)
            if magic != MAGIC_HEAD:
                return False
            f.seek(REC_HEAD.size + header_bytes)
            first = f.read(REC_HEAD.size)
    except OSError:
        return False
    if len(first) < REC_HEAD.size:
        return False
    magic, n, _ = REC_HEAD.unpack(first)
    return magic in (MAGIC_REC, MAGIC_REC_V1, MAGIC_REC_LP) and size >= 2 * REC_HEAD.size + header_bytes + n


def _journal_rows(output):
    """(the journal's resume key, an iterator of each record's rows with a result: invalid rows left out), or None
    without a readable OUTPUT.journal."""
    try:
        reader = JournalReader(output + JOURNAL_SUFFIX)
    except OSError:
        return None
    if reader.header is None:
        return None
    return reader.header, (np.asarray(c.all_rows)[np.asarray(c.all_finish) != FINISH_INVALID] for c in reader.records())


def rows_in_journal(output):
    """Rows complete in OUTPUT.journal (a job stopped before its writer made OUTPUT): their count; None without a
    readable journal."""
    journaled = _journal_rows(output)
    if journaled is None:
        return None
    rows = list(journaled[1])
    return len(np.unique(np.concatenate(rows))) if rows else 0


def rows_only_in_journal(output, f):
    """Rows complete in OUTPUT.journal that the open output file f does not hold yet (a job killed before its writer
    caught up: the next run of the same command adds them): their count, 0 without a journal of f's run."""
    if not os.path.exists(output + JOURNAL_SUFFIX) or "done" not in f or "resume_key" not in f.attrs:
        return 0
    journaled = _journal_rows(output)
    if journaled is None or json.dumps(journaled[0], sort_keys=True) != f.attrs["resume_key"]:
        return 0
    seen = np.zeros(len(f["done"]), bool)
    for rows in journaled[1]:
        seen[rows] = True
    return int(np.count_nonzero(seen & (f["done"][()] == 0)))
