"""`python -m gpt2job prompts`: a text or JSONL prompts file -> an input HDF5 file."""
import errno
import json
import os
import re

import numpy as np

from gpt2job.errors import UserError, plural


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


def read_prompt_file(path):
    """-> (list of texts or None, list of token lists or None)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"cannot read ({e.strerror})", path, "source", "check the path")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"not valid UTF-8 (byte {e.start})", path, "source", "save the file as UTF-8")
    if "\x00" in text:
        raise UserError("contains NUL characters", path, "source", "remove them; HDF5 strings cannot hold NUL")
    if not path.endswith((".jsonl", ".ndjson")):
        return [line for line in text.splitlines() if line.strip()], None
    texts, tokens = [], []
    first = {}   # kind -> the line it first appeared on
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise UserError(f"line {n} is not JSON ({e.msg})", path, f"line {n}", "write one JSON value per line")
        if isinstance(obj, dict):
            obj = next((obj[k] for k in ("prompt", "text", "tokens", "prompt_tokens") if k in obj), None)
        if isinstance(obj, str):
            if "\x00" in obj:
                raise UserError(f"line {n} contains a NUL character", path, f"line {n}", "remove it")
            kind = "text"
            texts.append(obj)
        elif isinstance(obj, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in obj):
            kind = "token"
            tokens.append(obj)
        else:
            raise UserError(f"line {n} is neither a string nor a list of token ids", path, f"line {n}",
                            'write "text", {"prompt": "text"} or {"tokens": [1, 2, 3]}')
        if not obj:   # `run` refuses empty prompts: refuse them here, where the line is known
            raise UserError(f"empty {kind} prompt", path, f"line {n}",
                            "remove the line or give it a prompt; `run` refuses empty prompts")
        first.setdefault(kind, n)
        if len(first) == 2:
            other = "text" if kind == "token" else "token"
            raise UserError(f"a {kind} prompt, but line {first[other]} is a {other} prompt: the file mixes text "
                            "prompts and token prompts", path, f"line {n}", "use one kind per file")
    return (texts, None) if texts or not tokens else (None, tokens)


def _write_error(output, e):
    """One line for a failed write: the reason, not HDF5's internals (it names the .tmp file and its flags)."""
    code = getattr(e, "errno", None)
    if code is None:
        m = re.search(r"errno = (\d+)", str(e))
        code = int(m.group(1)) if m else None
    reason = os.strerror(code) if code else (str(e).splitlines()[0][:120] if str(e) else type(e).__name__)
    fix = "free disk space" if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else \
        "check the folder and its permissions"
    return UserError(f"cannot write ({reason})", output, "output", fix)


def convert(source, output, tokenize=False, vocab_dir=None, overwrite=False, tokens_per_row=0):
    import h5py
    out_dir = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(out_dir):
        raise UserError("folder does not exist", output, "output", f"create {out_dir} first")
    if os.path.isdir(output):
        raise UserError("is a folder", output, "output", "give a file name, e.g. prompts.h5")
    if source.endswith(".bin") or tokens_per_row:
        texts, tokens = None, read_int32_file(source, tokens_per_row)
    else:
        texts, tokens = read_prompt_file(source)
    if os.path.exists(output) and not overwrite:
        raise UserError("already exists", output, "output", "choose another name or pass --overwrite")
    if texts is not None and tokenize:
        from gpt2job.model.tokenizer import EOT, load_tokenizer, vocab_dir_from
        enc = load_tokenizer(vocab_dir_from(vocab_dir))
        tokens, texts = enc.encode_batch(texts, allowed_special={EOT}), None
    tmp = output + ".tmp"
    try:
        with h5py.File(tmp, "w") as f:
            if texts is not None:
                f.create_dataset("prompts", data=texts, dtype=h5py.string_dtype("utf-8"))
            elif isinstance(tokens, np.ndarray):
                f.create_dataset("prompt_tokens", data=tokens.astype(np.int32))
            else:
                ds = f.create_dataset("prompt_tokens", (len(tokens),), dtype=h5py.vlen_dtype(np.int32))
                for i, t in enumerate(tokens):
                    ds[i] = np.asarray(t, np.int32)
            f.attrs["source"] = os.path.abspath(source)
        os.replace(tmp, output)
    except (OSError, RuntimeError) as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise _write_error(output, e)
    n = len(texts) if texts is not None else len(tokens)
    kind = "text prompt" if texts is not None else "token prompt"
    dataset = "prompts" if texts is not None else "prompt_tokens"
    print(f"gpt2job: wrote {plural(n, kind)} ('{dataset}') to {output}")
    return 0
