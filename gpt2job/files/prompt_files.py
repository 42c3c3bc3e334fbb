"""`python -m gpt2job prompts`: a text or JSONL prompts file -> an input HDF5 file."""
import errno
import json
import os

import numpy as np

from gpt2job.errors import UserError, errno_of, first_line, plural
from gpt2job.files.h5files import JSONL_EXTENSIONS, TEXT_EXTENSIONS, check_output_path, has_hdf5_signature
from gpt2job.files import token_cache
from gpt2job.files.jsonl_settings import PROMPT_FIELDS, JsonlRows
from gpt2job.files.prompts import read_text_dataset

BLOCK_LINES = 1 << 16       # prompts converted and written at once: a file of millions of lines is never held whole


def read_int32_file(path, width):
    """The old system's raw prompt file: int32 little-endian, row-major [N, width]."""
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror})", path, "source", "check the path")
    if not width:
        raise UserError("a raw int32 token file needs its row width", path, "--tokens-per-row",
                        "pass --tokens-per-row T (16 for the seed workload's input.bin)")
    if size == 0 or size % (4 * width):
        raise UserError(f"{size} bytes is not a whole number of rows of {width} int32 tokens", path,
                        "--tokens-per-row", "give the file's real row width")
    return np.fromfile(path, dtype="<i4").reshape(-1, width)


def file_lines(path):
    """(line number, line) for each line of a UTF-8 text file, read a line at a time (a file of millions of lines
    is never held whole): split at "\n" only, a "\r" before it dropped, as JSON lines and text editors do
    (str.splitlines would also split at U+2028, form feeds and other separators inside a line); a leading byte-order
    mark, as some editors save, is not text. The file is opened now: a missing one is refused before any line is
    asked for."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror})", path, "source", "check the path")
    return _lines(f, path)


def _lines(f, path):
    with f:
        at = 0   # bytes before this line
        for n, raw in enumerate(f, 1):
            bom = 3 if n == 1 and raw.startswith(b"\xef\xbb\xbf") else 0
            try:
                line = raw[bom:].decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"not valid UTF-8 (byte {at + bom + e.start})", path, "source",
                                "save the file as UTF-8")
            if "\x00" in line:
                raise UserError("contains NUL characters", path, "source", "remove them; HDF5 strings cannot hold NUL")
            at += len(raw)
            line = line[:-1] if line.endswith("\n") else line
            yield n, line[:-1] if line.endswith("\r") else line


def prompt_blocks(path, rows):
    """A text or JSONL prompts file's prompts, BLOCK_LINES at a time, every line checked as it is read: yields
    (kind, prompts), kind "text" (str) or "token" (lists of ids), one kind per file. A JSONL line's per-row settings
    go into rows (a JsonlRows). A file without a prompt is refused once it has been read; one that cannot be opened,
    at once."""
    return _blocks(file_lines(path), path, rows)


def _blocks(lines, path, rows):
    jsonl, block, count, first = path.lower().endswith(JSONL_EXTENSIONS), [], 0, {}   # first: kind -> its first line
    kind = "text"
    for n, line in lines:
        if not line.strip():
            continue
        if jsonl:
            kind, prompt = _jsonl_prompt(line, n, path, rows, count)
            first.setdefault(kind, n)
            if len(first) == 2:
                other = "text" if kind == "token" else "token"
                raise UserError(f"a {kind} prompt, but line {first[other]} is a {other} prompt: the file mixes text "
                                "prompts and token prompts", path, f"line {n}", "use one kind per file")
        else:
            prompt = line
        block.append(prompt)
        count += 1
        if len(block) == BLOCK_LINES:
            yield kind, block
            block = []
    if not count:   # (`run` refuses an input of no rows, too)
        raise UserError("holds no prompt (every line is blank)", path, "source", "write one prompt per line")
    if block:
        yield kind, block


def _jsonl_prompt(line, n, path, rows, i):
    """Line n of a JSONL file, prompt i: (kind, its prompt); its settings fields go into rows."""
    obj = json_line(line, n, path, "write one JSON value per line")
    if isinstance(obj, dict):
        rows.add(i, obj, path, n)
        given = [k for k in PROMPT_FIELDS if k in obj]
        if len(given) > 1:
            raise UserError(f"gives {given[0]!r} and {given[1]!r}: two prompts", path, f"line {n}",
                            "give one prompt field a line")
        obj, want = (obj[given[0]], PROMPT_FIELDS[given[0]]) if given else (None, None)
        if want is not None and not isinstance(obj, want):   # ({"tokens": "1 2 3"} is not the text "1 2 3")
            raise UserError(f"{given[0]!r} is not {'a string' if want is str else 'a list of token ids'}", path,
                            f"line {n}", 'write {"text": "text"} or {"tokens": [1, 2, 3]}')
    if isinstance(obj, str):
        if "\x00" in obj:
            raise UserError("contains a NUL character", path, f"line {n}", "remove it")
        kind = "text"
    elif isinstance(obj, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in obj):
        kind = "token"
        check_ids(obj, path, n)
    else:
        raise UserError("is neither a string nor a list of token ids", path, f"line {n}",
                        'write "text", {"prompt": "text"} or {"tokens": [1, 2, 3]}')
    if not obj:   # refused here, where the line is known (`run --skip-invalid` does not reach a file's lines)
        raise UserError(f"empty {kind} prompt", path, f"line {n}",
                        "remove the line or give it a prompt: a text or JSONL input holds none, even with --skip-invalid")
    return kind, obj


def json_line(line, n, path, fix):
    """The JSON value of line n. JSON may spell half a UTF-16 pair (\\ud800), which no UTF-8 file can hold:
    refused here, where the line is known (HDF5's write would fail with a traceback)."""
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise UserError(f"not JSON ({e.msg})", path, f"line {n}", fix)
    if "\\ud" in line or "\\uD" in line:   # (only an escape makes a lone surrogate: the line is valid UTF-8)
        try:
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise UserError("holds half a UTF-16 surrogate pair (a \\ud800-\\udfff escape alone)", path, f"line {n}",
                            "write valid Unicode text") from None
    return obj


def file_digest(path):
    """"sha256:..." of a file's bytes, read 1 MiB at a time (a conversion's name and its source's record)."""
    import hashlib
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror})", path, "source", "check the path")
    return "sha256:" + h.hexdigest()


