"""The journal beside an output (OUT.journal): append-only records of completed chunks, each checksummed and
fsynced, so that results are durable the moment they arrive and a killed job resumes from them. A record cut
short by a kill or a full disk ends the journal: everything before it is good.

Format: a header record (JSON: the resume key) then one record per chunk, each REC_HEAD (magic, payload
length, crc32) + payload (the Completions' int64 buffer form, gpt2job.chunks)."""
import errno
import json
import os
import re
import struct
import zlib

import numpy as np

from gpt2job.chunks import Completions, decode_completions, encode_completions
from gpt2job.errors import UserError

MAGIC_HEAD, MAGIC_REC = b"GJH1", b"GJR1"
REC_HEAD = struct.Struct("<4sQI")  # magic, payload length, crc32


def io_error(path, e, what="write"):
    """A UserError for an OSError, or for HDF5's RuntimeError that carries 'errno = N' in its text."""
    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"errno = (\d+)", str(e))
        code = int(m.group(1)) if m else None
    reason = os.strerror(code) if code else str(e).splitlines()[0][:160]
    fix = "free disk space, then run the same command again to resume" if code in (
        errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "check the path and its permissions, then run the same command again"
    return UserError(f"cannot {what} ({reason}); completed rows are kept", path, "output", fix)


def read_journal(path):
    """-> (header dict or None, list of (Completions) records, offset of the end of the last good record)."""
    records, header, good_end = [], None, 0
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos + REC_HEAD.size <= len(data):
        magic, n, crc = REC_HEAD.unpack_from(data, pos)
        payload = data[pos + REC_HEAD.size: pos + REC_HEAD.size + n]
        if magic not in (MAGIC_HEAD, MAGIC_REC) or len(payload) != n or zlib.crc32(payload) != crc:
            break  # a record cut short by a kill or a full disk: everything before it is good
        if magic == MAGIC_HEAD:
            if header is not None:
                break
            header = json.loads(payload.decode())
        else:
            if header is None:
                break
            records.append(decode_completions(np.frombuffer(payload, "<i8"))[0])
        pos += REC_HEAD.size + n
        good_end = pos
    return header, records, good_end


class Journal:
    def __init__(self, path, header=None, truncate_at=None):
        self.path = path
        try:
            if header is not None:
                self.f = open(path, "wb")
                self._append(MAGIC_HEAD, json.dumps(header, sort_keys=True).encode())
            else:
                self.f = open(path, "r+b")
                self.f.truncate(truncate_at)
                self.f.seek(truncate_at)
        except OSError as e:
            raise io_error(path, e)

    def _append(self, magic, payload):
        self.f.write(REC_HEAD.pack(magic, len(payload), zlib.crc32(payload)) + payload)
        self.f.flush()
        os.fsync(self.f.fileno())

    def append(self, comp: Completions):
        try:
            self._append(MAGIC_REC, encode_completions(comp).astype("<i8").tobytes())
        except OSError as e:
            raise io_error(self.path, e)

    def close(self):
        try:
            self.f.close()
        except OSError:
            pass
