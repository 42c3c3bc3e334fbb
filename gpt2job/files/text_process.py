"""The output's text processes (`python -m gpt2job.files.text_process PARENT_PID INDEX`, started by files/writer.py's
WriterProcess when the output has text). The master deals its batches of results out to them in turn; each adds the
`completions` text of its batches' rows (text.RowText) and passes them on to the writer, which reads the text
processes in the same turn (pipes.InTurn). The text is then made while the writer makes HDF5 calls (a thread of the
writer could not do that: h5py holds the GIL through them: benchmarks/RESULTS.md), by one or two processes
(writer.TEXT_PROCESSES), each reading only its own batches.

Each message it reads is answered with:
  H  (the header) kept; passed on by the first process only      P, S, C  passed on
  R  (a batch: journal records) passed on as one record, then T (its rows' text)
  F  X (its seconds, for the summary), then F
and when it fails, E (its error as an "error" line, which the writer relays).
"""
import json
import os
import struct
import sys

from gpt2job.files.pipes import MSG, Inbox, die_with_parent, error_line

TEXT = struct.Struct("<QQQ")     # T's payload: rows n, buffer bytes B, hits bytes H; then the buffer (NUL-terminated
                                 # UTF-8 strings) [B], starts int64 [n], sizes int64 [n], exact uint8 [n], the hits
                                 # (JSON) [H]


def text_main(parent, index=0):
    """Text process `index`: after each R, a T with the text of its rows (its records' rows in order, copies left
    out: a copy takes its source's text). The text is made before the R is passed on: the writer then writes the
    previous batch meanwhile, where it would otherwise wait for this one's text."""
    die_with_parent(parent)
    import time
    out = os.fdopen(os.dup(1), "wb")    # the messages; fd 1 then goes where stderr goes: a stray print cannot
    os.dup2(2, 1)                       # break their framing
    sys.stdout = sys.stderr
    spent = {"wait_s": 0.0, "text_s": 0.0, "send_s": 0.0}     # its seconds: reading, making text, writing
    try:
        import numpy as np
        from gpt2job.chunks import concat_completions
        from gpt2job.files.h5write import token_text
        from gpt2job.files.journal import Journal, records_of
        from gpt2job.files.progress import peak_rss_mb
        from gpt2job.files.row_stops import stop_table_of
        from gpt2job.files.text import RowText, Text
        inbox, maker = Inbox(sys.stdin.fileno(), spent), None
        while (msg := inbox.next()) is not None:
            kind, payload = msg
            t = time.perf_counter()
            parts = [MSG.pack(kind, len(payload)), payload]
            if kind == b"H":
                header = json.loads(payload)
                maker = RowText(token_text(header), stop_table_of(header))
                if index:
                    parts = []
            elif kind == b"R":
                comps = records_of(payload)
                whole = concat_completions(comps) if comps else None
                if len(comps) > 1:    # the batch as one record: the writer decodes it in one go (~0.1 us a row less)
                    payload = Journal.encode([whole])
                    parts = [MSG.pack(kind, len(payload)), payload]
                made = (maker.make(whole.rows, whole.offsets, whole.tokens, whole.finish) if comps
                        else Text(np.zeros(0, np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64),
                                  np.zeros(0, bool), {}))
                h = json.dumps({str(r): hit for r, hit in made.hits.items()}).encode()
                text = [memoryview(x).cast("B") for x in (TEXT.pack(len(made.starts), len(made.buf), len(h)), made.buf,
                                                           np.ascontiguousarray(made.starts, np.int64),
                                                           np.ascontiguousarray(made.sizes, np.int64),
                                                           np.ascontiguousarray(made.exact, np.uint8), h)]
                parts += [MSG.pack(b"T", sum(len(x) for x in text))] + text
            elif kind == b"F":     # its seconds, for the summary
                x = json.dumps({"peak_rss_mb": peak_rss_mb(),
                                **{name: round(sec, 3) for name, sec in spent.items()}}).encode()
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
        line = error_line(e).encode()
        try:
            out.write(MSG.pack(b"E", len(line)) + line)
            out.flush()
        except OSError:
            pass
        os._exit(1)


def read_text(payload):
    """T's payload -> the text.Text that RowText.make gave."""
    import numpy as np
    from gpt2job.files.text import Text
    n, nbuf, _ = TEXT.unpack_from(payload)   # (and the hits, which the payload then holds)
    at = TEXT.size
    buf = np.frombuffer(payload, np.uint8, nbuf, at)
    starts = np.frombuffer(payload, np.int64, n, at + nbuf)
    sizes = np.frombuffer(payload, np.int64, n, at + nbuf + 8 * n)
    exact = np.frombuffer(payload, np.uint8, n, at + nbuf + 16 * n).astype(bool)
    hits = {int(k): v for k, v in json.loads(bytes(payload[at + nbuf + 17 * n:])).items()}
    return Text(buf, starts, sizes, exact, hits)


if __name__ == "__main__":
    text_main(int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 0)