def check_ids(ids, path, n):
    """Token ids of line n that int32 can hold (the model's own range is checked with the job)."""
    bad = next((t for t in ids if not -(1 << 31) <= t < (1 << 31)), None)
    if bad is not None:
        raise UserError(f"token id {bad} is out of range", path, f"line {n}",
                        "give token ids of the model's vocabulary")


def _write_error(output, e):
    """One line for a failed write: the reason, not HDF5's internals (it names the .tmp file and its flags)."""
    code = errno_of(e)
    reason = os.strerror(code) if code else first_line(e)
    fix = "free disk space" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else \
        "check the folder and its permissions"
    return UserError(f"cannot write ({reason})", output, "output", fix)


class Appender:
    """A dataset of texts (str) or token lists (vlen int32) in an HDF5 file being written, a block at a time."""

    def __init__(self, f, name, kind, first_block=8192):
        import h5py
        self.dtype = h5py.string_dtype("utf-8") if kind == "text" else h5py.vlen_dtype(np.int32)
        chunk = max(1, min(8192, first_block))   # (a file of a few prompts: chunks of its size, not 128 KiB)
        self.ds = f.create_dataset(name, (0,), self.dtype, maxshape=(None,), chunks=(chunk,))
        self.kind, self.n = kind, 0

    def add(self, block):
        self.ds.resize((self.n + len(block),))
        if self.kind == "text":
            self.ds[self.n:] = block
        else:   # (an array of the vlen type, written directly: h5py's ds[a:b] = ... fails on rows of one length)
            rows = np.empty(len(block), self.dtype)
            for i, t in enumerate(block):
                rows[i] = np.asarray(t, np.int32)
            self.ds.write_direct(rows, dest_sel=np.s_[self.n:self.n + len(rows)])
        self.n += len(block)


def write_prompts_h5(output, blocks, rows, attrs, tokenizer_factory=None):
    """Write the input HDF5 file at output, atomically, a block of prompts at a time: blocks of (kind, prompts) as
    prompt_blocks yields them make prompts or prompt_tokens, or one ("grid", [N, T] int32 array); then the per-row
    settings' datasets; then, given tokenizer_factory (`run`'s conversions alone), text prompts' ids as they read
    back (files/token_cache.py), where it gives a tokenizer. Returns (prompts written, their kind)."""
    written = {}

    def fill(f):
        out = None
        for kind, block in blocks:
            if kind == "grid":   # a raw int32 file's rows: one 2-D dataset
                f.create_dataset("prompt_tokens", data=block.astype(np.int32))
                written.update(n=len(block), kind="token")
                continue
            out = out or Appender(f, "prompts" if kind == "text" else "prompt_tokens", kind, len(block))
            out.add(block)
            written.update(n=out.n, kind=kind)
        rows.write(f, written["n"])
        enc = tokenizer_factory() if tokenizer_factory is not None and written["kind"] == "text" else None
        if enc is not None:
            kept = read_text_dataset(output, f["prompts"], lambda: enc, enc.n_vocab)   # (uint16 for GPT-2's)
            token_cache.write(f, kept.offsets, kept.tokens, kept.text_digest, enc)
    write_atomically(output, fill, attrs)
    return written["n"], written["kind"]


def _writer():
    """This process's temporary-file tag: host, pid namespace (containers on one host share its name) and pid."""
    import socket
    try:
        ns = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        ns = 0
    return f"{socket.gethostname()}-{ns}", os.getpid()


def remove_dead_temps(targets):
    """Remove the temporary files of the targets (a glob pattern) that a process of this host and pid namespace
    left when it was killed mid-write (its pid is gone). Those of a live process, or of another host or container
    (which this process cannot check), stay."""
    import glob
    for path in glob.glob(f"{targets}.{glob.escape(_writer()[0])}.*.tmp"):
        pid = path[:-len(".tmp")].rsplit(".", 1)[-1]
        if pid.isdigit() and not _pid_alive(int(pid)):
            try:
                os.remove(path)
            except OSError:
                pass


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's live process
        return True
    return True


def write_atomically(output, fill, attrs):
    """An HDF5 file written by fill(file) with attrs at a temporary name beside output, then moved to output (a
    reader sees the old file or the new); a failed write leaves no temporary file and raises one line, and a write
    killed mid-way leaves one that the next write of output removes."""
    import glob
    import h5py
    remove_dead_temps(glob.escape(output))
    tmp = "{}.{}.{}.tmp".format(output, *_writer())
    try:
        with h5py.File(tmp, "w") as f:
            fill(f)
            f.attrs.update(attrs)
        os.replace(tmp, output)
    except BaseException as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(e, (OSError, RuntimeError)):
            raise _write_error(output, e)
        raise


def _tokenized(blocks, vocab_dir):
    """The blocks with text prompts as token lists (`prompts --tokenize`)."""
    from gpt2job.model.tokenizer import encode_texts, load_tokenizer
    enc = None
    for kind, block in blocks:
        if kind == "text":
            enc = enc or load_tokenizer(vocab_dir)
            kind, block = "token", encode_texts(enc, block)
        yield kind, block


def _is_prompts_file(path):
    """An HDF5 file with a prompts dataset (what `prompts` writes, or any gpt2job input)."""
    import h5py
    try:
        with h5py.File(path, "r") as f:
            return "prompts" in f or "prompt_tokens" in f
    except (OSError, ValueError):
        return False


def source_is_raw(source, tokens_per_row=0):
    """Does the `prompts` command read source as a raw int32 token file (.bin, or any name with --tokens-per-row)?
    Else it is a prompts file by its extension (.txt, .jsonl, .ndjson, in any case: README's list); an HDF5 file (by
    its signature, whatever its name) or any other file is refused with what to do instead. A missing file or a
    folder is left to the reader, which names it."""
    low = str(source).lower()
    if os.path.isfile(source) and has_hdf5_signature(source):
        if _is_prompts_file(source):
            raise UserError("is already an HDF5 prompts file: there is nothing to convert", source, "source",
                            f"give it to `run` as it is: python -m gpt2job run {source} OUT.h5")
        raise UserError("is an HDF5 file, not a text, JSONL or raw token file", source, "source",
                        "give `prompts` a .txt (one prompt per line), .jsonl or .bin file; `run` takes an HDF5 "
                        "input with a 'prompts' or 'prompt_tokens' dataset as it is")
    if low.endswith(".bin") or tokens_per_row:
        return True
    if low.endswith(TEXT_EXTENSIONS) or not os.path.isfile(source):   # (a missing file, a folder: the reader's line)
        return False
    ext = os.path.splitext(low)[1]
    if ext == ".json":   # (one JSON document, e.g. an array of prompts, would be one text prompt per line of it)
        raise UserError("is a .json file, but `prompts` reads JSON lines: one JSON value per line", source,
                        "source", 'write one prompt per line ("text", {"prompt": "text"} or a list of token ids) in '
                        "a .jsonl file")
    raise UserError(f"its extension ({ext or 'none'}) is not .txt, .jsonl or .bin", source, "source",
                    "save one prompt per line as a .txt file, or one JSON value per line as a .jsonl file")


def convert(source, output, tokenize=False, vocab_dir=None, overwrite=False, tokens_per_row=0):
    """`python -m gpt2job prompts SOURCE OUTPUT`. The source is read and checked as the output is written (at a
    temporary name: a source refused half-way leaves nothing), so the output's own checks (it exists; it holds
    results) come before those of the source's lines; the tokenizer is loaded for the first text block, if any."""
    check_output_path(output)
    rows = JsonlRows()
    if source_is_raw(source, tokens_per_row):
        blocks = [("grid", read_int32_file(source, tokens_per_row))]
    else:
        blocks = prompt_blocks(source, rows)
    if os.path.exists(output):
        from gpt2job.files.h5read import read_status
        if os.path.exists(source) and os.path.samefile(source, output):
            raise UserError("is the source file itself", output, "output", "give another name for the prompts file")
        if read_status(output)[0] is not None:   # completed work: never replaced by a prompts file
            raise UserError("is a gpt2job output (results): `prompts` never replaces one", output, "output",
                            "choose another name for the prompts file")
        if not overwrite:
            raise UserError("already exists", output, "output", "choose another name or pass --overwrite")
        if not _is_prompts_file(output):   # a user's text or HDF5 data file: --overwrite replaces prompts files only
            raise UserError("is not an HDF5 prompts file: --overwrite replaces only those", output, "output",
                            "choose another name, e.g. prompts.h5")
    if tokenize:
        blocks = _tokenized(blocks, vocab_dir)
    n, kind = write_prompts_h5(output, blocks, rows, {"source": os.path.abspath(source)})
    dataset = "prompts" if kind == "text" else "prompt_tokens"
    print(f"gpt2job: wrote {plural(n, kind + ' prompt')} ('{dataset}') to {output}")
    return 0
